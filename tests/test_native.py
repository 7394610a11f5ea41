"""Issue 18: the compiled CPU sliding-window kernel (``longctx.native``) against the float64 oracle and
against its ops twin (``_blocked``), on awkward sizes; its memory; and the fallback when it cannot be built.
Issue 33: its compiled backward against float64 autograd of the same attention, on the same awkward sizes.

The kernel is built on first use (about 15 s here); CI has a compiler, so a kernel that fails to build
fails ``test_the_kernel_builds`` rather than skipping.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from longctx import native  # noqa: E402
from longctx.mlx import sliding  # noqa: E402
from longctx.testing import oracles  # noqa: E402
from longctx.testing.compare import assert_close  # noqa: E402
from longctx.testing.gradients import assert_gradients_close, reference_grads, weighted  # noqa: E402
from longctx.testing.inputs import make_qkv  # noqa: E402


def _mx(*arrays, dtype=mx.float32):
    return [mx.array(a.astype(np.float32)).astype(dtype) for a in arrays]


def _kernel(q, k, v, window, scale=None, dtype=mx.float32):
    out = native.sliding_window(*_mx(q, k, v, dtype=dtype), window, q.shape[-1] ** -0.5 if scale is None else scale)
    assert out is not None, native.status()
    assert out.dtype == dtype
    return np.array(out.astype(mx.float32)).astype(np.float64)


def test_the_kernel_builds():
    assert native.status().startswith("built"), native.status()


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), rep=st.sampled_from([1, 2, 4]), Lk=st.integers(1, 300),
       q_frac=st.sampled_from([1.0, 1.0, 0.5, 0.0]), D=st.sampled_from([1, 3, 8, 16, 24, 64, 80, 130]),
       window=st.integers(1, 320), seed=st.integers(0, 2 ** 16))
def test_kernel_equals_the_oracle_on_random_shapes(B, Hkv, rep, Lk, q_frac, D, window, seed):
    """Lq not a multiple of the 32-row block nor Lk of the 64-key tile, D not a multiple of the
    8-float vector, W = 1 and W >= L, GQA, the decode offset (Lq < Lk), batch > 1."""
    Lq = max(1, int(Lk * q_frac))
    q, k, v = make_qkv(seed, B, Hkv * rep, Hkv, Lq, Lk, D)
    assert_close(_kernel(q, k, v, window), oracles.sliding_window_attention(q, k, v, window), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype, tol", [(mx.float16, 2e-3), (mx.bfloat16, 2e-2)])
def test_kernel_keeps_low_precision_with_large_logits(dtype, tol):
    q, k, v = make_qkv(5, 1, 4, 2, 200, 200, 64, std=6.0)  # logits in the hundreds
    rounded = [np.array(x) for x in (mx.array(a.astype(np.float32)).astype(dtype).astype(mx.float32) for a in (q, k, v))]
    want = oracles.sliding_window_attention(*(r.astype(np.float64) for r in rounded), 45)
    assert_close(_kernel(q, k, v, 45, dtype=dtype), want, rtol=tol, atol=tol)


def test_kernel_equals_its_ops_twin_and_takes_a_custom_scale():
    q, k, v = make_qkv(11, 2, 6, 3, 129, 517, 40)
    ops = np.array(sliding._blocked(*_mx(q, k, v), 100, 0.3))
    assert_close(_kernel(q, k, v, 100, scale=0.3), ops, rtol=2e-5, atol=2e-5)
    assert_close(ops, oracles.sliding_window_attention(q, k, v, 100, scale=0.3), rtol=2e-5, atol=2e-5)


def test_kernel_reads_strided_and_lazy_inputs():
    """q, k, v as a model makes them: transposed views of (B, L, H, D) projections, not yet evaluated."""
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((2, 150, 3, 4, 16)).astype(np.float32))  # (B, L, qkv, H, D)
    q, k, v = ((x[:, :, i] * 1.0).transpose(0, 2, 1, 3) for i in range(3))  # lazy, strided
    out = native.sliding_window(q, k, v, 21, 0.25)
    want = oracles.sliding_window_attention(*(np.array(a).astype(np.float64) for a in (q, k, v)), 21, scale=0.25)
    assert_close(np.array(out), want, rtol=2e-5, atol=2e-5)


def test_other_dtypes_take_the_ops_path_and_the_op_refuses_them():
    """float64 is not a kernel dtype: the reference answers with the ops path (never a silently
    unwritten output), and the compiled op itself raises when the graph is built."""
    q, k, v = make_qkv(9, 1, 2, 1, 30, 30, 8)
    inputs = [mx.array(a).astype(mx.float64) for a in (q, k, v)]
    assert native.sliding_window(*inputs, 5, 0.5) is None
    out = sliding.SlidingWindowAttention(5)(*inputs)
    assert out.dtype == mx.float64
    assert_close(np.array(out), oracles.sliding_window_attention(q, k, v, 5), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        native._module().sliding_window(*inputs, 5, 0.5)


def test_the_reference_dispatches_to_the_kernel_on_the_cpu_without_global_tokens(monkeypatch):
    calls = []
    real = native.sliding_window
    monkeypatch.setattr(native, "sliding_window", lambda *args: calls.append(args) or real(*args))
    q, k, v = make_qkv(2, 1, 2, 1, 50, 50, 8)
    out = sliding.SlidingWindowAttention(7)(*_mx(q, k, v))
    assert len(calls) == 1
    assert_close(np.array(out), oracles.sliding_window_attention(q, k, v, 7), rtol=2e-5, atol=2e-5)
    out = sliding.SlidingWindowAttention(7, global_tokens=(0,))(*_mx(q, k, v))  # global tokens: the ops path
    assert len(calls) == 1
    assert_close(np.array(out), oracles.sliding_window_attention(q, k, v, 7, global_tokens=(0,)), rtol=2e-5, atol=2e-5)


def test_kernel_memory_is_the_output_only():
    """Beyond q, k, v, the output and its log-sum-exp (one float per query row, kept for the
    backward), the kernel allocates nothing through MLX (its tiles are per-thread buffers of a few
    KiB), at 2k and at 8k tokens alike."""
    def extra(L):
        q, k, v = (mx.random.normal((1, 4, L, 64)) for _ in range(3))
        mx.eval(q, k, v)
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = native.sliding_window(q, k, v, 256, 0.125)
        mx.eval(out)
        return mx.get_peak_memory() - base - out.nbytes - 4 * 4 * L
    assert extra(2048) <= 1 << 16 and extra(8192) <= 1 << 16


def _kernel_grads(q, k, v, w, window, dtype=mx.float32):
    q, k, v, w = _mx(q, k, v, w, dtype=dtype)
    grads = mx.vjp(lambda q, k, v: native.sliding_window(q, k, v, window, q.shape[-1] ** -0.5), [q, k, v], [w])[1]
    assert all(g.dtype == dtype for g in grads)
    return [np.array(g.astype(mx.float32)) for g in grads]


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.sampled_from([1, 3]), Lk=st.integers(1, 200),
       q_frac=st.sampled_from([1.0, 1.0, 0.4, 0.0]), D=st.sampled_from([1, 5, 8, 24, 64, 80]),
       window=st.integers(1, 220), seed=st.integers(0, 2 ** 16))
def test_kernel_backward_equals_float64_autograd_on_random_shapes(B, Hkv, rep, Lk, q_frac, D, window, seed):
    """The compiled band backward (log-sum-exp recomputation, dS = P (dO V^T - rowsum(dO O)), dQ and
    dK scaled, dK and dV summed over a kv head's query heads) on the sizes that break tiling: chunks
    of keys shorter than the window's reach, W = 1 and W >= L, D not a multiple of 8, Lq < Lk, batch."""
    Lq = max(1, int(Lk * q_frac))
    q, k, v = make_qkv(seed, B, Hkv * rep, Hkv, Lq, Lk, D)
    w = np.random.default_rng(seed + 1).standard_normal(q.shape)
    want = reference_grads(weighted(np.broadcast_to(oracles.sliding_mask(Lq, Lk, window), (Hkv * rep, Lq, Lk))),
                           q, k, v, w)
    assert_gradients_close(_kernel_grads(q, k, v, w, window), want, name="compiled sliding backward", tol=2e-5)


@pytest.mark.parametrize("dtype, tol", [(mx.float16, 4e-3), (mx.bfloat16, 3e-2)])
def test_kernel_backward_keeps_low_precision_with_large_logits(dtype, tol):
    q, k, v = make_qkv(5, 1, 4, 2, 150, 170, 64, std=4.0)  # logits near 100: exp overflows without the lse
    w = np.random.default_rng(6).standard_normal(q.shape)
    rounded = [np.array(mx.array(a.astype(np.float32)).astype(dtype).astype(mx.float32)) for a in (q, k, v, w)]
    want = reference_grads(weighted(np.broadcast_to(oracles.sliding_mask(150, 170, 45), (4, 150, 170))), *rounded)
    assert_gradients_close(_kernel_grads(q, k, v, w, 45, dtype=dtype), want, name=str(dtype), tol=tol)


def test_kernel_backward_memory_grows_as_L_not_L_times_W():
    """What the backward allocates through MLX is its three gradients (and the cotangent's copy);
    its scratch (dQ in float32, one float per row) lives outside MLX and is O(L * D) too."""
    def extra(L):
        q, k, v, w = (mx.random.normal((1, 4, L, 64)) for _ in range(4))
        out = native.sliding_window(q, k, v, 1024, 0.125)
        mx.eval(q, k, v, w, out)
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        grads = mx.vjp(lambda q, k, v: native.sliding_window(q, k, v, 1024, 0.125), [q, k, v], [w])[1]
        mx.eval(grads)
        return mx.get_peak_memory() - base - 3 * q.nbytes
    small, large = extra(2048), extra(8192)
    assert large <= 4 * small + (1 << 20), (small, large)  # linear in L (an L x W array would be 4 MiB per head at 1k)
    assert large <= 2 * 4 * 8192 * 64 * 4, large


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


CHECK = """
import warnings, numpy as np, longctx, mlx.core as mx
from longctx import native
from longctx.mlx.sliding import SlidingWindowAttention
from longctx.testing.inputs import make_qkv
from longctx.testing.oracles import sliding_window_attention
q, k, v = make_qkv(1, 1, 2, 1, 40, 40, 8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [np.array(SlidingWindowAttention(5)(*(mx.array(a.astype(np.float32)) for a in (q, k, v)))) for _ in range(2)]
assert all(np.allclose(o, sliding_window_attention(q, k, v, 5), rtol=2e-5, atol=2e-5) for o in outs)
print(len([w for w in caught if issubclass(w.category, RuntimeWarning)]), native.status())
"""


def test_without_a_compiler_the_ops_path_answers_with_one_warning(tmp_path):
    proc = _run(CHECK, CXX="/bin/false", LONGCTX_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    warnings, status = proc.stdout.split(" ", 1)
    assert warnings == "1" and status.startswith("not available: RuntimeError"), proc.stdout


def test_longctx_native_0_turns_the_kernel_off():
    proc = _run(CHECK, LONGCTX_NATIVE="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0 not available: turned off by LONGCTX_NATIVE=0"
