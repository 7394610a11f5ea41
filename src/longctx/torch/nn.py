"""Drop-in attention modules in PyTorch, the mirror of ``longctx.mlx.nn`` (same names, arguments,
weight names and layouts: weights saved from one load into the other).

``x (B, L, d_model) -> (B, L, d_model)``: q/k/v/o projections (GQA), RoPE on q and k (the
rotate-half convention of mlx-lm's ``nn.RoPE`` and transformers' Qwen3), the technique's
attention, dropout on its output, the output projection.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from longctx.techniques import attention_kind, bench_options, module_heads
from longctx.techniques.hierarchical import geometric_levels


class CausalAttention:
    """``full``: torch's fused scaled-dot-product attention (causal, or every key)."""

    def __init__(self, causal: bool = True):
        self.causal = bool(causal)

    def __call__(self, q, k, v):
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                                          enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    """Projections, RoPE and dropout around ``attend(q, k, v)`` (``(B, H, L, head_dim)`` each)."""

    def __init__(self, d_model: int, n_heads: int, attend, *, n_kv_heads: int | None = None, rope: bool = True,
                 rope_base: float = 10_000.0, dropout: float = 0.0, bias: bool = False, kernel: str = ""):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = module_heads(d_model, n_heads, n_kv_heads)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * hd, bias=bias)
        self.k_proj = nn.Linear(d_model, Hkv * hd, bias=bias)
        self.v_proj = nn.Linear(d_model, Hkv * hd, bias=bias)
        self.o_proj = nn.Linear(H * hd, d_model, bias=bias)
        inv_freq = 1.0 / rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        self.register_buffer("inv_freq", inv_freq if rope else None, persistent=False)  # not a weight
        self.dropout = nn.Dropout(dropout)
        self.attend, self.kernel = attend, kernel or type(attend).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(f"x must be (B, L, d_model={self.q_proj.in_features}), got {tuple(x.shape)}")
        B, L, _ = x.shape

        def heads(y, n):
            return y.view(B, L, n, self.head_dim).transpose(1, 2)
        q, k = heads(self.q_proj(x), self.n_heads), heads(self.k_proj(x), self.n_kv_heads)
        v = heads(self.v_proj(x), self.n_kv_heads)
        if self.inv_freq is not None:
            angle = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq
            angle = torch.cat([angle, angle], dim=-1)[None]  # (1, L, head_dim): pairs (i, i + head_dim / 2)
            q, k = apply_rotary_pos_emb(q, k, angle.cos().to(q.dtype), angle.sin().to(q.dtype))
        out = self.attend(q, k, v).transpose(1, 2).reshape(B, L, -1)
        return self.o_proj(self.dropout(out))

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"rope={self.inv_freq is not None}, kernel={self.kernel!r}")


_MODULE_OPTIONS = ("n_kv_heads", "rope", "rope_base", "dropout", "bias")


def create_efficient_attention(kind: str, d_model: int, n_heads: int = 8, **options) -> Attention:
    """As ``longctx.mlx.nn.create_efficient_attention``."""
    t = attention_kind(kind)
    module = {key: options.pop(key) for key in _MODULE_OPTIONS if key in options}
    if t.name == "full":
        attend = CausalAttention(**options)
    else:
        attend = t.resolve(__package__, t.attention)(**bench_options(t.name, options))
    return Attention(d_model, n_heads, attend, **module)


def DilatedAttention(d_model: int, num_heads: int, dilation_rate=2, segment_size=64, dropout: float = 0.0, *,
                     num_levels: int = 3, causal: bool = True, **module) -> Attention:  # noqa: N802 (LongNet's name)
    """As ``longctx.mlx.nn.DilatedAttention``."""
    levels, dilations = geometric_levels(segment_size, dilation_rate, num_levels)
    cls = attention_kind("hierarchical").resolve(__package__, "HierarchicalAttention")
    return Attention(d_model, num_heads, cls(levels, dilations, causal=causal), dropout=dropout, **module)


def FlashAttention(d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = True,  # noqa: N802
                   window_size: int | None = None, **module) -> Attention:
    """As ``longctx.mlx.nn.FlashAttention``: torch's SDPA (its flash kernel where it has one), or
    with ``window_size`` Task 1's sliding window (the Triton kernel on CUDA for inference)."""
    if window_size is None:
        return Attention(d_model, n_heads, CausalAttention(causal), dropout=dropout,
                         kernel="torch scaled_dot_product_attention", **module)
    if not causal:
        raise ValueError("window_size is a causal sliding window: pass causal=True (or window_size=None)")
    cls = attention_kind("sliding").resolve(__package__, "SlidingWindowAttention")
    kernel = ("Triton sliding-window kernel (inference; training: SDPA band tiles)" if torch.cuda.is_available()
              else "SDPA band tiles")
    return Attention(d_model, n_heads, cls(window_size), dropout=dropout, kernel=kernel, **module)


__all__ = ["Attention", "CausalAttention", "DilatedAttention", "FlashAttention", "create_efficient_attention"]
