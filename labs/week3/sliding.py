# Learner stub for Task 1, generated from solutions/week3/sliding.py by `longctx stubs`.
# Replace each `raise NotImplementedError(...)` with your code; grade it with
#     pytest labs/week3 --task 1
"""Task 1: sliding-window attention (book chapter "Sliding-window attention").

The query at absolute position ``p`` sees the keys ``p - window_size < j <= p``:
``window_size`` keys, itself included (FlashAttention's
``window_size=(window_size - 1, 0)``; one decode step of mlx-lm's
``RotatingKVCache(max_size=window_size)``). Queries are the last ``Lq`` of the
``Lk`` positions, so a decode step (``Lq < Lk``) is offset by ``Lk - Lq``.

Two implementations, one contract:

* ``_blocked`` (the readable ops version, used on the CPU): queries are cut into
  blocks of ``block`` rows; each block needs only the ``block + window_size - 1``
  keys that end at its last row, so scores are ``(block, ~window)`` tiles and
  time and memory grow as ``Lq * window_size``, never ``Lq * Lk``.
* ``_fused`` (Apple GPU through ``mx.fast.metal_kernel``, NVIDIA GPU through its
  ``mx.fast.cuda_kernel`` twin): one thread per query row walks its window
  with an online softmax, never writing a score to memory.
"""
from __future__ import annotations

import functools
import math

import mlx.core as mx

from longctx.checks import check_attention, check_positive_int, check_scale

LOG2E = math.log2(math.e)
# Elements of the (rows x keys) score tiles computed per step of the CPU path:
# it bounds peak memory and keeps two steps in flight on two CPU streams.
TILE_ELEMENTS = 1 << 21


class SlidingWindowAttention:
    """Causal attention restricted to the last ``window_size`` positions."""

    def __init__(self, window_size: int = 512, scale: float | None = None):
        raise NotImplementedError("Task 1: SlidingWindowAttention.__init__ -- see the book chapter 'Sliding-window attention'")

    def create_sliding_mask(self, seq_len: int, offset: int = 0) -> mx.array:
        """Boolean ``(seq_len, offset + seq_len)``: row ``i`` is the query at
        position ``offset + i``; ``True`` where it may attend."""
        raise NotImplementedError("Task 1: SlidingWindowAttention.create_sliding_mask -- see the book chapter 'Sliding-window attention'")

    def sliding_attention(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` -> ``(B, Hq, Lq, D)``, dtype of ``q``."""
        raise NotImplementedError("Task 1: SlidingWindowAttention.sliding_attention -- see the book chapter 'Sliding-window attention'")

    __call__ = sliding_attention


def _blocked(q, k, v, window: int, scale: float) -> mx.array:
    """The band-blocked ops version: exact, O(Lq * window) time and memory."""
    raise NotImplementedError("Task 1: _blocked -- see the book chapter 'Sliding-window attention'")


def _windows(x, b0: int, b1: int, block: int, nprev: int) -> mx.array:
    """Rows ``[b * block, b * block + (nprev + 1) * block)`` of ``x`` for blocks ``b0 <= b < b1``."""
    raise NotImplementedError("Task 1: _windows -- see the book chapter 'Sliding-window attention'")


@functools.cache
def _cpu_streams():
    # MLX runs each CPU op on one thread; a second stream lets the next tile's
    # exp2 and matmuls run on the other core.
    return mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)


# ---------------------------------------------------------------- fused kernels
# One thread per query row: scores live in registers, the softmax is online
# (running max m, denominator l, rescaled accumulator), in float32 whatever the
# input dtype. The two bodies differ only in spelling.

_METAL_SOURCE = """
    uint row = thread_position_in_grid.x;
    int B = dims[0], Hq = dims[1], Hkv = dims[2], Lq = dims[3], Lk = dims[4];
    if (row >= uint(B * Hq * Lq)) return;
    int i = row % Lq, h = (row / Lq) % Hq, b = row / (Lq * Hq);
    int p = Lk - Lq + i;
    size_t kv = size_t(b * Hkv + h / (Hq / Hkv)) * Lk * D;
    float qf[D], acc[D];
    for (int d = 0; d < D; ++d) { qf[d] = float(q[size_t(row) * D + d]) * scale[0]; acc[d] = 0.0f; }
    float m = -3.0e38f, l = 0.0f;
    for (int j = max(0, p - W + 1); j <= p; ++j) {
        float s = 0.0f;
        for (int d = 0; d < D; ++d) s += qf[d] * float(k[kv + size_t(j) * D + d]);
        float m_new = max(m, s), corr = exp2(m - m_new), e = exp2(s - m_new);
        l = l * corr + e;
        for (int d = 0; d < D; ++d) acc[d] = acc[d] * corr + e * float(v[kv + size_t(j) * D + d]);
        m = m_new;
    }
    for (int d = 0; d < D; ++d) out[size_t(row) * D + d] = T(acc[d] / l);
"""

_CUDA_SOURCE = """
    unsigned int row = blockIdx.x * blockDim.x + threadIdx.x;
    int B = dims[0], Hq = dims[1], Hkv = dims[2], Lq = dims[3], Lk = dims[4];
    if (row >= (unsigned int)(B * Hq * Lq)) return;
    int i = row % Lq, h = (row / Lq) % Hq, b = row / (Lq * Hq);
    int p = Lk - Lq + i;
    size_t kv = (size_t)(b * Hkv + h / (Hq / Hkv)) * Lk * D;
    float qf[D], acc[D];
    for (int d = 0; d < D; ++d) { qf[d] = static_cast<float>(q[(size_t)row * D + d]) * scale[0]; acc[d] = 0.0f; }
    float m = -3.0e38f, l = 0.0f;
    for (int j = max(0, p - W + 1); j <= p; ++j) {
        float s = 0.0f;
        for (int d = 0; d < D; ++d) s += qf[d] * static_cast<float>(k[kv + (size_t)j * D + d]);
        float m_new = fmaxf(m, s), corr = exp2f(m - m_new), e = exp2f(s - m_new);
        l = l * corr + e;
        for (int d = 0; d < D; ++d) acc[d] = acc[d] * corr + e * static_cast<float>(v[kv + (size_t)j * D + d]);
        m = m_new;
    }
    for (int d = 0; d < D; ++d) out[(size_t)row * D + d] = static_cast<T>(acc[d] / l);
"""

FUSED_HEAD_DIMS = (32, 64, 80, 96, 128)


@functools.cache
def _kernel(backend: str):
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    source = _METAL_SOURCE if backend == "metal" else _CUDA_SOURCE
    return make(name=f"longctx_sliding_{backend}", input_names=["q", "k", "v", "dims", "scale"],
                output_names=["out"], source=source)


def _fused_kernel_for(q):
    """The fused kernel for this device, or None (CPU, or a head dim it is not built for)."""
    if mx.default_device() != mx.gpu or q.shape[-1] not in FUSED_HEAD_DIMS:
        return None
    if mx.metal.is_available():
        return _kernel("metal")
    if mx.cuda.is_available():
        return _kernel("cuda")
    return None


def _fused(q, k, v, window: int, scale: float) -> mx.array:
    """Launch the fused kernel: one thread per (b, h, i) query row."""
    B, Hq, Lq, D = q.shape
    dims = mx.array([B, Hq, k.shape[1], Lq, k.shape[2]], dtype=mx.int32)
    rows = B * Hq * Lq
    (out,) = _fused_kernel_for(q)(
        inputs=[q, k, v, dims, mx.array([scale * LOG2E], dtype=mx.float32)],
        template=[("T", q.dtype), ("D", D), ("W", window)],
        grid=(rows, 1, 1), threadgroup=(min(256, rows), 1, 1),
        output_shapes=[q.shape], output_dtypes=[q.dtype],
    )
    return out
