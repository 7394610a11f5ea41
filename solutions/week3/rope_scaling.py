"""Task 9: position extension, PI, NTK, YaRN, Llama 3 and LongRoPE (book chapter "Task 9: Position extension").

RoPE turns pair ``i`` of a query or key (dims ``i`` and ``i + D/2``) by
``position * theta_i``, ``theta_i = base ** (-2i / D)``. A model trained to
``T0`` tokens never saw the angles of later positions. Every method here
changes the inverse frequencies ``theta_i`` (and some the attention's
temperature) so that ``s * T0`` positions look like ones the model knows:

==========  ====================================================================
linear      PI: every ``theta_i / s`` (positions squeezed into ``[0, T0)``)
dynamic     NTK-aware: a larger base, ``base * (s L / T0 - (s - 1)) ** (D / (D - 2))``
            for the length ``L`` seen, so fast pairs keep their resolution
yarn        NTK-by-parts: pairs that turn fewer than ``beta_slow`` times in ``T0``
            are divided by ``s``, more than ``beta_fast`` kept, a linear ramp
            between; attention factor ``0.1 ln s + 1`` (``mscale``)
llama3      the same idea by wavelength: longer than ``T0 / low_freq_factor``
            divided by ``s``, shorter than ``T0 / high_freq_factor`` kept, smooth between
longrope    one searched factor per pair, ``theta_i / lambda_i``: ``short_factor``
            while the sequence fits in ``T0``, ``long_factor`` beyond; attention
            factor ``sqrt(1 + ln s / ln T0)``
==========  ====================================================================

``rope_frequencies(rope_scaling, head_dim, base, seq_len)`` reads Hugging
Face's ``rope_scaling`` dict and returns what transformers'
``ROPE_INIT_FUNCTIONS`` returns: ``(inv_freq, attention_factor)``.
``ScaledRoPE`` is a drop-in for mlx-lm's RoPE module (``rope(x, offset)``).
``search_longrope`` is LongRoPE's evolutionary search (``rope_search.py``)
with the model's perplexity as the fitness.

Every method is LongRoPE with some factor vector: ``rescale_factors`` gives
it, ``lambda_i = theta_i / theta'_i``.
"""
from __future__ import annotations

import math
import numbers

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from longctx.checks import check_positive_int
from longctx.techniques.rope import check_rope_scaling, rope_scaling_from_config

from .rope_search import search_factors


def _original(head_dim: int, base: float) -> mx.array:
    """``theta_i = base ** (-2i / D)``, ``(D/2,)`` float32: the RoPE the model was trained with."""
    return 1.0 / base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)


# Each scaling: ``(s, head_dim, base, seq_len) -> (inv_freq (D/2,) float32, attention_factor)``, ``s``
# the checked ``rope_scaling`` dict (HF's keys and defaults, ``original_max_position_embeddings`` = T0).

def _default(s: dict, head_dim: int, base: float, seq_len) -> tuple[mx.array, float]:
    return _original(head_dim, base), 1.0


def _linear(s: dict, head_dim: int, base: float, seq_len) -> tuple[mx.array, float]:
    """Position Interpolation (Chen et al. 2023, "Extending context window ... via positional
    interpolation", §2.2): squeeze ``factor * T0`` positions into the ``[0, T0)`` the model knows,
    so every pair turns ``factor`` times slower. 1 line."""
    # BEGIN SOLUTION
    return _original(head_dim, base) / s["factor"], 1.0
    # END SOLUTION


def _dynamic(s: dict, head_dim: int, base: float, seq_len) -> tuple[mx.array, float]:
    """Dynamic NTK-aware scaling (bloc97 2023; YaRN paper §3.1 and §3.3): instead of slowing every
    pair, raise RoPE's base so the slowest pair stretches over the longer sequence while the fast
    pairs, which tell neighbours apart, barely change; "dynamic": the stretch follows the length
    actually seen, ``L = max(seq_len, T0)`` (``seq_len`` None: ``T0``), so a short prompt keeps
    the original RoPE. The new base is transformers' (the chapter's "The five methods, as one").
    3 lines."""
    # BEGIN SOLUTION
    T0 = s["original_max_position_embeddings"]
    L = max(seq_len or T0, T0)
    return _original(head_dim, base * (s["factor"] * L / T0 - (s["factor"] - 1)) ** (head_dim / (head_dim - 2))), 1.0
    # END SOLUTION


def _yarn_pair(rotations: float, head_dim: int, base: float, T0: int) -> float:
    """The (fractional) pair index ``i`` whose wavelength ``2 pi / theta_i`` fits ``rotations`` times
    into ``T0`` positions (YaRN paper §3.2: ``r = T0 / lambda``): solve for ``i`` with ``theta_i =
    base ** (-2i / D)``. 1 line."""
    # BEGIN SOLUTION
    return head_dim * math.log(T0 / (rotations * 2 * math.pi)) / (2 * math.log(base))
    # END SOLUTION


def _mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 for ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(s: dict, head_dim: int, base: float, seq_len) -> tuple[mx.array, float]:
    """YaRN (Peng et al. 2023), "NTK-by-parts" (§3.2) plus a temperature (§3.4). A pair that turns
    many times within ``T0`` (more than ``beta_fast``) has seen every angle: keep it. One that turns
    less than ``beta_slow`` times would see new angles beyond ``T0``: interpolate it as PI does.
    Between the two pair indices (``_yarn_pair``), blend linearly in the pair index. The softmax
    gets sharper with ``factor`` to undo the flatter attention of interpolated positions: the
    attention factor. The bounds' rounding and clipping and the factor's three cases are the
    chapter's "The exact semantics" (transformers' rules, graded). About 18 lines."""
    # BEGIN SOLUTION
    T0, factor = s["original_max_position_embeddings"], s["factor"]
    lo = _yarn_pair(s["beta_fast"], head_dim, base, T0)
    hi = _yarn_pair(s["beta_slow"], head_dim, base, T0)
    if s["truncate"]:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = mx.clip((mx.arange(head_dim // 2, dtype=mx.float32) - lo) / (hi - lo), 0, 1)
    theta = _original(head_dim, base)
    inv_freq = theta * (1 - ramp) + theta / factor * ramp
    if s.get("attention_factor") is not None:
        attention_factor = s["attention_factor"]
    elif s.get("mscale") and s.get("mscale_all_dim"):
        attention_factor = _mscale(factor, s["mscale"]) / _mscale(factor, s["mscale_all_dim"])
    else:
        attention_factor = _mscale(factor)
    return inv_freq, float(attention_factor)
    # END SOLUTION


def _llama3(s: dict, head_dim: int, base: float, seq_len) -> tuple[mx.array, float]:
    """Llama 3.1's scaling (Meta's release code; no paper): YaRN's idea by wavelength ``2 pi /
    theta_i`` instead of rotations. Wavelengths shorter than ``T0 / high_freq_factor`` are kept,
    longer than ``T0 / low_freq_factor`` interpolated by ``factor``; between them the inverse
    frequency blends the two, its weight on the kept one growing linearly in ``T0 / wavelength``
    from 0 at ``low_freq_factor`` to 1 at ``high_freq_factor``. About 8 lines."""
    # BEGIN SOLUTION
    T0, factor = s["original_max_position_embeddings"], s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    theta = _original(head_dim, base)
    wavelength = 2 * math.pi / theta
    smooth = (T0 / wavelength - low) / (high - low)
    between = (1 - smooth) * theta / factor + smooth * theta
    inv_freq = mx.where(wavelength < T0 / high, theta, mx.where(wavelength > T0 / low, theta / factor, between))
    return inv_freq, 1.0
    # END SOLUTION


def _longrope(s: dict, head_dim: int, base: float, seq_len) -> tuple[mx.array, float]:
    """LongRoPE (Ding et al. 2024, §2-3): one rescale factor per pair, found by search rather than
    by formula, ``lambda_i`` dividing ``theta_i``; a second set for sequences that still fit in
    ``T0`` (``short_factor``; ``seq_len`` None included) and one beyond (``long_factor``). Its
    attention factor is ``attention_factor`` if given, else Phi-3's ``sqrt(1 + ln(factor) /
    ln(T0))`` (1 for ``factor <= 1``). About 6 lines."""
    # BEGIN SOLUTION
    T0 = s["original_max_position_embeddings"]
    factors = s["long_factor"] if seq_len and seq_len > T0 else s["short_factor"]
    inv_freq = _original(head_dim, base) / mx.array(factors, dtype=mx.float32)
    if s.get("attention_factor") is not None:
        return inv_freq, s["attention_factor"]
    return inv_freq, 1.0 if s["factor"] <= 1 else math.sqrt(1 + math.log(s["factor"]) / math.log(T0))
    # END SOLUTION


SCALINGS = {"default": _default, "linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3,
            "longrope": _longrope}  # rope_type -> function, as transformers' ROPE_INIT_FUNCTIONS
CACHED_LENGTHS = 16  # ScaledRoPE keeps the frequencies of this many lengths


def _check_base(base) -> float:
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not 1 < base < float("inf"):
        raise ValueError(f"base must be a finite number > 1, got {base!r}")
    return float(base)


def rope_frequencies(rope_scaling: dict | None, head_dim: int, base: float,
                     seq_len: int | None = None) -> tuple[mx.array, float]:
    """``(inv_freq (head_dim / 2,) float32, attention_factor)`` for Hugging Face's ``rope_scaling``
    dict (None: the original RoPE) at a sequence of ``seq_len`` tokens (``dynamic`` and
    ``longrope`` depend on it), as ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``."""
    s = check_rope_scaling(rope_scaling, head_dim)
    if seq_len is not None:
        check_positive_int("seq_len", seq_len)
    return SCALINGS[s["rope_type"]](s, head_dim, _check_base(base), seq_len)


def rescale_factors(rope_scaling: dict | None, head_dim: int, base: float, seq_len: int | None = None) -> np.ndarray:
    """LongRoPE's view of any method: ``lambda_i = theta_i / theta'_i`` (float64, ``(head_dim / 2,)``),
    so that ``{"rope_type": "longrope", "long_factor": lambda, ...}`` rotates exactly as it does."""
    inv_freq, _ = rope_frequencies(rope_scaling, head_dim, base, seq_len)
    return np.array(_original(head_dim, base), np.float64) / np.array(inv_freq, np.float64)


class ScaledRoPE(nn.Module):
    """A drop-in for mlx-lm's RoPE module (``rope(x, offset)``, ``x (B, H, L, D)``) with any scaling.

    The length that ``dynamic`` and ``longrope`` choose their frequencies by is ``self.seq_len`` when
    set (``LongContextQwen3`` sets it to the whole call's length, so every chunk and every cached
    key uses the same frequencies), else ``offset + L`` of each call (transformers' behaviour).
    LongRoPE's ``start_tokens`` (n_hat): positions below it keep the original RoPE."""

    def __init__(self, head_dim: int, base: float, rope_scaling: dict | None = None, traditional: bool = False):
        super().__init__()
        self.scaling = check_rope_scaling(rope_scaling, head_dim)
        self.dims, self.base, self.traditional = head_dim, _check_base(base), bool(traditional)
        self.seq_len = None
        self._cache = {}

    def frequencies(self, seq_len: int) -> tuple[mx.array, float]:
        """``(1 / inv_freq, attention_factor)`` at ``seq_len``: the ``freqs`` ``mx.fast.rope`` takes."""
        depends = self.scaling["rope_type"] in ("dynamic", "longrope")
        key = seq_len if self.scaling["rope_type"] == "dynamic" else (
            seq_len > self.scaling["original_max_position_embeddings"] if depends else None)
        if key not in self._cache:
            if len(self._cache) >= CACHED_LENGTHS:  # dynamic's key grows with every decoded token
                self._cache.pop(next(iter(self._cache)))
            inv_freq, factor = SCALINGS[self.scaling["rope_type"]](self.scaling, self.dims, self.base, seq_len)
            self._cache[key] = (1.0 / inv_freq, factor)
        return self._cache[key]

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        """``x (B, H, L, D)`` at positions ``offset .. offset + L - 1``, rotated by ``mx.fast.rope``
        with ``freqs`` and ``traditional`` (the attention factor is applied above); positions below
        LongRoPE's ``start_tokens`` (n_hat) rotate with the original RoPE (``base``). About 7 lines."""
        offset = int(offset)
        L = x.shape[-2]
        freqs, factor = self.frequencies(self.seq_len or offset + L)
        if factor != 1.0:
            x = x * factor
        # BEGIN SOLUTION
        n = min(max(self.scaling.get("start_tokens", 0) - offset, 0), L)  # rows still before n_hat
        rotated = mx.fast.rope(x[..., n:, :], self.dims, traditional=self.traditional, base=None, scale=1.0,
                               offset=offset + n, freqs=freqs)
        if n == 0:
            return rotated
        early = mx.fast.rope(x[..., :n, :], self.dims, traditional=self.traditional, base=self.base, scale=1.0,
                             offset=offset)
        return mx.concatenate([early, rotated], axis=-2)
        # END SOLUTION


# ---------------------------------------------------------------- LongRoPE's search, on an mlx-lm model

def model_rope(model) -> tuple[int, float, int, dict]:
    """``(head_dim, base, T0, rope_scaling)`` of an mlx-lm model, from its config (``model.args``)."""
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    scaling = check_rope_scaling(rope_scaling_from_config(args), head_dim)
    T0 = scaling.get("original_max_position_embeddings") or args.max_position_embeddings
    return head_dim, float(args.rope_theta), T0, scaling


def perplexity(model, sequences, rope_scaling: dict | None = None) -> float:
    """The model's perplexity on ``sequences`` (rows of token ids, one length) with its RoPE replaced by
    ``ScaledRoPE(rope_scaling)`` in every layer for this call only (None: the model's own)."""
    head_dim, base, _, _ = model_rope(model)
    rows = mx.array(np.asarray(sequences, dtype=np.int32))
    layers = model.layers
    before = [layer.self_attn.rope for layer in layers]
    if rope_scaling is not None:
        rope = ScaledRoPE(head_dim, base, rope_scaling, traditional=getattr(before[0], "traditional", False))
        for layer in layers:
            layer.self_attn.rope = rope
    try:
        nll = 0.0
        for row in rows:  # one row at a time: the peak is one row's scores
            logits = model(row[None, :-1])
            nll += float(nn.losses.cross_entropy(logits[0], row[1:], reduction="mean"))
    finally:
        for layer, rope in zip(layers, before):
            layer.self_attn.rope = rope
    return math.exp(nll / len(rows))


def seed_factors(factor: float, head_dim: int, base: float, T0: int) -> dict[str, np.ndarray]:
    """The search's starting points, as LongRoPE factor vectors for an extension by ``factor``: PI,
    NTK-aware (base ``* factor ** (D / (D - 2))``) and YaRN (exact: its inverse frequencies, not its
    factors, are the ramp's blend) with transformers' defaults."""
    theta = np.array(_original(head_dim, base), np.float64)
    ntk = (base * factor ** (head_dim / (head_dim - 2))) ** (-np.arange(0, head_dim, 2) / head_dim)
    yarn = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T0}
    return {"pi": np.full(head_dim // 2, float(factor)), "ntk": theta / ntk,
            "yarn": rescale_factors(yarn, head_dim, base)}


def search_longrope(model, target_length: int, *, sequences, rope_scaling: dict | None = None,
                    **search) -> dict:
    """LongRoPE's search on an mlx-lm ``model``: the ``rope_scaling`` dict (``rope_type: longrope``)
    whose factors give the lowest perplexity on ``sequences`` (held-out rows of ``target_length + 1``
    tokens). Beyond the training length ``T0`` it searches ``long_factor`` from PI, NTK and YaRN;
    at or below ``T0``, ``short_factor`` for ``rope_scaling`` (the long search's result), the
    paper's last step. ``search``: ``population=64, parents=32, mutations=16, crossovers=16,
    generations=40, probability=0.3, start_tokens=START_TOKENS, seed=0, progress=True, record=None``
    (``rope_search.search_factors``; ``record``, a dict, receives the seeds' perplexities and the
    history)."""
    target_length = check_positive_int("target_length", target_length)
    head_dim, base, T0, _ = model_rope(model)
    rows = np.asarray(sequences)
    if rows.ndim != 2 or rows.shape[1] != target_length + 1 or not len(rows):
        raise ValueError(f"sequences must be rows of target_length + 1 = {target_length + 1} token ids, "
                         f"got shape {rows.shape}")
    if rope_scaling is not None:
        rope_scaling = check_rope_scaling(rope_scaling, head_dim)
    return search_factors(lambda scaling: perplexity(model, rows, scaling), target_length, T0, head_dim,
                          seed_factors(max(target_length / T0, 1.0), head_dim, base, T0),
                          rope_scaling=rope_scaling, **search)


__all__ = ["SCALINGS", "ScaledRoPE", "perplexity", "rescale_factors", "rope_frequencies", "search_longrope",
           "seed_factors"]
