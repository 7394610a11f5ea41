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
from longctx.testing import oracles
from longctx.testing.backends import make_backend
from longctx.testing.gradients import assert_gradients_close, linear_quadratic, reference_grads, weighted

Hq, Hkv, D = 4, 2, 8


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
           lambda q, k, v, w=w: weighted(oracles.sliding_mask(37, 37, w))) for w in (1, 7, 64)),
        ("window 7, Lq < Lk", (20, 37), lambda m, cat: m.SlidingWindowAttention(7),
         lambda q, k, v: weighted(oracles.sliding_mask(20, 37, 7))),
        ("global tokens, Lq < Lk", (20, 37), lambda m, cat: m.SlidingWindowAttention(4, global_tokens=(0, 5, 30)),
         lambda q, k, v: weighted(oracles.sliding_mask(20, 37, 4, (0, 5, 30))))],
    "hierarchical": [
        (f"causal {c}", (37, 37), lambda m, cat, c=c: m.HierarchicalAttention([8, 32], causal=c),
         lambda q, k, v, c=c: weighted(oracles.hierarchical_counts(Hq, 37, 37, [8, 32], causal=c)))
        for c in (True, False)],
    "ring": [("3 shards, tiles of 5", (37, 37), lambda m, cat: m.RingAttention(3, 5),
              lambda q, k, v: weighted(oracles.causal_mask(37, 37)))],
    "memory": [
        (f"top_k {t}", (37, 37), lambda m, cat, t=t: m.MemoryAttention(8, t),
         lambda q, k, v, t=t: weighted(oracles.memory_counts(q, k, 8, t))) for t in (None, 3)],
    "linear": [
        *((f"chunk {c}", (37, 37), lambda m, cat, c=c: m.LinearAttention(c), lambda q, k, v: linear_quadratic)
          for c in (1, 4, 64)),
        ("state carried across calls", (37, 37), carried_state, lambda q, k, v: linear_quadratic)],
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


def loss(backend, layer, q, k, v, w) -> float:
    """``sum(layer(q, k, v) * w)`` in the backend, no gradient: the finite differences' side."""
    arrays = make_backend(backend)
    return float((arrays.numpy(layer(*(arrays.asarray(x) for x in (q, k, v)))) * w).sum())


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("name, case", [(n, c[0]) for n, cases in CASES.items() for c in cases])
def test_gradient_is_the_dense_oracles(backend, name, case):
    (_, (Lq, Lk), make, reference), = [c for c in CASES[name] if c[0] == case]
    rng = np.random.default_rng(len(case) + Lk)
    q, w = (rng.standard_normal((1, Hq, Lq, D)) for _ in range(2))
    k, v = (rng.standard_normal((1, Hkv, Lk, D)) for _ in range(2))
    package = importlib.import_module(f"longctx.{backend}")
    cat = (lambda xs, axis: torch.cat(xs, dim=axis)) if backend == "torch" else \
        (lambda xs, axis: importlib.import_module("mlx.core").concatenate(xs, axis=axis))
    layer = make(package, cat)
    got = make_backend(backend).grads(layer, q, k, v, w)
    want = reference_grads(reference(q, k, v), q, k, v, w)
    assert_gradients_close(got, want, name=f"{backend} {name} ({case})")
    # The layer's own finite differences along a random direction agree (float32: eps 1e-2, loose)
    scale = max(np.abs(g).max() for g in want)
    u = [rng.standard_normal(x.shape) / np.sqrt(x.size) for x in (q, k, v)]
    eps = 1e-2
    plus = loss(backend, layer, *(x + eps * d for x, d in zip((q, k, v), u)), w)
    minus = loss(backend, layer, *(x - eps * d for x, d in zip((q, k, v), u)), w)
    analytic = sum(float((g * d).sum()) for g, d in zip(got, u))
    assert abs((plus - minus) / (2 * eps) - analytic) < 2e-2 * (abs(analytic) + scale), \
        f"{backend} {name} ({case}): the gradient disagrees with the layer's finite differences"


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_bench_backward_rows(backend, tmp_path):
    """``longctx bench --backward``: forward and forward+backward times and peak memory per technique,
    the ratio to full attention's at the same length, and a named skip past the memory limit."""
    import json

    from longctx import bench, cli
    techniques = bench.techniques_for(["full", "sliding", "linear"], 16)
    rows = bench.backward_rows(backend, techniques, [96], heads=2, head_dim=16, repeats=1)
    assert [r["technique"] for r in rows] == ["full", "sliding", "linear"]
    for r in rows:
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 and r["peak_memory_bytes"] > 0, r
    assert rows[0]["x_full"] == 1.0
    skipped = bench.backward_rows(backend, techniques, [96], heads=2, head_dim=16, repeats=1, memory_limit=1000)
    assert all(r["skipped"].startswith("needs ~") and r["forward_ms"] is None for r in skipped)
    assert cli.main(["bench", "--backward", "--backend", backend, "--lengths", "64", "--techniques", "full,ring",
                     "--heads", "2", "--dim", "16", "--repeats", "1", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "backward.json").read_text())["rows"]
    assert {r["technique"] for r in written} == {"full", "ring"}


def test_torch_streaming_trains_inside_each_chunk():
    """``StreamingProcessor.process_stream`` (torch) gives logits a loss can train through; the sink
    cache keeps values, not graph, so a long stream's memory does not grow with its history."""
    from longctx.models import torch_qwen3
    from longctx.torch import StreamingProcessor
    model = torch_qwen3(0)
    processor = StreamingProcessor(chunk_size=16, sink_tokens=2, window=8)
    chunks = list(processor.process_stream(range(3, 51), model))
    assert all(c.requires_grad for c in chunks), "the logits carry no gradient"
    chunks[-1].logsumexp(-1).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert not any(layer.keys.requires_grad or layer.values.requires_grad for layer in processor.caches.layers)
