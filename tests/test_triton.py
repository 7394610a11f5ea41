"""The torch mirror's Triton sliding-window kernel, run on the CPU by Triton's interpreter.

CI has no GPU, so the kernels' logic (band-only key tiles, online softmax, GQA,
the decode offset, head dims that are not powers of two, fp16/bf16; the backward's
log-sum-exp recomputation, rowsum(dO O) term and scales) is checked with
``TRITON_INTERPRET=1`` against the float64 oracle and float64 autograd. Triton reads that
variable when it decorates the kernel, so the check runs in a fresh process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from longctx import kernels
from longctx.testing import oracles
from longctx.torch import sliding

CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np, torch
    from longctx.torch import sliding
    from longctx.testing import assert_close, oracles
    from longctx.testing.gradients import assert_gradients_close, reference_grads, weighted
    from longctx.testing.inputs import make_qkv

    cases = [  # B, Hq, Hkv, Lq, Lk, D, W, dtype, std, block
        (1, 2, 1, 70, 70, 16, 20, torch.float32, 1.0, 16),   # L not a multiple of the tile, GQA
        (2, 4, 2, 33, 150, 32, 64, torch.float32, 1.0, 16),  # decode rows: Lq < Lk, batch 2
        (1, 2, 2, 1, 90, 16, 17, torch.float32, 1.0, 16),    # one decode step
        (1, 2, 2, 100, 100, 24, 1, torch.float32, 1.0, 16),  # window 1; D not a power of two
        (1, 2, 2, 50, 50, 80, 200, torch.float32, 1.0, 32),  # window > L; D = 80
        (1, 4, 2, 130, 130, 64, 48, torch.float32, 1.0, 64), # the default 64 x 64 tiles
        (1, 2, 2, 64, 64, 16, 30, torch.float16, 6.0, 16),   # fp16, large logits
        (1, 2, 1, 40, 40, 16, 9, torch.bfloat16, 6.0, 16),   # bf16, large logits
    ]
    for B, Hq, Hkv, Lq, Lk, D, W, dtype, std, block in cases:
        q, k, v = make_qkv(Lq + W, B, Hq, Hkv, Lq, Lk, D, std=std)
        q, k, v = (torch.tensor(x).to(dtype) for x in (q, k, v))
        if dtype == torch.float32:  # a strided view, as a model's transposed projections are
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        out = sliding._triton(q, k, v, W, D ** -0.5, block_m=block, block_n=block)
        assert out.dtype == dtype and out.shape == q.shape
        name = f"Triton sliding B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} W={W} {dtype}"
        inputs = [x.detach().double().numpy() for x in (q, k, v)]
        exact = oracles.sliding_window_attention(*inputs, W)
        tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        assert_close(out.detach().double().numpy(), exact, rtol=tol, atol=tol, name=name)
        w = torch.randn(q.shape, generator=torch.Generator().manual_seed(Lq)).to(dtype)
        out.backward(w)
        want = reference_grads(weighted(oracles.sliding_mask(Lq, Lk, W)), *inputs, w.double().numpy())
        assert_gradients_close([x.grad.double().numpy() for x in (q, k, v)], want, name=name,
                               tol={torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype])
    print("ok", len(cases))
""")


def test_triton_kernel_equals_the_oracle_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton has no macOS wheels; the dev extra installs it on Linux (CI)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "ok 8" in done.stdout, done.stdout + done.stderr[-3000:]


@pytest.fixture
def as_on_cuda(monkeypatch, tmp_path):
    """The dispatch as on a CUDA device (CPU tensors take the kernel), with a fresh process's
    kernel states and machine record."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_failed", {})
    monkeypatch.setattr(kernels, "_verified", {})
    monkeypatch.setattr(sliding, "_CHECKED", set())
    monkeypatch.setattr(sliding, "_triton_wanted", lambda q: kernels.usable("triton"))
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 30, 16, generator=g) for _ in range(3)]


def exact(q, k, v, window):
    return torch.from_numpy(oracles.sliding_window_attention(*(x.double().numpy() for x in (q, k, v)), window))


def test_a_kernel_that_fails_falls_back_to_sdpa_with_one_warning(monkeypatch, as_on_cuda):
    def broken(*args, **kwargs):
        raise RuntimeError("PTX: no kernel image is available")
    monkeypatch.setattr(sliding, "_triton", broken)
    q, k, v = as_on_cuda
    with pytest.warns(RuntimeWarning, match="triton kernel .* failed .*PTX: no kernel image"):
        out = sliding.SlidingWindowAttention(4)(q, k, v)
    torch.testing.assert_close(out.double(), exact(q, k, v, 4), rtol=1e-5, atol=1e-5)
    assert not kernels.usable("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the SDPA tiles from now on, with no second warning
        sliding.SlidingWindowAttention(4)(q, k, v)


def test_a_wrong_kernel_is_caught_by_its_check_and_sdpa_serves(monkeypatch, as_on_cuda):
    """A Triton kernel that runs but is wrong (here: the decode offset ignored) never answers."""
    calls = []

    def wrong(q, k, v, window, scale):
        calls.append(q.shape)
        return sliding._tiles(q, k[:, :, :q.shape[2]], v[:, :, :q.shape[2]], window, scale, torch.zeros(0, dtype=int))
    monkeypatch.setattr(sliding, "_triton", wrong)
    q, k, v = as_on_cuda
    with pytest.warns(RuntimeWarning, match=r"triton kernel .*float32, D=16, window <=64.* disagrees with the ops "
                                            r"path on a check input"):
        out = sliding.SlidingWindowAttention(7)(q, k, v)
    torch.testing.assert_close(out.double(), exact(q, k, v, 7), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and "disagrees" in kernels.status("triton", None)


def test_the_real_kernel_verifies_itself_in_the_interpreter(tmp_path):
    """The Triton kernel itself, under TRITON_INTERPRET=1, passes its own check and is recorded."""
    pytest.importorskip("triton", reason="Triton has no macOS wheels; the dev extra installs it on Linux (CI)")
    code = textwrap.dedent("""
        import torch
        from longctx import kernels
        from longctx.torch import sliding
        sliding._triton_wanted = lambda q: kernels.usable("triton")  # CPU tensors, as if on CUDA
        x = torch.randn(1, 2, 50, 16)
        with torch.no_grad():  # inference: the check still takes its gradients
            sliding.SlidingWindowAttention(5)(x, x, x)
        print(kernels.status("triton", None), len(kernels._recorded()))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "LONGCTX_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.stdout.strip() == "verified here: float32, D=16, window <=64 1", done.stdout + done.stderr[-3000:]
