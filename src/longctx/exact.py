"""Exact attention in float64 numpy: slow and obviously right.

The runtime's own checks use it (``longctx bench --ring --check``, the compiled
kernels' smoke test, the torch benchmark's quality figure), and
``longctx.testing.oracles`` builds every other oracle on it. The contract:
``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)``, query ``i`` at absolute position
``Lk - Lq + i``, query head ``h`` reads kv head ``h // (Hq // Hkv)``, a row with
no visible key is zeros.
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
def sliding_mask(lq: int, lk: int, window: int, global_tokens=()) -> np.ndarray:
    """``(lq, lk)`` bool: query at ``p`` sees ``p - window < j <= p``, and the global
    positions ``j <= p``."""
    p = query_positions(lq, lk)[:, None]
    j = np.arange(lk)[None, :]
    return (j <= p) & ((j > p - window) | np.isin(j, list(global_tokens)))
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


def causal_rows(q, k, v, rows) -> np.ndarray:
    """Exact causal attention (``Lq == Lk``, one kv head per query head) for query ``rows``
    only: ``(B, H, len(rows), D)``, ``O(rows * L)``, so it is computable at 200k tokens."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    return np.concatenate([attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1]) for i in rows], axis=2)


def relative_error(out, exact) -> float:
    """``||out - exact|| / ||exact||`` (Frobenius), in float64."""
    out, exact = np.asarray(out, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    return float(np.linalg.norm(out - exact) / np.linalg.norm(exact))


def sliding_window_attention(q, k, v, window: int, *, scale=None, global_tokens=()) -> np.ndarray:
    """Task 1's oracle: attention under :func:`sliding_mask`."""
    return attention(q, k, v, sliding_mask(q.shape[2], k.shape[2], window, global_tokens), scale=scale)


# Reference gradients: float64 torch autograd (torch imported when used).

def weighted(counts):
    """``f(q, k, v)``: dense softmax attention in which key ``j`` enters query ``i``'s softmax
    ``counts[h, i, j]`` times (queries the last ``Lq`` of ``Lk`` positions; GQA); a row that sees
    nothing gives zeros."""
    import torch
    log = torch.log(torch.as_tensor(np.asarray(counts, dtype=np.float64)))

    def attend(q, k, v):
        r = q.shape[1] // k.shape[1]
        s = q @ k.repeat_interleave(r, 1).transpose(-1, -2) / q.shape[-1] ** 0.5 + log
        return torch.nan_to_num(torch.softmax(s, -1)) @ v.repeat_interleave(r, 1)
    return attend


def reference_grads(fn, q, k, v, w) -> list[np.ndarray]:
    """``[dq, dk, dv]`` of ``sum(fn(q, k, v) * w)`` in float64 (torch autograd)."""
    import torch
    q, k, v = (torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True) for x in (q, k, v))
    (fn(q, k, v) * torch.tensor(np.asarray(w, dtype=np.float64))).sum().backward()
    return [x.grad.numpy() for x in (q, k, v)]
