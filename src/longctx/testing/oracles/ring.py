"""Task 3's float64 oracle: ring attention: the shards' masks and the classic mistakes."""
from __future__ import annotations

import numpy as np

from longctx.exact import attention, causal_mask


def shard_mask(n_q: int, n_k: int, query_position: int, ring_position: int, causal: bool = True) -> np.ndarray:
    """``(n_q, n_k)`` bool: what one ring step lets query shard ``query_position`` see of kv
    shard ``ring_position`` (later shards nothing, the diagonal causally, earlier ones all)."""
    if not causal or ring_position < query_position:
        return np.ones((n_q, n_k), dtype=bool)
    if ring_position > query_position:
        return np.zeros((n_q, n_k), dtype=bool)
    return np.arange(n_k)[None, :] <= np.arange(n_q)[:, None]


def ring_mistakes(q, k, v, ring_size: int, *, causal: bool = True, scale=None) -> dict[str, np.ndarray]:
    """What the classic Task 3 mistakes would output for a ring of ``ring_size`` equal shards."""
    L = q.shape[2]
    n = -(-L // ring_size)
    shard = np.arange(L) // n
    mask = causal_mask(L, L) if causal else np.ones((L, L), dtype=bool)
    same = shard[:, None] == shard[None, :]
    out = {"missing the 1/sqrt(D) scale": attention(q, k, v, mask, scale=1.0)}
    # Normalised per-shard outputs added up (or averaged) instead of merged by their lse.
    blocks = [attention(q, k, v, mask & (shard[None, :] == s), scale=scale) for s in range(shard[-1] + 1)]
    out["normalised block outputs summed instead of merged by log-sum-exp"] = sum(blocks)
    visible = [(mask & (shard[None, :] == s)).any(axis=1)[None, None, :, None] for s in range(shard[-1] + 1)]
    out["normalised block outputs averaged instead of merged by log-sum-exp"] = sum(blocks) / sum(visible)
    if causal:
        out["later kv shards not skipped (only the diagonal shard is causal)"] = attention(
            q, k, v, mask | (shard[None, :] > shard[:, None]), scale=scale)
        out["diagonal shard not causal"] = attention(q, k, v, mask | same, scale=scale)
        out["causal mask ignored"] = attention(q, k, v, None, scale=scale)
    return out
