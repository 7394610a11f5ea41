"""Does the induction head form on every seed? ``python scripts/head_seeds.py [--batch-size B] [SEEDS...]``

Runs ``longctx train-tiny``'s curriculum (its model, data stream and learning rate, seed by seed)
through the first stage, scoring every 25 steps the loss on the copied tokens of 64 held-out
``induction`` rows of 64 tokens, and stops at the first score below ``COPY_FORMED`` (0.5) or at
the end of the stage. ``--batch-size`` is train-tiny's (8: 4,096 tokens a step; 4 halves the
compute, for MLX's slow bundled BLAS, with ``--max-steps 1400``). The BLAS is whichever ``import longctx`` loads
(``LONGCTX_BLAS=openblas|mkl|bundled`` chooses). Writes book/src/figures/train/seeds.json (per
BLAS and batch size: the curves, the step, the minutes) and seeds.png (the book's chapter "A
trained model to measure on"), keeping the runs already there. About 7 minutes a seed on 2 cores
with OpenBLAS.
"""
import argparse
import json
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


def first_stage(seed: int, batch_size: int = 8, max_steps: int | None = None, short_steps: int = 1800,
                steps: int = 1400, seq_len: int = 512):
    """``[(step, held-out copy loss, held-out copy accuracy)]`` until the loss is below COPY_FORMED
    (or the stage, ``max_steps`` long if given, ends)."""
    model, _, tok = new_model(seq_len, seed)
    rng = np.random.default_rng(seed)
    length, count, mix = plan(short_steps, steps, seq_len)[0]
    count = max_steps or count
    rows, weights = batch(tok, np.random.default_rng(HELDOUT_SEED), 64, length, mix, weights=True)
    curve = []

    def score(step, total, loss, copy_loss):
        if step % 25 == 0 or step == count:
            held, accuracy = copy_score(model, rows, weights)
            curve.append((step, round(held, 4), round(accuracy, 4)))
            print(f"seed {seed} step {step:4d}  copy loss {held:.3f}  copy accuracy {accuracy:.0%}", flush=True)
            return held < COPY_FORMED or step >= count
    fit(model, tok, [(length, count, mix)], batch_size * seq_len, schedule(3e-3, short_steps, steps),
        rng, lambda *_: None, score)
    return curve


def setup_name(batch_size: int) -> str:
    """The BLAS MLX uses here and the tokens a step, e.g. ``OpenBLAS, 4,096 tokens a step``."""
    return f"{blas.kind().replace('bundled', 'bundled BLAS')}, {batch_size * 512:,} tokens a step"


def main(seeds, batch_size: int, max_steps: int | None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    done = OUT / "seeds.json"  # earlier runs are kept: a seed run again in the same setup is replaced
    setups = json.loads(done.read_text()) if done.exists() else {}
    setup = setups.setdefault(setup_name(batch_size), {"blas": blas.describe(), "runs": {}})
    for seed in seeds:
        start = time.perf_counter()
        curve = first_stage(seed, batch_size, max_steps)
        setup["runs"][str(seed)] = {"curve": curve, "formed_at": curve[-1][0] if curve[-1][1] < COPY_FORMED else None,
                                    "minutes": round((time.perf_counter() - start) / 60, 1)}
        done.write_text(json.dumps(setups))
        figure(setups)


def figure(setups) -> None:
    fig, axes = plt.subplots(1, len(setups), figsize=(4.2 * len(setups), 3.2), sharey=True, squeeze=False)
    for ax, (name, setup) in zip(axes[0], setups.items()):
        for seed, run in sorted(setup["runs"].items(), key=lambda item: int(item[0])):
            steps, losses, _ = zip(*run["curve"])
            ax.plot(steps, losses, label=f"seed {seed}")
        ax.axhline(COPY_FORMED, color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step (64-token rows)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("held-out copy loss (nats/token)")
    fig.tight_layout()
    fig.savefig(OUT / "seeds.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, help="steps of the first stage instead of its 800 (half the "
                        "batch needs more: the CI check allows 1400)")
    args = parser.parse_args()
    main(args.seeds, args.batch_size, args.max_steps)
