"""Task 11's float64 oracle: causal linear attention."""
from __future__ import annotations

import numpy as np


# ANCHOR: linear_attention
def elu_plus_one(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def linear_attention(q, k, v, state=None, *, eps: float = 1e-6, phi=elu_plus_one, normalise: bool = True):
    """Causal linear attention, ``phi(x) = elu(x) + 1``: ``out_i = phi(q_i) S_i / (phi(q_i) . z_i
    + eps)`` with ``S_i = S_0 + sum_{j <= i} phi(k_j) v_j^T``, ``z_i = z_0 + sum_{j <= i}
    phi(k_j)``; the queries are the last ``Lq`` positions. Returns ``(out, (S, z))``, float64.
    (``phi``, ``normalise=False``: what the classic mistakes compute.)"""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    fq, fk = phi(q), phi(k)
    S = np.zeros((B, Hkv, D, v.shape[-1])) if state is None else np.asarray(state[0], np.float64)
    z = np.zeros((B, Hkv, D)) if state is None else np.asarray(state[1], np.float64)
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for j in range(Lk):
        S = S + np.einsum("bhd,bhe->bhde", fk[:, :, j], v[:, :, j])
        z = z + fk[:, :, j]
        i = j - (Lk - Lq)
        if i >= 0:
            Sq, zq = np.repeat(S, Hq // Hkv, axis=1), np.repeat(z, Hq // Hkv, axis=1)
            num = np.einsum("bhd,bhde->bhe", fq[:, :, i], Sq)
            out[:, :, i] = num / ((fq[:, :, i] * zq).sum(-1, keepdims=True) + eps) if normalise else num
    return out, (S, z)
# ANCHOR_END: linear_attention
