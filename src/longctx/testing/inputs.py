"""Seeded random inputs for the graded tests, the same numbers for every backend."""
from __future__ import annotations

import numpy as np


def make_qkv(seed: int, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, std: float = 1.0):
    """``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` in float64 holding float32-exact values
    (what a float32 backend sees); ``q`` and ``k`` scaled by ``std`` to make large logits."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape).astype(np.float32).astype(np.float64)
               for shape in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)))
    return q * std, k * std, v
