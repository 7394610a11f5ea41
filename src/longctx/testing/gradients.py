"""Reference gradients: float64 torch autograd of dense attention under the oracles' masks and counts.

Every technique is softmax attention in which query ``i`` counts key ``j`` ``c[h, i, j]`` times
(0 or 1 for a window or a mask; a count for LongNet's levels and BigBird's blocks), so its
gradient is that of dense attention with ``log c`` added to the scores (``weighted``); linear
attention's is its quadratic form's (``linear_quadratic``). The graded gradient tests and
``tests/test_gradients.py`` compare a layer's ``dq, dk, dv`` with ``reference_grads`` of these.
``weighted`` and ``reference_grads`` live in ``longctx.exact`` (``longctx.ringrun`` checks real
ranks with them too).
"""
from __future__ import annotations

import numpy as np
import torch

from longctx.exact import reference_grads, weighted


def linear_quadratic(q, k, v, eps: float = 1e-6):
    """Causal linear attention (``phi = elu + 1``) in its quadratic form."""
    r = q.shape[1] // k.shape[1]
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k.repeat_interleave(r, 1)) + 1
    a = torch.tril(fq @ fk.transpose(-1, -2), diagonal=k.shape[2] - q.shape[2])
    return (a @ v.repeat_interleave(r, 1)) / (a.sum(-1, keepdim=True) + eps)


def assert_gradients_close(got, want, *, name: str, tol: float = 1e-4) -> None:
    """Each of ``dq, dk, dv`` within ``tol`` of the largest reference gradient (a gradient may be 0:
    a window of 1 makes ``dq`` vanish, and any rounding is then an infinite relative error)."""
    scale = max(float(np.abs(g).max()) for g in want)
    for x, a, b in zip("qkv", got, want):
        a = np.asarray(a, dtype=np.float64)
        if not np.isfinite(a).all():
            raise AssertionError(f"{name}: d{x} is not finite (NaN or inf): a 0 / 0 in the backward pass?")
        err = float(np.abs(a - b).max()) / scale
        if err > tol:
            raise AssertionError(f"{name}: d{x} is off by {err:.1e} of the largest gradient (tolerance {tol:g}): "
                                 "a detached or missing term in the backward pass")


def gradient_inputs(Lq: int, Lk: int, *, Hq: int = 4, Hkv: int = 2, D: int = 8, seed: int = 0):
    """``q (1, Hq, Lq, D)``, ``k, v (1, Hkv, Lk, D)`` and the loss weights ``w`` (like ``q``): seeded
    standard normals, GQA by default."""
    rng = np.random.default_rng(seed)
    q, w = (rng.standard_normal((1, Hq, Lq, D)) for _ in range(2))
    k, v = (rng.standard_normal((1, Hkv, Lk, D)) for _ in range(2))
    return q, k, v, w


__all__ = ["assert_gradients_close", "gradient_inputs", "linear_quadratic", "reference_grads", "weighted"]
