"""The torch mirror's attention layers train: their gradients are those of dense float64 attention
under the same visibility (autograd through ``torch`` ops on the oracles' masks and counts). A
function wrapped in ``torch.no_grad`` would return an output with no graph and fail here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import longctx.torch as lt
from longctx.testing import oracles


def qkv(L, seed=0, Hq=4, Hkv=2, D=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, L, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv, Hq)]


def grads(fn, q, k, v, w):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    assert out.requires_grad, "the output has no graph: gradients are switched off"
    (out.double() * w).sum().backward()
    return [x.grad for x in (q, k, v)]


def weighted(counts):
    """Dense softmax attention where key j enters query i's softmax counts[h, i, j] times."""
    log = torch.log(torch.tensor(np.asarray(counts), dtype=torch.float64))

    def attend(q, k, v):
        r = q.shape[1] // k.shape[1]
        s = q @ k.repeat_interleave(r, 1).transpose(-1, -2) / q.shape[-1] ** 0.5 + log
        return torch.softmax(s, -1) @ v.repeat_interleave(r, 1)
    return attend


def assert_same(got, want):
    for name, a, b in zip("qkv", got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"d{name}: max error {float((a - b).abs().max()):.2e}"


@pytest.mark.parametrize("L, window, glob, causal", [(37, 6, (0, 9), True), (36, 6, (3,), False), (20, 1, (), True)])
def test_longformer_gradients(L, window, glob, causal):
    q, k, v, w = qkv(L)
    mask = oracles.longformer_mask(L, L, window, glob, causal).astype(np.float64)
    assert_same(grads(lambda q, k, v: lt.longformer_attention(q, k, v, window, glob, causal), q, k, v, w),
                grads(weighted(mask), q, k, v, w))


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_gradients(causal):
    q, k, v, w = qkv(48, seed=1)
    from longctx.torch.sparse import bigbird_random_blocks
    blocks = np.asarray(bigbird_random_blocks(6, 2, 0, heads=4, causal=causal))
    counts = oracles.bigbird_counts(4, 6, 8, blocks, causal)
    assert_same(grads(lambda q, k, v: lt.bigbird_attention(q, k, v, 8, 2, 0, causal), q, k, v, w),
                grads(weighted(counts[None]), q, k, v, w))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_linear_attention_gradients(chunk):
    q, k, v, w = qkv(21, seed=2)

    def dense(q, k, v):  # the quadratic form, phi = elu + 1
        r = q.shape[1] // k.shape[1]
        fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k.repeat_interleave(r, 1)) + 1
        a = torch.tril(fq @ fk.transpose(-1, -2))
        return (a @ v.repeat_interleave(r, 1)) / (a.sum(-1, keepdim=True) + 1e-6)
    assert_same(grads(lt.LinearAttention(chunk), q, k, v, w), grads(dense, q, k, v, w))
