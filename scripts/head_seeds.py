"""Does the induction head form on every seed? ``python scripts/head_seeds.py [SEEDS...]``

Runs ``longctx train-tiny``'s curriculum (its model, data stream and learning rate, seed by seed)
through the first stage, scoring every 25 steps the loss on the copied tokens of 64 held-out
``induction`` rows of 64 tokens, and stops at the first score below ``COPY_FORMED`` (0.5) or at
the end of the stage. Writes book/src/figures/train/seeds.json (the curves, the step, the minutes)
and seeds.png (the book's chapter "A trained model to measure on"), keeping the seeds already
there. About 7 minutes a seed on 2 cores.
"""
import json
import sys
import time
from pathlib import Path

import longctx  # noqa: F401  (the BLAS, before mlx)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from longctx import blas  # noqa: E402
from longctx.data.mix import HELDOUT_SEED, batch  # noqa: E402
from longctx.models.train import COPY_FORMED, copy_score, fit, new_model, plan, schedule  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "book" / "src" / "figures" / "train"


def first_stage(seed: int, short_steps: int = 1200, steps: int = 1400, seq_len: int = 512, batch_size: int = 8):
    """``[(step, held-out copy loss, held-out copy accuracy)]`` until the loss is below COPY_FORMED."""
    model, _, tok = new_model(seq_len, seed)
    rng = np.random.default_rng(seed)
    length, count, mix = plan(short_steps, steps, seq_len)[0]
    rows, weights = batch(tok, np.random.default_rng(HELDOUT_SEED), 64, length, mix, weights=True)
    curve = []

    def score(step, total, loss, copy_loss):
        if step % 25 == 0 or step == count:
            held, accuracy = copy_score(model, rows, weights)
            curve.append((step, round(held, 4), round(accuracy, 4)))
            print(f"seed {seed} step {step:4d}  copy loss {held:.3f}  copy accuracy {accuracy:.0%}", flush=True)
            return held < COPY_FORMED or step >= count
    fit(model, tok, plan(short_steps, steps, seq_len), batch_size * seq_len, schedule(3e-3, short_steps, steps),
        rng, lambda *_: None, score)
    return curve


def main(seeds) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    done = OUT / "seeds.json"  # earlier seeds are kept: a seed run again is replaced
    runs = json.loads(done.read_text())["runs"] if done.exists() else {}
    for seed in seeds:
        start = time.perf_counter()
        curve = first_stage(seed)
        runs[str(seed)] = {"curve": curve, "formed_at": curve[-1][0] if curve[-1][1] < COPY_FORMED else None,
                      "minutes": round((time.perf_counter() - start) / 60, 1)}
        done.write_text(json.dumps({"blas": blas.LOADED, "runs": runs}))
        figure(runs)


def figure(runs) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for seed, run in sorted(runs.items(), key=lambda item: int(item[0])):
        steps, losses, _ = zip(*run["curve"])
        ax.plot(steps, losses, label=f"seed {seed}")
    ax.axhline(COPY_FORMED, color="grey", lw=0.5)
    ax.set_xlabel("step (4,096 tokens each, 64-token rows)")
    ax.set_ylabel("held-out copy loss (nats/token)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "seeds.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [0, 1, 2, 3, 4])
