"""The torch mirror's Triton sliding-window kernel, run on the CPU by Triton's interpreter.

CI has no GPU, so the kernel's logic (band-only key tiles, online softmax, GQA,
the decode offset, head dims that are not powers of two, fp16/bf16) is checked
with ``TRITON_INTERPRET=1`` against the float64 oracle. Triton reads that
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

from longctx.torch import sliding

CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np, torch
    from longctx.torch import sliding
    from longctx.testing import assert_close, oracles
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
        out = sliding._triton(q, k, v, W, D ** -0.5, block_m=block, block_n=block)
        assert out.dtype == dtype and out.shape == q.shape
        exact = oracles.sliding_window_attention(*(x.double().numpy() for x in (q, k, v)), W)
        tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        assert_close(out.double().numpy(), exact, rtol=tol, atol=tol,
                     name=f"Triton sliding B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} W={W} {dtype}")
    print("ok", len(cases))
""")


def test_triton_kernel_equals_the_oracle_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton has no macOS wheels; the dev extra installs it on Linux (CI)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "ok 8" in done.stdout, done.stdout + done.stderr[-3000:]


def test_a_kernel_that_fails_falls_back_to_sdpa_with_one_warning(monkeypatch):
    monkeypatch.setattr(sliding, "_FAILED", set())
    monkeypatch.setattr(sliding, "_CHECKED", set())

    def broken(*args, **kwargs):
        raise RuntimeError("PTX: no kernel image is available")
    monkeypatch.setattr(sliding, "_triton", broken)
    q = torch.randn(1, 2, 8, 16)
    with pytest.warns(RuntimeWarning, match="Triton sliding-window kernel failed"):
        assert sliding._triton_checked(q, q, q, 4, 0.25) is None
    assert sliding._FAILED == {"triton"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU path never tries the kernel, and never warns again
        sliding.SlidingWindowAttention(4)(q, q, q)
