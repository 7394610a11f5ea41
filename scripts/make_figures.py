"""Draw the book's figures from the oracles: ``python scripts/make_figures.py``.

Writes book/src/figures/sliding-mask.png: the Task 1 mask for a prefill
(Lq = Lk = 16) and a decode chunk (Lq = 4 queries at the end of Lk = 16 keys),
window 5.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from longctx.testing.oracles import causal_mask, sliding_mask  # noqa: E402

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


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sliding_mask_figure(OUT / "sliding-mask.png")
    print(f"wrote {OUT / 'sliding-mask.png'}")
