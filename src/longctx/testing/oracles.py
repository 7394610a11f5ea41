"""Float64 numpy oracles: slow and obviously right. The book quotes them.

Every attention oracle follows the contract: ``q (B, Hq, Lq, D)``, ``k, v (B,
Hkv, Lk, D)``, query ``i`` at absolute position ``Lk - Lq + i``, query head
``h`` reads kv head ``h // (Hq // Hkv)``, a row with no visible key is zeros.
"""
from __future__ import annotations

import numpy as np


def query_positions(lq: int, lk: int) -> np.ndarray:
    """Absolute positions of the ``lq`` queries: the last ``lq`` of ``lk``."""
    return np.arange(lk - lq, lk)


def causal_mask(lq: int, lk: int) -> np.ndarray:
    """``(lq, lk)`` bool, bottom-right aligned: query at ``p`` sees ``j <= p``."""
    p = query_positions(lq, lk)[:, None]
    return np.arange(lk)[None, :] <= p


# ANCHOR: sliding_mask
def sliding_mask(lq: int, lk: int, window: int) -> np.ndarray:
    """``(lq, lk)`` bool: query at ``p`` sees ``p - window < j <= p``."""
    p = query_positions(lq, lk)[:, None]
    j = np.arange(lk)[None, :]
    return (j <= p) & (j > p - window)
# ANCHOR_END: sliding_mask


# ANCHOR: attention
def attention(q, k, v, mask=None, *, scale=None) -> np.ndarray:
    """Softmax attention in float64. ``mask``: bool, broadcastable to
    ``(B, Hq, Lq, Lk)``, ``True`` = may attend; ``None`` = every key visible."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    hq, hkv = q.shape[1], k.shape[1]
    k = np.repeat(k, hq // hkv, axis=1)  # kv head h // (Hq // Hkv)
    v = np.repeat(v, hq // hkv, axis=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    row_max = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0))
    denom = e.sum(axis=-1, keepdims=True)
    p = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    return np.einsum("bhij,bhjd->bhid", p, v)
# ANCHOR_END: attention


def sliding_window_attention(q, k, v, window: int, *, scale=None) -> np.ndarray:
    """Task 1's oracle: attention under :func:`sliding_mask`."""
    return attention(q, k, v, sliding_mask(q.shape[2], k.shape[2], window), scale=scale)


def sliding_mistakes(q, k, v, window: int, *, scale=None) -> dict[str, np.ndarray]:
    """What the classic Task 1 mistakes would output, for :func:`assert_close`'s diagnosis."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    p = query_positions(lq, lk)[:, None]
    j = np.arange(lk)[None, :]
    out = {
        "future positions leak through the causal mask (the band is two-sided)":
            attention(q, k, v, np.abs(j - p) < window, scale=scale),
        "window off by one: window_size + 1 keys visible":
            attention(q, k, v, sliding_mask(lq, lk, window + 1), scale=scale),
        "the window is ignored (plain causal attention)":
            attention(q, k, v, causal_mask(lq, lk), scale=scale),
        "missing the 1/sqrt(D) scale":
            attention(q, k, v, sliding_mask(lq, lk, window), scale=1.0),
        "the scale argument is ignored (used D ** -0.5)":
            attention(q, k, v, sliding_mask(lq, lk, window), scale=d ** -0.5),
    }
    if lq < lk:
        p0 = np.arange(lq)[:, None]  # the mistake: queries at positions 0 .. Lq-1
        out["position offset ignored (queries placed at 0 .. Lq-1, not the last Lq positions)"] = attention(
            q, k, v, (j <= p0) & (j > p0 - window), scale=scale)
    if window > 1:
        out["window off by one: window_size - 1 keys visible"] = attention(
            q, k, v, sliding_mask(lq, lk, window - 1), scale=scale)
    hq, hkv = q.shape[1], k.shape[1]
    if hkv not in (1, hq):
        perm = np.arange(hq) % hkv  # the mistake: kv head h % Hkv
        out["GQA heads mapped as h % Hkv instead of h // (Hq // Hkv)"] = np.concatenate(
            [attention(q[:, h:h + 1], k[:, perm[h]:perm[h] + 1], v[:, perm[h]:perm[h] + 1],
                       sliding_mask(lq, lk, window), scale=scale) for h in range(hq)], axis=1)
    return out
