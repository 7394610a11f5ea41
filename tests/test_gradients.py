"""Every technique trains: the gradient of each attention layer, in both backends, is the gradient of
dense float64 attention under the same visibility (torch autograd on the oracles' masks and counts),
and agrees with central finite differences of the layer's own forward.

A layer that switches gradients off (``torch.no_grad``), evaluates inside ``mx.grad`` (the tiled
paths' in-place writes), runs a compiled kernel with no backward, or carries a non-differentiable
log-sum-exp fails here. ``CASES`` must hold every technique that has an attention class.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx.techniques import TECHNIQUES
from longctx.techniques.hierarchical import check_levels
from longctx.testing import oracles

Hq, Hkv, D = 4, 2, 8


def weighted(counts):
    """Dense softmax attention in which key j enters query i's softmax ``counts[h, i, j]`` times
    (the queries are the last ``Lq`` of ``Lk`` positions)."""
    log = torch.log(torch.as_tensor(np.asarray(counts, dtype=np.float64)))

    def attend(q, k, v):
        r = q.shape[1] // k.shape[1]
        s = q @ k.repeat_interleave(r, 1).transpose(-1, -2) / q.shape[-1] ** 0.5 + log
        return torch.nan_to_num(torch.softmax(s, -1)) @ v.repeat_interleave(r, 1)
    return attend


def linear_dense(q, k, v):
    """Causal linear attention's quadratic form, phi = elu + 1."""
    r = q.shape[1] // k.shape[1]
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k.repeat_interleave(r, 1)) + 1
    a = torch.tril(fq @ fk.transpose(-1, -2))
    return (a @ v.repeat_interleave(r, 1)) / (a.sum(-1, keepdim=True) + 1e-6)


def sliding_counts(Lq, Lk, window, glob=()):
    pos = np.arange(Lk - Lq, Lk)[:, None]
    j = np.arange(Lk)[None]
    return oracles.sliding_mask(Lq, Lk, window) | (np.isin(j, glob) & (j <= pos))


def hierarchical_counts(L, levels, causal=True):
    levels, dilations = check_levels(levels, None)
    return sum(oracles.dilated_pairs(Hq, L, L, w, r, causal=causal).astype(np.float64)
               for w, r in zip(levels, dilations))


def memory_counts(q, k, context, top_k):
    """Each window of ``context`` queries: its own keys causally, and the earlier keys ``top_k``
    keeps (all with None); the selection is not differentiated, the kept scores are."""
    L = q.shape[2]
    counts = np.zeros((Hq, L, L))
    for s in range(0, L, context):
        e = min(L, s + context)
        counts[:, s:e, s:e] = np.tril(np.ones((e - s, e - s)))
        if s:
            counts[:, s:e, :s] = oracles.memory_top_k(q[:, :, s:e], k[:, :, :s], top_k)[0]
    return counts


def bigbird_counts(L, block, r, causal):
    from longctx.torch.sparse import bigbird_random_blocks
    blocks = np.asarray(bigbird_random_blocks(L // block, r, 0, heads=Hq, causal=causal))
    return oracles.bigbird_counts(Hq, L // block, block, blocks, causal)


def carried_state(m, cat):
    """Two calls of ``linear_attention``, the second from the first's state: the gradient must
    flow back through the state into the first call's keys and values."""
    def attend(q, k, v):
        a, state = m.linear_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], chunk_size=4)
        b, _ = m.linear_attention(q[:, :, 16:], k[:, :, 16:], v[:, :, 16:], state=state, chunk_size=4)
        return cat([a, b], 2)
    return attend


# technique -> cases: (id, (Lq, Lk), layer(backend package, concatenate) -> f(q, k, v), reference(q, k, v) -> f)
CASES = {
    "sliding": [
        *((f"window {w}", (37, 37), lambda m, cat, w=w: m.SlidingWindowAttention(w),
           lambda q, k, v, w=w: weighted(sliding_counts(37, 37, w))) for w in (1, 7, 64)),
        ("window 7, Lq < Lk", (20, 37), lambda m, cat: m.SlidingWindowAttention(7),
         lambda q, k, v: weighted(sliding_counts(20, 37, 7))),
        ("global tokens, Lq < Lk", (20, 37), lambda m, cat: m.SlidingWindowAttention(4, global_tokens=(0, 5, 30)),
         lambda q, k, v: weighted(sliding_counts(20, 37, 4, (0, 5, 30))))],
    "hierarchical": [
        (f"causal {c}", (37, 37), lambda m, cat, c=c: m.HierarchicalAttention([8, 32], causal=c),
         lambda q, k, v, c=c: weighted(hierarchical_counts(37, [8, 32], c))) for c in (True, False)],
    "ring": [("3 shards, tiles of 5", (37, 37), lambda m, cat: m.RingAttention(3, 5),
              lambda q, k, v: weighted(oracles.causal_mask(37, 37)))],
    "memory": [
        (f"top_k {t}", (37, 37), lambda m, cat, t=t: m.MemoryAttention(8, t),
         lambda q, k, v, t=t: weighted(memory_counts(q, k, 8, t))) for t in (None, 3)],
    "linear": [
        *((f"chunk {c}", (37, 37), lambda m, cat, c=c: m.LinearAttention(c), lambda q, k, v: linear_dense)
          for c in (1, 4, 64)),
        ("state carried across calls", (37, 37), carried_state, lambda q, k, v: linear_dense)],
    "longformer": [
        ("causal", (37, 37), lambda m, cat: m.LongformerAttention(6, (0, 9), causal=True),
         lambda q, k, v: weighted(oracles.longformer_mask(37, 37, 6, (0, 9), True))),
        ("bidirectional", (36, 36), lambda m, cat: m.LongformerAttention(6, (3,), causal=False),
         lambda q, k, v: weighted(oracles.longformer_mask(36, 36, 6, (3,), False)))],
    "bigbird": [
        (f"causal {c}", (48, 48), lambda m, cat, c=c: m.BigBirdAttention(8, 2, 0, causal=c),
         lambda q, k, v, c=c: weighted(bigbird_counts(48, 8, 2, c))) for c in (True, False)],
}


def test_every_technique_with_an_attention_class_is_here():
    assert set(CASES) == {n for n, t in TECHNIQUES.items() if t.attention}


def torch_grads(fn, q, k, v, w):
    q, k, v = (torch.tensor(x).requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    assert out.requires_grad, "the output has no graph: gradients are switched off"
    (out.double() * torch.tensor(w)).sum().backward()
    return [x.grad.double().numpy() for x in (q, k, v)]


class Backend:
    """A layer's forward and gradient on float32 numpy inputs, in one backend."""

    def __init__(self, name):
        self.name = name
        self.package = importlib.import_module(f"longctx.{name}")
        if name == "mlx":
            import mlx.core as mx
            self.mx, self.cat = mx, lambda xs, axis: mx.concatenate(xs, axis=axis)
        else:
            self.cat = lambda xs, axis: torch.cat(xs, dim=axis)

    def loss(self, layer, q, k, v, w) -> float:
        if self.name == "torch":
            with torch.no_grad():
                out = layer(*(torch.tensor(x, dtype=torch.float32) for x in (q, k, v)))
            return float((out.double() * torch.tensor(w)).sum())
        out = layer(*(self.mx.array(x.astype(np.float32)) for x in (q, k, v)))
        return float((np.array(out, dtype=np.float64) * w).sum())

    def grads(self, layer, q, k, v, w):
        if self.name == "torch":
            return torch_grads(lambda q, k, v: layer(q.float(), k.float(), v.float()), q, k, v, w)
        mx = self.mx
        wm = mx.array(w.astype(np.float32))
        g = mx.grad(lambda q, k, v: (layer(q, k, v) * wm).sum(), argnums=(0, 1, 2))(
            *(mx.array(x.astype(np.float32)) for x in (q, k, v)))
        return [np.array(x, dtype=np.float64) for x in g]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("name, case", [(n, c[0]) for n, cases in CASES.items() for c in cases])
def test_gradient_is_the_dense_oracles(backend, name, case):
    (_, (Lq, Lk), make, reference), = [c for c in CASES[name] if c[0] == case]
    rng = np.random.default_rng(len(case) + Lk)
    q, w = (rng.standard_normal((1, Hq, Lq, D)) for _ in range(2))
    k, v = (rng.standard_normal((1, Hkv, Lk, D)) for _ in range(2))
    b = Backend(backend)
    layer = make(b.package, b.cat)
    want = torch_grads(reference(q, k, v), q, k, v, w)
    got = b.grads(layer, q, k, v, w)
    scale = max(np.abs(g).max() for g in want)  # (a gradient may be 0: window 1's dq)
    for x, a, e in zip("qkv", got, want):
        err = np.abs(a - e).max() / scale
        assert err < 1e-4, f"{backend} {name} ({case}): d{x} is off by {err:.1e} of the largest gradient"
    # The layer's own finite differences along a random direction agree (float32: eps 1e-2, loose)
    u = [rng.standard_normal(x.shape) / np.sqrt(x.size) for x in (q, k, v)]
    eps = 1e-2
    plus = b.loss(layer, *(x + eps * d for x, d in zip((q, k, v), u)), w)
    minus = b.loss(layer, *(x - eps * d for x, d in zip((q, k, v), u)), w)
    analytic = sum(float((g * d).sum()) for g, d in zip(got, u))
    assert abs((plus - minus) / (2 * eps) - analytic) < 2e-2 * (abs(analytic) + scale), \
        f"{backend} {name} ({case}): the gradient disagrees with the layer's finite differences"
