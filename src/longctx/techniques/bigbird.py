"""Task 12, BigBird (window, global and random blocks): what is not array code."""
from __future__ import annotations

import numpy as np

from longctx.checks import check_nonnegative_int, check_positive_int
from longctx.techniques.base import BYTES, Technique, constant


def check_bigbird(block_size, num_random_blocks, Lq: int, Lk: int, Hq: int, random_blocks):
    """``bigbird_attention``'s arguments: ``(number of blocks, random_blocks as (Hq, n, r) int or None)``."""
    b = check_positive_int("block_size", block_size)
    r = check_nonnegative_int("num_random_blocks", num_random_blocks)
    if Lq != Lk:
        raise ValueError(f"bigbird_attention is self-attention: Lq must equal Lk, got {Lq} and {Lk}")
    if Lk % b:
        raise ValueError(f"the length must be a multiple of block_size={b} (BigBird works in whole blocks), "
                         f"got L={Lk}; pad the sequence")
    n = Lk // b
    if random_blocks is None:
        return n, None
    rand = np.asarray(random_blocks)
    if rand.ndim == 0:
        rand = np.full((Hq, n, r), int(rand))
    if rand.shape != (Hq, n, r) or rand.dtype.kind not in "iu" or (rand < -1).any() or (rand >= n).any():
        raise ValueError(f"random_blocks must be ints in -1 .. {n - 1} of shape {(Hq, n, r)} "
                         f"(-1: none), got shape {rand.shape}")
    rand = rand.astype(np.int64)
    rand[:, [0, n - 1]] = -1  # global query blocks see everything already
    return n, rand


def memory(L, H, D, o, backend):
    b, k = o["block_size"], 5 + o["num_random_blocks"]
    tile = min(constant(backend, "sparse", "TILE"), H * L * k * b)
    return (8 * tile + 2 * tile * D // b) * BYTES  # tiles of scores, weights, gathered blocks; output in place


def pairs(L: int, o: dict) -> float:
    """Visible (query, key) pairs of causal BigBird on ``ceil(L / b)`` blocks."""
    b, r = o["block_size"], o["num_random_blocks"]
    n = -(-L // b)
    total = b * (b + 1) / 2 + (n > 1) * (b * (n - 1) * b + b * (b + 1) / 2)  # the global query blocks
    for i in range(1, n - 1):
        past = len({0, i - 2, i - 1} - {-1, i}) + min(r, max(0, i - 3))  # whole earlier blocks
        total += past * b * b + b * (b + 1) / 2
    return total


TECHNIQUE = Technique(
    "bigbird", 12, "BigBird: blocks of a window, two global blocks and seeded random blocks",
    {"block_size": 64, "num_random_blocks": 3, "seed": 0, "causal": True}, memory,
    lambda L, H, D, o: 4.0 * H * D * pairs(L, o), attention="BigBirdAttention", aliases=("sparse",),
    whole_blocks="block_size",
    from_window=lambda w: {"block_size": max(1, w // 3)})
