# Learner stub for Task 13, generated from solutions/week3/nn.py by `longctx stubs`.
# Replace each `raise NotImplementedError(...)` with your code; grade it with
#     pytest labs/week3 --task 13
"""Task 13: Drop-in attention modules (book chapter "Training with long-context attention").

Every technique as an ``mlx.nn.Module`` that trains.

``x (B, L, d_model) -> (B, L, d_model)``: q/k/v/o projections (GQA with ``n_kv_heads``), RoPE
on q and k (``rope=False`` to leave it out), the technique's attention, dropout on its output
(the fused kernels have no attention-probability dropout), then the output projection. The
technique is the registry's (``longctx.techniques``), with its own options; the gradient is
the technique's (``tests/test_gradients.py``). The weight names and layouts are the torch
mirror's (``longctx.torch.nn``): ``q_proj.weight (n_heads * head_dim, d_model)``, ... so weights
saved from one load into the other (``save_weights`` here, ``safetensors`` + ``load_state_dict``
there) and give the same outputs.

* ``create_efficient_attention(kind, d_model, n_heads=8, **options)``: any technique with an
  attention class, or ``full``; the seeds' kinds too (``sliding_window``, ``dilated``,
  ``sparse`` = BigBird, ``linear``).
* ``DilatedAttention(d_model, num_heads, dilation_rate, segment_size, dropout=0.0)``: LongNet's
  (``segment_size * dilation_rate ** i`` with dilation ``dilation_rate ** i``, ``num_levels``
  of them; or lists, as torchscale's ``segment_length`` and ``dilated_ratio``).
* ``FlashAttention(d_model, n_heads, dropout=0.0, causal=True, window_size=None)``: the best
  fused kernel this machine has for it; ``repr`` says which.
"""
from __future__ import annotations

import contextlib
import sys

import mlx.core as mx
import mlx.nn as nn

from longctx.techniques import attention_kind, bench_options, module_heads
from longctx.techniques.hierarchical import geometric_levels


class CausalAttention:
    """``full``: MLX's fused scaled-dot-product attention (causal, or every key)."""

    def __init__(self, causal: bool = True):
        self.causal = bool(causal)

    def __call__(self, q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                                    mask="causal" if self.causal else None)


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
        self.rope = nn.RoPE(hd, base=rope_base) if rope else None
        self.dropout = nn.Dropout(dropout)
        self.attend, self.kernel = attend, kernel or type(attend).__name__

    def __call__(self, x: mx.array) -> mx.array:
        """``x (B, L, d_model) -> (B, L, d_model)``. Project ``x`` to queries, keys and values and
        split each into heads, ``(B, heads, L, head_dim)`` (``n_heads`` for q, ``n_kv_heads`` for k
        and v: head ``h`` of a projection is its features ``h * head_dim ..``); turn q and k by
        ``self.rope`` (when there is one; v is never turned); ``self.attend(q, k, v)``; merge the
        heads back to ``(B, L, n_heads * head_dim)`` in the same order, then ``self.dropout`` and
        ``self.o_proj``. About 7 lines."""
        if x.ndim != 3 or x.shape[-1] != self.q_proj.weight.shape[1]:
            raise ValueError(f"x must be (B, L, d_model={self.q_proj.weight.shape[1]}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        raise NotImplementedError("Task 13: Attention.__call__ -- see the book chapter 'Training with long-context attention'")

    def _extra_repr(self) -> str:
        return (f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"rope={self.rope is not None}, kernel={self.kernel!r}")


_MODULE_OPTIONS = ("n_kv_heads", "rope", "rope_base", "dropout", "bias")


def create_efficient_attention(kind: str, d_model: int, n_heads: int = 8, **options) -> Attention:
    """An attention module running technique ``kind`` with its ``options`` (the registry's names
    and defaults; module options ``n_kv_heads``, ``rope``, ``rope_base``, ``dropout``, ``bias``)."""
    t = attention_kind(kind)
    module = {key: options.pop(key) for key in _MODULE_OPTIONS if key in options}
    if t.name == "full":
        attend = CausalAttention(**options)
    else:
        cls = t.resolve(__package__, t.attention)
        attend = cls(**bench_options(t.name, options))
    return Attention(d_model, n_heads, attend, **module)


def DilatedAttention(d_model: int, num_heads: int, dilation_rate=2, segment_size=64, dropout: float = 0.0, *,
                     num_levels: int = 3, causal: bool = True, **module) -> Attention:  # noqa: N802 (LongNet's name)
    """LongNet's ``DilatedAttention``: Task 2's levels, geometric in ``dilation_rate`` from ``segment_size``."""
    levels, dilations = geometric_levels(segment_size, dilation_rate, num_levels)
    cls = attention_kind("hierarchical").resolve(__package__, "HierarchicalAttention")
    return Attention(d_model, num_heads, cls(levels, dilations, causal=causal), dropout=dropout, **module)


def FlashAttention(d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = True,  # noqa: N802
                   window_size: int | None = None, **module) -> Attention:
    """OpenLongContext's ``FlashAttention``: MLX's fused SDPA, or with ``window_size`` Task 1's
    sliding window (its compiled kernel where one runs here); ``repr`` names the kernel."""
    if window_size is None:
        return Attention(d_model, n_heads, CausalAttention(causal), dropout=dropout,
                         kernel="mx.fast.scaled_dot_product_attention", **module)
    if not causal:
        raise ValueError("window_size is a causal sliding window: pass causal=True (or window_size=None)")
    cls = attention_kind("sliding").resolve(__package__, "SlidingWindowAttention")
    return Attention(d_model, n_heads, cls(window_size), dropout=dropout, kernel=_sliding_kernel(), **module)


@contextlib.contextmanager
def technique_attention(model, kind: str, **options):
    """Inside, the attention layers of ``model`` (an mlx-lm model: Qwen3, Llama, ...) run technique
    ``kind`` with ``options`` in place of full attention: causal self-attention over the tokens of
    each call, with no cache (training, and scoring whole rows). A technique that works in whole
    blocks (BigBird) gets each sequence padded at the end, which no earlier query sees. Not
    thread-safe: it swaps the attention function of the model's module while it runs."""
    t = attention_kind(kind)
    options = bench_options(t.name, options)
    if options.get("causal", True) is not True:
        raise ValueError(f"technique_attention runs a language model: {kind!r} must be causal, got causal="
                         f"{options['causal']!r}")
    attend = CausalAttention() if t.name == "full" else t.resolve(__package__, t.attention)(**options)
    multiple = options[t.whole_blocks] if t.whole_blocks else 1

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if cache is not None:
            raise ValueError(f"technique_attention({kind!r}) runs whole sequences without a cache; for decoding "
                             "use LongContextQwen3 with a strategy")
        if abs(scale - queries.shape[-1] ** -0.5) > 1e-6 * scale:
            raise ValueError(f"technique_attention takes the scale head_dim ** -0.5, got {scale}")
        L = queries.shape[2]
        pad = -L % multiple
        if pad:
            queries, keys, values = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (queries, keys, values))
        return attend(queries, keys, values)[:, :, :L]

    modules = {sys.modules[type(layer.self_attn).__module__] for layer in model.layers}
    before = {module: module.scaled_dot_product_attention for module in modules}
    for module in modules:
        module.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield model
    finally:
        for module, function in before.items():
            module.scaled_dot_product_attention = function


def _sliding_kernel() -> str:
    """Which sliding-window kernel runs on the default device (``SlidingWindowAttention``'s dispatch)."""
    if mx.default_device() == mx.gpu:
        return "fused Metal/CUDA sliding-window kernel (ops band tiles where it fails its check)"
    from longctx import native
    return "longctx compiled CPU sliding-window kernel" if native.available() else "ops band tiles (_blocked)"


__all__ = ["Attention", "CausalAttention", "DilatedAttention", "FlashAttention", "create_efficient_attention",
           "technique_attention"]
