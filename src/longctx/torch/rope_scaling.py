"""Task 9 in PyTorch: PI, NTK, YaRN, Llama 3 and LongRoPE, the mirror of ``longctx.mlx``.

Same names and semantics as ``solutions/week3/rope_scaling.py`` (book chapter
"Task 9: Position extension"): ``rope_frequencies`` returns what transformers'
``ROPE_INIT_FUNCTIONS`` returns for the same ``rope_scaling`` dict;
``ScaledRoPE(x, offset)`` rotates ``x (B, H, L, D)``; its ``cos_sin`` gives
transformers' rotary embedding output, so ``LongContextQwen3`` can put it in
place of ``model.model.rotary_emb``. The evolutionary search works on candidates,
not arrays: it is the reference's (``longctx.mlx.rope_search``, NumPy only,
which loads no MLX); only the perplexity that scores a candidate runs here.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from longctx.checks import check_positive_int
from longctx.techniques.rope import check_rope_scaling, rope_scaling_from_config
from .rope_search import search_factors


def _original(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _default(s, head_dim, base, seq_len):
    return _original(head_dim, base), 1.0


def _linear(s, head_dim, base, seq_len):
    return _original(head_dim, base) / s["factor"], 1.0


def _dynamic(s, head_dim, base, seq_len):
    T0 = s["original_max_position_embeddings"]
    L = max(seq_len or T0, T0)
    return _original(head_dim, base * (s["factor"] * L / T0 - (s["factor"] - 1)) ** (head_dim / (head_dim - 2))), 1.0


def _yarn_pair(rotations, head_dim, base, T0):
    return head_dim * math.log(T0 / (rotations * 2 * math.pi)) / (2 * math.log(base))


def _mscale(factor, mscale=1.0):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(s, head_dim, base, seq_len):
    T0, factor = s["original_max_position_embeddings"], s["factor"]
    lo, hi = _yarn_pair(s["beta_fast"], head_dim, base, T0), _yarn_pair(s["beta_slow"], head_dim, base, T0)
    if s["truncate"]:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    theta = _original(head_dim, base)
    inv_freq = theta * (1 - ramp) + theta / factor * ramp
    if s.get("attention_factor") is not None:
        attention_factor = s["attention_factor"]
    elif s.get("mscale") and s.get("mscale_all_dim"):
        attention_factor = _mscale(factor, s["mscale"]) / _mscale(factor, s["mscale_all_dim"])
    else:
        attention_factor = _mscale(factor)
    return inv_freq, float(attention_factor)


def _llama3(s, head_dim, base, seq_len):
    T0, factor = s["original_max_position_embeddings"], s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    theta = _original(head_dim, base)
    wavelength = 2 * math.pi / theta
    smooth = (T0 / wavelength - low) / (high - low)
    between = (1 - smooth) * theta / factor + smooth * theta
    return torch.where(wavelength < T0 / high, theta, torch.where(wavelength > T0 / low, theta / factor, between)), 1.0


def _longrope(s, head_dim, base, seq_len):
    T0 = s["original_max_position_embeddings"]
    factors = s["long_factor"] if seq_len and seq_len > T0 else s["short_factor"]
    inv_freq = _original(head_dim, base) / torch.tensor(factors, dtype=torch.float32)
    if s.get("attention_factor") is not None:
        return inv_freq, s["attention_factor"]
    return inv_freq, 1.0 if s["factor"] <= 1 else math.sqrt(1 + math.log(s["factor"]) / math.log(T0))


SCALINGS = {"default": _default, "linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3,
            "longrope": _longrope}
CACHED_LENGTHS = 16  # ScaledRoPE keeps the frequencies of this many lengths


def _check_base(base) -> float:
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not 1 < base < float("inf"):
        raise ValueError(f"base must be a finite number > 1, got {base!r}")
    return float(base)


def rope_frequencies(rope_scaling: dict | None, head_dim: int, base: float,
                     seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq (head_dim / 2,) float32, attention_factor)``, as ``ROPE_INIT_FUNCTIONS``."""
    s = check_rope_scaling(rope_scaling, head_dim)
    if seq_len is not None:
        check_positive_int("seq_len", seq_len)
    return SCALINGS[s["rope_type"]](s, head_dim, _check_base(base), seq_len)


def rescale_factors(rope_scaling: dict | None, head_dim: int, base: float, seq_len: int | None = None) -> np.ndarray:
    """LongRoPE's view of any method: ``lambda_i = theta_i / theta'_i`` (float64)."""
    inv_freq, _ = rope_frequencies(rope_scaling, head_dim, base, seq_len)
    return _original(head_dim, base).double().numpy() / inv_freq.double().numpy()


class ScaledRoPE(torch.nn.Module):
    """RoPE with any scaling: ``rope(x, offset)`` rotates ``x (B, H, L, D)``; ``cos_sin`` feeds
    transformers' attention. ``seq_len`` as in MLX: the length ``dynamic``/``longrope`` choose by
    (None: the positions of each call)."""

    def __init__(self, head_dim: int, base: float, rope_scaling: dict | None = None, traditional: bool = False):
        super().__init__()
        self.scaling = check_rope_scaling(rope_scaling, head_dim)
        self.dims, self.base, self.traditional = head_dim, _check_base(base), bool(traditional)
        self.seq_len = None
        self._cache = {}

    def frequencies(self, seq_len: int) -> tuple[torch.Tensor, float]:
        """``(inv_freq, attention_factor)`` at ``seq_len``."""
        kind = self.scaling["rope_type"]
        key = seq_len if kind == "dynamic" else (
            seq_len > self.scaling["original_max_position_embeddings"] if kind == "longrope" else None)
        if key not in self._cache:
            if len(self._cache) >= CACHED_LENGTHS:  # dynamic's key grows with every decoded token
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = SCALINGS[kind](self.scaling, self.dims, self.base, seq_len)
        return self._cache[key]

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(positions.shape + (D/2,))`` float32 angles and the attention factor; positions below
        ``start_tokens`` turn at the original frequencies."""
        seq_len = self.seq_len or int(positions.max()) + 1
        inv_freq, factor = self.frequencies(seq_len)
        p = positions.float()[..., None]
        angle = p * inv_freq.to(positions.device)
        n = self.scaling.get("start_tokens", 0)
        if n:
            angle = torch.where(p < n, p * _original(self.dims, self.base).to(positions.device), angle)
        return angle, factor

    def cos_sin(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' rotary embedding output ``(cos, sin)``, each ``(B, L, D)`` in ``x``'s dtype."""
        angle, factor = self.angles(position_ids)
        emb = torch.cat([angle, angle], dim=-1)
        return (emb.cos() * factor).to(x.dtype), (emb.sin() * factor).to(x.dtype)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        L, D = x.shape[-2], x.shape[-1]
        angle, factor = self.angles(torch.arange(int(offset), int(offset) + L, device=x.device))
        cos, sin = angle.cos(), angle.sin()  # (L, D/2)
        xf = x.float()
        a, b = (xf[..., 0:self.dims:2], xf[..., 1:self.dims:2]) if self.traditional else (
            xf[..., :self.dims // 2], xf[..., self.dims // 2:self.dims])
        ra, rb = a * cos - b * sin, b * cos + a * sin
        rotated = torch.stack([ra, rb], -1).flatten(-2) if self.traditional else torch.cat([ra, rb], -1)
        return (torch.cat([rotated, xf[..., self.dims:]], -1) * factor).to(x.dtype) if D > self.dims else (
            (rotated * factor).to(x.dtype))


# ---------------------------------------------------------------- LongRoPE's search, on a transformers model

class RotaryEmbedding(torch.nn.Module):
    """``ScaledRoPE`` in the place of ``model.model.rotary_emb`` (``(x, position_ids) -> (cos, sin)``)."""

    def __init__(self, rope: ScaledRoPE):
        super().__init__()
        self.rope = rope

    def forward(self, x, position_ids):
        return self.rope.cos_sin(x, position_ids)


def model_rope(model) -> tuple[int, float, int, dict]:
    """``(head_dim, base, T0, rope_scaling)`` of a transformers model, from ``model.config``."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = check_rope_scaling(rope_scaling_from_config(config), head_dim)
    T0 = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    return head_dim, float(base), T0, scaling


def perplexity(model, sequences, rope_scaling: dict | None = None) -> float:
    """Perplexity on ``sequences`` with ``ScaledRoPE(rope_scaling)`` in place of the model's rotary
    embedding for this call only (None: the model's own)."""
    head_dim, base, _, _ = model_rope(model)
    rows = torch.as_tensor(np.asarray(sequences, dtype=np.int64), device=model.device)
    before = model.model.rotary_emb
    if rope_scaling is not None:
        model.model.rotary_emb = RotaryEmbedding(ScaledRoPE(head_dim, base, rope_scaling))
    try:
        nll = 0.0
        for row in rows:
            logits = model(input_ids=row[None, :-1], use_cache=False).logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, row[1:]))
    finally:
        model.model.rotary_emb = before
    return math.exp(nll / len(rows))


def seed_factors(factor: float, head_dim: int, base: float, T0: int) -> dict[str, np.ndarray]:
    """PI, NTK-aware and exact YaRN as LongRoPE factor vectors (see the MLX reference)."""
    theta = _original(head_dim, base).double().numpy()
    ntk = (base * factor ** (head_dim / (head_dim - 2))) ** (-np.arange(0, head_dim, 2) / head_dim)
    yarn = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T0}
    return {"pi": np.full(head_dim // 2, float(factor)), "ntk": theta / ntk,
            "yarn": rescale_factors(yarn, head_dim, base)}


def search_longrope(model, target_length: int, *, sequences, rope_scaling: dict | None = None,
                    **search) -> dict:
    """LongRoPE's search on a transformers ``model``: the ``rope_scaling`` dict (``rope_type: longrope``)
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
