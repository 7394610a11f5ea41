"""Task 12's float64 oracle: Longformer."""
from __future__ import annotations

import numpy as np

from longctx.exact import attention, query_positions


# ANCHOR: longformer_mask
def longformer_mask(lq: int, lk: int, window: int, global_tokens=(), causal: bool = False) -> np.ndarray:
    """``(lq, lk)`` bool. Local query ``p``: ``|p - j| <= window / 2`` (causal: ``p - window < j
    <= p``) or ``j`` global (causal: and ``j <= p``). A global query sees every key (causal:
    ``j <= p``). Each key at most once: a mask has no multiplicity."""
    p = query_positions(lq, lk)[:, None]
    j = np.arange(lk)[None, :]
    g = np.isin(j, list(global_tokens))
    past = j <= p
    if causal:
        mask = past & ((j > p - window) | g)
    else:
        mask = (np.abs(p - j) <= window // 2) | g
    rows = np.isin(p[:, 0], list(global_tokens))
    mask[rows] = past[rows] if causal else True
    return mask
# ANCHOR_END: longformer_mask


def longformer_attention(q, k, v, window: int, global_tokens=(), causal: bool = False, *, global_qkv=None,
                         scale=None) -> np.ndarray:
    """Attention under :func:`longformer_mask`; the global queries' rows from ``global_qkv``."""
    lq, lk = q.shape[2], k.shape[2]
    mask = longformer_mask(lq, lk, window, global_tokens, causal)
    out = attention(q, k, v, mask, scale=scale)
    if global_qkv is not None:
        rows = np.isin(query_positions(lq, lk), list(global_tokens))
        out[:, :, rows] = attention(*global_qkv, mask, scale=scale)[:, :, rows]
    return out
