"""The array façade: one face for each backend, so a graded test runs unchanged on MLX and torch.

Inputs are made in numpy (``numpy.random.default_rng``) and converted here,
so every implementation sees the same numbers. Where the two libraries'
cache protocols differ (mlx-lm: one cache object per layer with
``update_and_fetch`` and ``offset``; transformers: one ``Cache`` holding
``layers``, updated with ``update(k, v, layer)``), the difference lives here,
never in a test.
"""
from __future__ import annotations

import numpy as np

from longctx import measure


class MLXBackend:
    name = "mlx"

    def __init__(self):
        import mlx.core as mx
        self.mx = mx
        # The fused kernels (a stretch exercise) run on an Apple GPU or MLX's CUDA backend.
        self.gpu_kernels = mx.metal.is_available() or mx.cuda.is_available()

    def asarray(self, a, dtype: str = "float32"):
        """``a`` as an array of ``dtype`` (a name both backends know: ``float16``, ``bool``, ...)."""
        return self.mx.array(np.asarray(a, dtype=np.float32)).astype(getattr(self.mx, {"bool": "bool_"}.get(dtype, dtype)))

    def numpy(self, x) -> np.ndarray:
        x = self.mx.array(x)
        if x.dtype == self.mx.bool_:
            return np.array(x)
        return np.array(x.astype(self.mx.float32)).astype(np.float64)

    def dtype_name(self, x) -> str:
        return str(x.dtype).removeprefix("mlx.core.")

    def seconds(self, fn, repeats: int = 5) -> float:
        return measure.mlx_seconds(fn, repeats=repeats)

    def race(self, *fns, rounds: int = 5) -> list[float]:
        """Each ``fn``'s fastest time, timed in turn (``measure.interleaved_seconds``)."""
        return measure.interleaved_seconds(*map(measure.mlx_blocking, fns), rounds=rounds)

    def peak_bytes(self, fn) -> int:
        return measure.mlx_peak_bytes(fn)

    def masked_attention(self, q, k, v, mask: np.ndarray, scale: float | None = None):
        """The naive baseline: MLX's fused SDPA with a dense boolean mask."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return self.mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=self.mx.array(mask))

    def cache_update(self, cache, k, v):
        """One layer's update: the keys and values attention then sees."""
        return cache.update_and_fetch(k, v)

    def cache_layers(self, caches) -> list:
        """The per-layer objects of a model's cache (mlx-lm: the list itself; one cache: itself)."""
        return list(caches) if isinstance(caches, (list, tuple)) else [caches]

    def cache_offset(self, cache) -> int:
        """Tokens a layer's cache has seen: the position the next one gets."""
        return cache.offset

    def model_cache(self, make, model):
        """A whole model's cache from a one-layer ``make()``: one per layer in mlx-lm."""
        return [make() for _ in model.layers]

    def grads(self, fn, q, k, v, w) -> list[np.ndarray]:
        """``[dq, dk, dv]`` (float64 numpy) of ``sum(fn(q, k, v) * w)``, the inputs in float32:
        what training through ``fn`` computes (``mx.grad``)."""
        mx = self.mx
        wm = mx.array(np.asarray(w, dtype=np.float32))
        g = mx.grad(lambda q, k, v: (fn(q, k, v).astype(mx.float32) * wm).sum(), argnums=(0, 1, 2))(
            *(self.asarray(x) for x in (q, k, v)))
        return [np.array(x, dtype=np.float64) for x in g]

    def rope(self, head_dim: int, base: float = 10_000.0):
        """``(rope, rotate)``: the RoPE a one-layer cache takes (mlx-lm's ``nn.RoPE``), and
        ``rotate(x, offset)``, numpy in and out, what it does to keys at positions ``offset ..``."""
        import mlx.nn as nn
        rope = nn.RoPE(head_dim, base=base)
        return rope, lambda x, offset: self.numpy(rope(self.asarray(x), offset=offset))


class TorchBackend:
    name = "torch"

    def __init__(self, device: str | None = None):
        import torch
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.gpu_kernels = False  # the torch mirror has no fused-kernel stretch exercise

    def asarray(self, a, dtype: str = "float32"):
        t = self.torch.from_numpy(np.asarray(a, dtype=np.float32))
        return t.to(device=self.device, dtype=getattr(self.torch, dtype))

    def numpy(self, x) -> np.ndarray:
        x = self.torch.as_tensor(x).detach().cpu()
        if x.dtype == self.torch.bool:
            return x.numpy()
        return x.double().numpy()

    def dtype_name(self, x) -> str:
        return str(x.dtype).removeprefix("torch.")

    def seconds(self, fn, repeats: int = 5) -> float:
        return measure.torch_seconds(fn, repeats=repeats)

    def race(self, *fns, rounds: int = 5) -> list[float]:
        return measure.interleaved_seconds(*map(measure.torch_blocking, fns), rounds=rounds)

    def peak_bytes(self, fn) -> int:
        return measure.torch_peak_bytes(fn, self.device)

    def masked_attention(self, q, k, v, mask: np.ndarray, scale: float | None = None):
        """The naive baseline: torch SDPA with a dense boolean mask."""
        m = self.torch.from_numpy(mask).to(q.device)
        return self.torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=m, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    def cache_update(self, cache, k, v):
        """A model's cache (``Cache``): its layer 0; one layer's cache (a ``DynamicLayer``): itself."""
        return cache.update(k, v, 0) if hasattr(cache, "layers") else cache.update(k, v)

    def cache_layers(self, caches) -> list:
        return list(caches.layers) if hasattr(caches, "layers") else [caches]

    def cache_offset(self, cache) -> int:
        return cache.get_seq_length()

    def model_cache(self, make, model):
        """A transformers ``Cache`` makes its layers as the model reaches them."""
        return make()

    def grads(self, fn, q, k, v, w) -> list[np.ndarray]:
        """As MLX's, by autograd; an output with no graph (a layer under ``torch.no_grad``) fails."""
        torch = self.torch
        q, k, v = (self.asarray(x).requires_grad_() for x in (q, k, v))
        out = fn(q, k, v)
        if not out.requires_grad:
            raise AssertionError("the output has no graph: gradients are switched off (torch.no_grad?)")
        (out.float() * self.asarray(w)).sum().backward()
        return [x.grad.double().cpu().numpy() for x in (q, k, v)]

    def rope(self, head_dim: int, base: float = 10_000.0):
        """As MLX's: transformers' Qwen3 rotary embedding (what a one-layer cache takes as ``rope``)
        and ``rotate(x, offset)``."""
        from transformers import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb
        config = Qwen3Config(head_dim=head_dim, hidden_size=4 * head_dim, num_attention_heads=4,
                             rope_parameters={"rope_type": "default", "rope_theta": base})
        rope = Qwen3RotaryEmbedding(config)

        def rotate(x, offset):
            x = self.asarray(x)
            cos, sin = rope(x, self.torch.arange(offset, offset + x.shape[2], device=x.device)[None])
            return self.numpy(apply_rotary_pos_emb(x, x, cos, sin)[1])
        return rope, rotate


def make_backend(name: str):
    if name == "mlx":
        return MLXBackend()
    if name == "torch":
        return TorchBackend()
    raise ValueError(f"backend must be 'mlx' or 'torch', got {name!r}")
