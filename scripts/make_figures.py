"""Draw the book's figures from the oracles: ``python scripts/make_figures.py``.

Writes to book/src/figures/:
* sliding-mask.png: the Task 1 mask for a prefill (Lq = Lk = 16) and a decode
  chunk (Lq = 4 queries at the end of Lk = 16 keys), window 5;
* dilated-pattern.png: which keys each query sees, per head and per level, for
  LongNet levels (4, 1), (8, 2), (16, 4) with 4 heads, and the union count;
* ring-schedule.png: which kv shard each rank holds at each ring step, and the
  causal work per rank for the contiguous and zigzag layouts.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from longctx.testing.oracles import causal_mask, dilated_pairs, sliding_mask  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "book" / "src" / "figures"


def sliding_mask_figure(path: Path, L: int = 16, window: int = 5) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1, 1]})
    panels = [(causal_mask(L, L), f"causal, Lq = Lk = {L}"),
              (sliding_mask(L, L, window), f"sliding, window = {window}"),
              (sliding_mask(4, L, window), f"decode chunk: Lq = 4, Lk = {L}")]
    for ax, (mask, title) in zip(axes, panels):
        ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.4, aspect="equal")
        lq, lk = mask.shape
        ax.set_xticks(range(lk))
        ax.set_yticks(range(lq), [str(lk - lq + i) for i in range(lq)])
        ax.set_xticks([x - 0.5 for x in range(lk + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(lq + 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(labelsize=6, which="both", length=0)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position p")
        ax.set_title(title, fontsize=10)
    fig.suptitle("Query p sees keys p - W < j <= p (bottom-right aligned when Lq < Lk)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dilated_figure(path: Path, L: int = 16, heads: int = 4, levels=((4, 1), (8, 2), (16, 4))) -> None:
    fig, axes = plt.subplots(len(levels) + 1, heads, figsize=(2.3 * heads, 2.4 * (len(levels) + 1)))
    count = np.zeros((heads, L, L))
    for row, (w, r) in enumerate(levels):
        pairs = dilated_pairs(heads, L, L, w, r)
        count += pairs
        for h in range(heads):
            axes[row, h].imshow(pairs[h], cmap="Blues", vmin=0, vmax=1.3)
            axes[row, h].set_title(f"level w={w}, r={r}: head {h}", fontsize=8)
    for h in range(heads):
        axes[-1, h].imshow(count[h], cmap="Purples", vmin=0, vmax=len(levels))
        axes[-1, h].set_title(f"union, head {h} (darker = more levels)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.supxlabel("key position j")
    fig.supylabel("query position p")
    fig.suptitle(f"LongNet dilated attention, L = {L}, {heads} heads: head h keeps offset h // ceil(H / r)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ring_figure(path: Path, P: int = 4) -> None:
    fig, (ax_s, ax_c, ax_z) = plt.subplots(1, 3, figsize=(13, 3.8))
    held = np.array([[(r - t) % P for r in range(P)] for t in range(P)])  # (step, rank) -> kv shard held
    ax_s.imshow(held, cmap="tab10", vmin=0, vmax=9)
    for t in range(P):
        for r in range(P):
            ax_s.text(r, t, f"kv{held[t, r]}", ha="center", va="center", fontsize=9, color="white")
    ax_s.set_xticks(range(P), [f"rank {r}" for r in range(P)])
    ax_s.set_yticks(range(P), [f"step {t}" for t in range(P)])
    ax_s.set_title("who holds which kv shard (q shard r stays on rank r)", fontsize=9)
    L = 8 * P
    chunk = L // (2 * P)
    for ax, layout in ((ax_c, "contiguous"), (ax_z, "zigzag")):
        owner = np.zeros(L, dtype=int)
        for r in range(P):
            if layout == "contiguous":
                owner[r * 2 * chunk:(r + 1) * 2 * chunk] = r
            else:
                owner[r * chunk:(r + 1) * chunk] = r
                owner[(2 * P - 1 - r) * chunk:(2 * P - r) * chunk] = r
        image = np.where(causal_mask(L, L), owner[:, None], np.nan)
        ax.imshow(image, cmap="tab10", vmin=0, vmax=9)
        work = [int(causal_mask(L, L)[owner == r].sum()) for r in range(P)]
        ax.set_title(f"{layout}: causal work per rank {work}", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position (colour = rank)")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in (("sliding-mask.png", sliding_mask_figure), ("dilated-pattern.png", dilated_figure),
                       ("ring-schedule.png", ring_figure)):
        draw(OUT / name)
        print(f"wrote {OUT / name}")
