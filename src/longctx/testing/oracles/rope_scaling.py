"""Task 9's float64 oracle: each RoPE type's inverse frequencies, pair by pair, and the rotation."""
from __future__ import annotations

import numpy as np


# ANCHOR: rope_frequencies
# One function per RoPE type (the names of ``longctx.techniques.rope.ROPE_TYPES``): ``(s, d, base,
# theta, seq_len) -> (inverse frequencies, attention factor)``, ``theta`` the original RoPE's.

def _default(s, d, base, theta, seq_len):
    return theta, 1.0


def _linear(s, d, base, theta, seq_len):  # PI: every position divided by the factor
    return theta / s["factor"], 1.0


def _dynamic(s, d, base, theta, seq_len):  # NTK-aware: a larger base, grown with the length seen
    T0 = s["original_max_position_embeddings"]
    L = max(seq_len or T0, T0)
    grown = base * (s["factor"] * L / T0 - (s["factor"] - 1)) ** (d / (d - 2))
    return np.array([grown ** (-2.0 * i / d) for i in range(d // 2)]), 1.0


def _yarn(s, d, base, theta, seq_len):  # NTK-by-parts: interpolate the pairs with few rotations in T0
    T0 = s["original_max_position_embeddings"]

    def pair_at(rotations):  # the (fractional) pair index i whose wavelength fits `rotations` times in T0
        return d * np.log(T0 / (rotations * 2 * np.pi)) / (2 * np.log(base))
    lo, hi = pair_at(s["beta_fast"]), pair_at(s["beta_slow"])
    if s["truncate"]:
        lo, hi = np.floor(lo), np.ceil(hi)
    lo, hi = max(lo, 0.0), min(hi, d - 1.0)
    hi = hi + 0.001 if lo == hi else hi
    out = np.empty(d // 2)
    for i in range(d // 2):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate (divide)
        out[i] = theta[i] * (1 - ramp) + theta[i] / s["factor"] * ramp

    def mscale(m):
        return 1.0 if s["factor"] <= 1 else 0.1 * m * np.log(s["factor"]) + 1.0
    if s.get("attention_factor") is not None:
        factor = s["attention_factor"]
    elif s.get("mscale") and s.get("mscale_all_dim"):
        factor = mscale(s["mscale"]) / mscale(s["mscale_all_dim"])
    else:
        factor = mscale(1.0)
    return out, float(factor)


def _llama3(s, d, base, theta, seq_len):  # by wavelength: long ones divided, short ones kept, smooth between
    T0, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    out = np.empty(d // 2)
    for i in range(d // 2):
        wavelength = 2 * np.pi / theta[i]
        if wavelength < T0 / high:
            out[i] = theta[i]
        elif wavelength > T0 / low:
            out[i] = theta[i] / s["factor"]
        else:
            smooth = (T0 / wavelength - low) / (high - low)
            out[i] = (1 - smooth) * theta[i] / s["factor"] + smooth * theta[i]
    return out, 1.0


def _longrope(s, d, base, theta, seq_len):  # one factor per pair; the long ones beyond T0
    T0 = s["original_max_position_embeddings"]
    factors = s["long_factor"] if seq_len and seq_len > T0 else s["short_factor"]
    if s.get("attention_factor") is not None:
        factor = s["attention_factor"]
    else:
        factor = 1.0 if s["factor"] <= 1 else np.sqrt(1 + np.log(s["factor"]) / np.log(T0))
    return theta / np.asarray(factors, np.float64), float(factor)


SCALINGS = {"default": _default, "linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3,
            "longrope": _longrope}


def rope_frequencies(rope_scaling: dict, head_dim: int, base: float, seq_len=None) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``(head_dim / 2,)`` and the attention factor, in float64, pair by pair from
    the papers' formulas (``rope_scaling`` as ``longctx.techniques.rope.check_rope_scaling`` returns it)."""
    theta = np.array([base ** (-2.0 * i / head_dim) for i in range(head_dim // 2)])  # the original RoPE
    return SCALINGS[rope_scaling["rope_type"]](rope_scaling, head_dim, base, theta, seq_len)
# ANCHOR_END: rope_frequencies


# ANCHOR: rope
def rope(x, inv_freq, attention_factor: float = 1.0, *, offset: int = 0, traditional: bool = False,
         start_tokens: int = 0, original=None) -> np.ndarray:
    """``x (..., L, D)`` rotated at positions ``offset ..``, in float64: pair ``i`` is dims
    ``(i, i + D/2)`` (Qwen3, Llama; ``traditional``: ``(2i, 2i + 1)``), turned by ``position *
    inv_freq[i]``, times ``attention_factor``. Positions below ``start_tokens`` use ``original``
    (LongRoPE's n_hat: the first tokens keep the unscaled RoPE)."""
    x = np.asarray(x, np.float64)
    L, D = x.shape[-2], x.shape[-1]
    positions = np.arange(offset, offset + L, dtype=np.float64)[:, None]
    angle = positions * np.asarray(inv_freq, np.float64)[None, :]  # (L, D/2)
    if start_tokens:
        early = positions[:, 0] < start_tokens
        angle[early] = positions[early] * np.asarray(original, np.float64)[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = (x[..., 0::2], x[..., 1::2]) if traditional else (x[..., :D // 2], x[..., D // 2:])
    ra, rb = a * cos - b * sin, b * cos + a * sin
    out = np.empty_like(x)
    if traditional:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :D // 2], out[..., D // 2:] = ra, rb
    return out * attention_factor
# ANCHOR_END: rope
