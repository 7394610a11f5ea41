"""Task 3, ring attention: what is not array code (the shards each rank holds)."""
from __future__ import annotations

import numbers

from longctx.checks import check_choice, check_positive_int
from longctx.techniques.base import BYTES, Technique, causal_pairs

RING_LAYOUTS = ("contiguous", "zigzag")


def ring_shard_rows(length: int, rank, size, layout: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` row ranges rank ``rank`` of ``size`` holds of a sequence.

    contiguous: chunk ``rank`` of ``size``. zigzag: chunks ``rank`` and
    ``2 * size - 1 - rank`` of ``2 * size``, so causal work is balanced.
    """
    size = check_positive_int("size", size)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < size:
        raise ValueError(f"rank must be an integer in [0, {size}), got {rank!r}")
    check_choice("layout", layout, RING_LAYOUTS)
    chunks = size if layout == "contiguous" else 2 * size
    if length % chunks:
        raise ValueError(f"the sequence length must be a multiple of {chunks} for layout {layout!r}, got {length}")
    n = length // chunks
    owned = [rank] if layout == "contiguous" else [rank, chunks - 1 - rank]
    return [(c * n, (c + 1) * n) for c in owned]


def memory(L, H, D, o, backend):
    n = -(-L // o["ring_size"])
    return 4 * H * n * (min(o["block_size"], L) + D) * BYTES  # a tile of scores + a shard's state


TECHNIQUE = Technique(
    "ring", 3, "exact attention over shards passed around a ring (simulated in one process)",
    {"ring_size": 4, "block_size": 1024}, memory, lambda L, H, D, o: 4.0 * H * D * causal_pairs(L, o),
    attention="RingAttention", from_window=lambda w: {"block_size": max(w, 256)}, subquadratic=False)
