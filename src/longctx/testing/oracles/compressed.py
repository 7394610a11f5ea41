"""Task 4's float64 oracle: KV compression: importance scores and the kept entries."""
from __future__ import annotations

import numpy as np

from longctx.exact import causal_mask


def attention_weights(q, k, *, scale=None) -> np.ndarray:
    """``(B, Hq, Lq, Lk)`` causal softmax weights in float64 (what eager attention returns)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.where(causal_mask(q.shape[2], k.shape[2]), q @ k.swapaxes(-1, -2) * scale, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ANCHOR: compression_scores
def compression_scores(method: str, keys, queries=None, *, observation_window: int = 32,
                       pool_kernel: int = 5) -> np.ndarray:
    """Importance ``(B, Hkv, L)`` of each cached entry, float64, higher = keep."""
    keys = np.asarray(keys, np.float64)
    B, H, L, _ = keys.shape
    if method == "knorm":
        return -np.sqrt((keys ** 2).sum(axis=-1))
    if method == "streaming":
        return np.broadcast_to(np.arange(L, dtype=np.float64), (B, H, L)).copy()
    a = attention_weights(queries, keys)  # (B, Hq, Lq, L)
    G = a.shape[1] // H
    if method == "h2o":
        return a.sum(axis=2).reshape(B, H, G, L).mean(axis=2)
    w = min(observation_window, a.shape[2], L)
    mean = a[:, :, -w:, :L - w].mean(axis=2)  # (B, Hq, L - w)
    pooled = np.zeros_like(mean)
    for j in range(L - w):  # avg_pool1d, zero padding counted
        lo, hi = max(0, j - pool_kernel // 2), min(L - w, j + pool_kernel // 2 + 1)
        pooled[..., j] = mean[..., lo:hi].sum(axis=-1) / pool_kernel
    scores = np.full((B, H, L), np.inf)
    scores[..., :L - w] = pooled.reshape(B, H, G, L - w).mean(axis=2)
    return scores
# ANCHOR_END: compression_scores


# ANCHOR: kept_indices
def n_kept(length: int, compression_ratio: float) -> int:
    """kvpress's ``compute_n_kept``: ``compression_ratio`` is the fraction removed."""
    return max(1, int(length * (1 - compression_ratio)))


def kept_indices(scores, budget: int, sink_tokens: int, recent_tokens: int,
                 positions=None, length: int | None = None) -> np.ndarray:
    """Ascending indices of the ``budget`` entries kept along the last axis.

    ``positions`` (default ``arange``) place the entries in a sequence of
    ``length``. Positions ``< sink_tokens`` and the last ``recent_tokens``
    positions first (sinks, then the latest, if they alone exceed the budget),
    then the highest scores, ties to the earlier entry.
    """
    scores = np.asarray(scores, np.float64)
    n = scores.shape[-1]
    positions = np.arange(n) if positions is None else np.asarray(positions)
    length = n if length is None else length
    sinks = min(sink_tokens, budget)
    recent = min(recent_tokens, budget - sinks)
    out = np.zeros((*scores.shape[:-1], budget), np.int64)
    for idx in np.ndindex(*scores.shape[:-1]):
        pos = positions[idx] if positions.ndim > 1 else positions
        protected = [j for j in range(n) if pos[j] < sinks or pos[j] >= length - recent]
        rest = sorted((j for j in range(n) if j not in protected), key=lambda j: (-scores[idx][j], j))
        out[idx] = sorted((protected + rest)[:budget])
    return out
# ANCHOR_END: kept_indices
