"""Long-context training of the shipped model with each technique, at equal wall time (Task 13's
chapter): ``python scripts/train_techniques.py [--seconds 180] [--seq-len 2048] [--out runs/training]``.

For full attention and each sub-quadratic technique, ``longctx train-tiny --from shipped --attention
TECHNIQUE --seq-len N --max-seconds S`` (``longctx.models.train.train_with_attention``): the shipped
model (trained at 512 tokens with full attention) continues at N tokens with the technique in every
layer for S seconds, then is asked for passkeys at N and 2N tokens, greedy under the technique.
Every run is then scored on the same held-out rows of N tokens (``heldout_loss``), before training
(the shipped model with the technique swapped in) and after.
Writes ``book/src/figures/training/long-training.json`` (every run's ``finetune.json``: losses, the
wall time of every step, tokens/s, peak memory, passkey), ``long-training.md`` (the table the book
includes, rendered from the JSON by ``table``) and ``long-training.png`` (loss against wall time). The runs go one after another: on a 2-core machine two at once would share the cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import numpy as np

from longctx.eval import technique_passkey
from longctx.models import TRAINED
from longctx.models.train import heldout_loss, train_with_attention

FIGURES = Path(__file__).resolve().parents[1] / "book" / "src" / "figures" / "training"
# Options at 2048 tokens: a window of 256 (two layers see 512 back), LongNet's levels up to the
# row, Longformer's window with the first token global, BigBird's defaults, linear's chunk.
RUNS = {"full": {}, "sliding": {"window_size": 256}, "hierarchical": {"levels": [256, 1024, 2048]},
        "longformer": {"window": 256}, "bigbird": {}, "linear": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", default="runs/training")
    parser.add_argument("--techniques", default=",".join(RUNS))
    parser.add_argument("--score-only", action="store_true", help="score the runs already in --out, no training")
    args = parser.parse_args()
    runs = {}
    for name in args.techniques.split(","):
        out = Path(args.out) / name
        if not args.score_only:
            shutil.rmtree(out, ignore_errors=True)
            train_with_attention(TRAINED, out, name, RUNS[name], seq_len=args.seq_len, steps=100_000,
                                 batch_size=args.batch_size, max_seconds=args.seconds, log=lambda *a: None)
            technique_passkey(out, log=lambda *a: None)
        runs[name] = r = json.loads((out / "finetune.json").read_text())
        r["heldout_loss"] = {"before": score(TRAINED, r, args.seq_len), "after": score(out, r, args.seq_len)}
        print(f"{name:12s} {r['steps']:4d} steps  held-out loss {r['heldout_loss']['before']:.3f} -> "
              f"{r['heldout_loss']['after']:.3f}  {r['tokens_per_second']:5d} tokens/s  peak {r['peak_memory_mb']:4d} MB"
              f"  passkey {r['passkey']}", flush=True)
    FIGURES.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} cores, CPU (MLX)"
    record = {"command": f"python scripts/train_techniques.py --seconds {args.seconds:g} --seq-len {args.seq_len}",
              "machine": machine, "runs": runs}
    (FIGURES / "long-training.json").write_text(json.dumps(record, indent=1))
    (FIGURES / "long-training.md").write_text(table(record))
    plot(record, FIGURES / "long-training.png")


def score(path, run: dict, seq_len: int) -> float:
    """``heldout_loss`` of the model in ``path`` under the run's technique."""
    from mlx_lm import load

    from longctx.mlx.nn import technique_attention
    model, tokenizer = load(str(path))
    with technique_attention(model, run["longctx_attention"]["technique"], **run["longctx_attention"]["options"]):
        return round(heldout_loss(model, tokenizer, seq_len), 4)


def table(record: dict) -> str:
    """The runs as the Markdown table the book includes."""
    runs = record["runs"]
    seq_len = next(iter(runs.values()))["seq_len"]
    lines = [f"| technique | options | steps | tokens/s | peak MB | held-out loss before | after | "
             f"passkey at {seq_len:,} | at {2 * seq_len:,} |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in runs.items():
        options = ", ".join(f"{k}={v}" for k, v in r["longctx_attention"]["options"].items()) or "(fused SDPA)"
        lines.append(f"| {name} | {options} | {r['steps']} | {r['tokens_per_second']:,} | {r['peak_memory_mb']:,} | "
                     f"{r['heldout_loss']['before']:.3f} | {r['heldout_loss']['after']:.3f} | "
                     f"{r['passkey'][str(seq_len)]:.0%} | {r['passkey'][str(2 * seq_len)]:.0%} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in record["runs"].items():
        losses = np.convolve(r["losses"], np.ones(10) / 10, mode="valid") if len(r["losses"]) >= 10 else r["losses"]
        ax.plot(r["times"][len(r["times"]) - len(losses):], losses, label=f"{name} ({r['steps']} steps)")
    seq_len = next(iter(record["runs"].values()))["seq_len"]
    ax.set_yscale("log")
    ax.set(xlabel="wall time (s)", ylabel="training loss (mean of 10 steps, log scale)",
           title=f"The shipped model trained on at {seq_len} tokens, one technique per run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
