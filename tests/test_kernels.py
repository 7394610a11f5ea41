"""The fused Task 1 kernels against the oracle, on the GPU that can run them.

Metal runs only on Apple GPUs and the CUDA twin only on MLX's CUDA backend:
these tests skip elsewhere. On every machine, the ops path (the kernels' twin)
is graded by labs/week3, and the dispatch is checked here.
"""
import shutil
import subprocess
import warnings

import mlx.core as mx
import numpy as np
import pytest

from longctx import kernels
from longctx.testing import assert_close
from longctx.testing.oracles import sliding_window_attention

sliding = pytest.importorskip("longctx.mlx.sliding")
on_gpu = mx.metal.is_available() or mx.cuda.is_available()


def test_dispatch_takes_the_ops_path_on_cpu_and_unsupported_head_dims():
    previous = mx.default_device()
    try:
        mx.set_default_device(mx.cpu)
        assert sliding._fused_kernel_for(mx.zeros((1, 1, 4, 64))) is None
        if on_gpu:
            mx.set_default_device(mx.gpu)
            assert sliding._fused_kernel_for(mx.zeros((1, 1, 4, 64))) is not None
            assert sliding._fused_kernel_for(mx.zeros((1, 1, 4, 48))) is None
    finally:
        mx.set_default_device(previous)


@pytest.fixture
def as_on_a_gpu(monkeypatch, tmp_path):
    """The dispatch as on an Apple GPU, with a fresh process's kernel states and machine record."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_failed", {})
    monkeypatch.setattr(kernels, "_verified", {})
    monkeypatch.setattr(sliding, "_CHECKED", set())
    monkeypatch.setattr(sliding, "_backend", lambda: "metal")
    monkeypatch.setattr(sliding, "_fused_kernel_for", lambda q: "metal" if kernels.usable("metal") else None)
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 2, 40, 64)).astype(np.float32) for _ in range(3)]


def test_a_kernel_that_fails_to_compile_falls_back_to_the_ops_path_with_one_warning(monkeypatch, as_on_a_gpu):
    """The Metal kernel has not run on a Mac yet: if its first compile or launch raises, the call
    still returns the right values (the ops path), with one warning, and later calls skip the kernel."""
    launched = []

    def broken(**kwargs):
        launched.append(kwargs)
        raise RuntimeError("Unable to build metal library from source")
    monkeypatch.setattr(sliding, "_kernel", lambda backend: broken)
    q, k, v = as_on_a_gpu
    attn = sliding.SlidingWindowAttention(9)
    with pytest.warns(RuntimeWarning, match="metal kernel .* failed .*Unable to build metal library") as caught:
        out = attn(*map(mx.array, (q, k, v)))
    assert_close(np.array(out), sliding_window_attention(q, k, v, 9), rtol=1e-4, atol=1e-4)
    assert len(caught) == 1 and len(launched) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn(*map(mx.array, (q, k, v)))  # no second warning, no second launch
    assert len(launched) == 1
    assert kernels.status("metal", None).startswith("fell back to the ops path: RuntimeError: Unable to build")


def test_a_wrong_kernel_is_caught_by_its_check_and_the_ops_path_serves(monkeypatch, as_on_a_gpu):
    """A kernel that compiles and runs but is wrong (here: its window one too wide) never answers:
    its first use compares it with the ops path, warns once with the error, and the ops path
    serves the rest of the process."""
    calls = []

    def wrong(q, k, v, window, scale):
        calls.append(q.shape)
        return sliding._blocked(q, k, v, window + 1, scale)
    monkeypatch.setattr(sliding, "_fused", wrong)
    q, k, v = as_on_a_gpu
    attn = sliding.SlidingWindowAttention(9)
    with pytest.warns(RuntimeWarning, match=r"metal kernel .*float32, D=64, window <=64.* disagrees with the "
                                            r"ops path on a check input: max abs error"):
        out = attn(*map(mx.array, (q, k, v)))
    assert_close(np.array(out), sliding_window_attention(q, k, v, 9), rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sliding.SlidingWindowAttention(200)(*map(mx.array, (q, k, v)))  # another window class: still ops
    assert_close(np.array(out), sliding_window_attention(q, k, v, 200), rtol=1e-4, atol=1e-4)
    assert len(calls) == 1, "only the check input ever met the wrong kernel"
    assert "disagrees" in kernels.status("metal", None) and not kernels._recorded()


def test_a_right_kernel_is_verified_once_per_configuration_and_machine(monkeypatch, as_on_a_gpu):
    calls = []

    def right(q, k, v, window, scale):
        calls.append(q.shape)
        return sliding._blocked(q, k, v, window, scale)
    monkeypatch.setattr(sliding, "_fused", right)
    q, k, v = as_on_a_gpu
    for window in (9, 12, 300, 1):  # classes <=64, <=64 again, >64, 1: three checks, four real calls
        out = sliding.SlidingWindowAttention(window)(*map(mx.array, (q, k, v)))
        assert_close(np.array(out), sliding_window_attention(q, k, v, window), rtol=1e-4, atol=1e-4)
    assert [s[2] for s in calls] == [41, 40, 40, 232, 40, 33, 40]  # check input (Lk - 5 rows), then the call
    assert kernels.status("metal", None) == ("verified here: float32, D=64, window 1; float32, D=64, window <=64; "
                                             "float32, D=64, window >64")
    assert len(kernels._recorded()) == 3
    monkeypatch.setattr(kernels, "_verified", {})  # a new process on the same machine: no check runs again
    calls.clear()
    sliding.SlidingWindowAttention(9)(*map(mx.array, (q, k, v)))
    assert [s[2] for s in calls] == [40]


@pytest.mark.skipif(not on_gpu, reason="needs an Apple GPU (Metal) or MLX's CUDA backend")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, W", [(1, 4, 2, 100, 100, 64, 17), (2, 8, 8, 1, 300, 128, 64),
                                                      (1, 2, 1, 37, 260, 32, 1), (1, 6, 3, 70, 70, 96, 500)])
def test_fused_kernel_equals_oracle(dtype, B, Hq, Hkv, Lq, Lk, D, W):
    rng = np.random.default_rng(D + W)
    q = rng.standard_normal((B, Hq, Lq, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, Lk, D)).astype(np.float32) for _ in range(2))
    xs = [mx.array(x).astype(getattr(mx, dtype)) for x in (q, k, v)]
    assert sliding._fused_kernel_for(xs[0]) is not None
    out = sliding.SlidingWindowAttention(W)(*xs)
    assert out.dtype == xs[0].dtype
    seen = [np.array(x.astype(mx.float32)).astype(np.float64) for x in xs]
    tol = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}[dtype]
    assert_close(np.array(out.astype(mx.float32)), sliding_window_attention(*seen, W), rtol=tol, atol=tol)
    ops = sliding._blocked(*xs, W, D ** -0.5)
    assert_close(np.array(out.astype(mx.float32)), np.array(ops.astype(mx.float32)), rtol=tol, atol=tol)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_kernel_body_compiles_for_every_dtype(tmp_path):
    """Without a GPU, nvcc still checks the CUDA twin's body: wrapped in the
    signature mx.fast.cuda_kernel generates, for float32, float16 and bfloat16."""
    types = {"float": "float", "__half": "__half", "__nv_bfloat16": "__nv_bfloat16"}
    instances = "\n".join(
        f"template __global__ void longctx_sliding<{t}, {d}, {w}>(const {t}*, const {t}*, const {t}*, "
        f"const int*, const float*, {t}*);" for t, d, w in zip(types, (64, 128, 32), (512, 1, 7)))
    (tmp_path / "k.cu").write_text(
        "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
        "template <typename T, int D, int W>\n__global__ void longctx_sliding(const T* q, const T* k, const T* v, "
        "const int* dims, const float* scale, T* out) {\n" + sliding._kernel_source("cuda") + "}\n" + instances + "\n")
    proc = subprocess.run(["nvcc", "-c", "k.cu", "-o", "k.o"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
