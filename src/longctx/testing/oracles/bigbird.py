"""Task 12's float64 oracle: BigBird."""
from __future__ import annotations

import numpy as np


# ANCHOR: bigbird_counts
def bigbird_counts(heads: int, num_blocks: int, block_size: int, random_blocks, causal: bool = False) -> np.ndarray:
    """``(heads, L, L)``: how many times query ``i`` counts key ``j`` in BigBird's softmax. Query
    blocks ``0, n-1``: every key once. Middle block ``i``: the set {global blocks (0 and n-1;
    causal: 0), window blocks ``i-1 .. i+1`` (causal: ``i-2 .. i``) inside ``0 .. n-1``} once
    each, plus one per entry of ``random_blocks[h, i]`` that is ``>= 0``. Causal: times ``j <= i``."""
    n, b = num_blocks, block_size
    L = n * b
    counts = np.zeros((heads, L, L))
    for h in range(heads):
        for i in range(n):
            rows = slice(i * b, (i + 1) * b)
            if i in (0, n - 1):
                counts[h, rows] = 1
                continue
            fixed = {0} | ({i - 2, i - 1, i} if causal else {n - 1, i - 1, i, i + 1})
            for c in [c for c in fixed if 0 <= c < n] + [int(c) for c in random_blocks[h, i] if c >= 0]:
                counts[h, rows, c * b:(c + 1) * b] += 1
    if causal:
        counts *= np.tril(np.ones((L, L)))
    return counts
# ANCHOR_END: bigbird_counts


def weighted_attention(q, k, v, counts, *, scale=None) -> np.ndarray:
    """Softmax attention where key ``j`` enters query ``i``'s softmax ``counts[..., i, j]`` times
    (``counts`` broadcastable to ``(B, Hq, Lq, Lk)``; 0 = masked; every row needs a key)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, np.repeat(k, rep, axis=1)) * scale
    e = np.exp(s - s.max(axis=-1, keepdims=True)) * counts
    return np.einsum("bhij,bhjd->bhid", e / e.sum(axis=-1, keepdims=True), np.repeat(v, rep, axis=1))


def bigbird_attention(q, k, v, block_size: int, random_blocks, causal: bool = False, *, scale=None) -> np.ndarray:
    """Attention weighted by :func:`bigbird_counts`."""
    counts = bigbird_counts(q.shape[1], q.shape[2] // block_size, block_size, np.asarray(random_blocks), causal)
    return weighted_attention(q, k, v, counts[None], scale=scale)
