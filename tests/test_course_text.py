"""The course text's own calls (``shared/seeds``), exactly as learners arrive with them, on both backends.

Each call is written as the text writes it, and its values are checked against
the float64 oracles (``longctx.testing.oracles``) or the base model.
"""
import importlib

import numpy as np
import pytest

from longctx.testing import assert_close
from longctx.testing.oracles import (attention, causal_mask, hierarchical_attention, kept_indices, n_kept,
                                     sliding_mask, sliding_window_attention)

BACKENDS = ["mlx", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """``(package, to_array, to_numpy, models)`` for one backend."""
    if request.param == "mlx":
        import mlx.core as mx
        return (importlib.import_module("longctx.mlx"), lambda x: mx.array(np.asarray(x)),
                lambda x: np.array(x.astype(mx.float32) if x.dtype != mx.bool_ else x).astype(np.float64),
                "mlx")
    import torch
    return (importlib.import_module("longctx.torch"), lambda x: torch.as_tensor(np.asarray(x)),
            lambda x: x.detach().cpu().double().numpy() if x.dtype != torch.bool else x.cpu().numpy(), "torch")


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_sliding_window_attention(backend):
    lib, arr, npy, _ = backend
    attn = lib.SlidingWindowAttention(window_size=512)
    assert (npy(attn.create_sliding_mask(600)) == sliding_mask(600, 600, 512)).all()
    q, k, v = randn(1, 2, 700, 16, seed=1), randn(1, 2, 700, 16, seed=2), randn(1, 2, 700, 16, seed=3)
    assert_close(npy(attn.sliding_attention(arr(q), arr(k), arr(v))), sliding_window_attention(q, k, v, 512),
                 rtol=1e-4, atol=1e-4)


def test_hierarchical_forward_of_x_is_self_attention(backend):
    lib, arr, npy, _ = backend
    x = randn(1, 4, 700, 16, seed=4)
    out = lib.HierarchicalAttention(levels=[64, 512, 4096]).hierarchical_forward(arr(x))
    assert_close(npy(out), hierarchical_attention(x, x, x, [64, 512, 4096]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="k and v"):
        lib.HierarchicalAttention().hierarchical_forward(arr(x), arr(x))


def test_ring_attention_step_with_ring_position_fourth(backend):
    """Query shard 0 folds in every kv shard of a ring of 4: it sees shard 0 causally, and
    nothing of the later shards (``query_position`` defaults to 0)."""
    lib, arr, npy, _ = backend
    ring_size, n = 4, 40
    q, k, v = randn(1, 2, 4 * n, 16, seed=5), randn(1, 2, 4 * n, 16, seed=6), randn(1, 2, 4 * n, 16, seed=7)
    ring = lib.RingAttention(ring_size, block_size=1024)
    state = None
    for ring_position in range(ring_size):
        s = ring_position * n
        state = ring.ring_attention_step(arr(q[:, :, :n]), arr(k[:, :, s:s + n]), arr(v[:, :, s:s + n]),
                                         ring_position, state)
    assert_close(npy(ring.finalize(state)), attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], causal_mask(n, n)),
                 rtol=1e-4, atol=1e-4)
    first = ring.ring_attention_step(arr(q[:, :, :n]), arr(k[:, :, :n]), arr(v[:, :, :n]), 0)
    assert_close(npy(first.out), attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], causal_mask(n, n)),
                 rtol=1e-4, atol=1e-4)


def test_context_compressor(backend):
    lib, arr, npy, _ = backend
    compressor = lib.ContextCompressor(compression_ratio=0.5)
    L = 100
    tokens = np.random.default_rng(8).integers(0, 1000, L)
    importance_scores = randn(L, seed=9)
    kept = compressor.compress_context(arr(tokens), arr(importance_scores))
    want = kept_indices(importance_scores[None].astype(np.float64), n_kept(L, 0.5), 4, 32)[0]
    assert (npy(kept.positions) == want).all() and (npy(kept.tokens) == tokens[want]).all()

    # compute_importance: SnapKV (the default) from softmax weights of 3 heads over the ids
    logits = randn(3, L, L, seed=10) + np.where(causal_mask(L, L), 0, -np.inf)
    attention_weights = np.exp(logits - logits.max(-1, keepdims=True))
    attention_weights /= attention_weights.sum(-1, keepdims=True)
    scores = npy(compressor.compute_importance(arr(tokens), arr(attention_weights.astype(np.float32))))
    w = 32
    received = attention_weights[:, -w:].astype(np.float64).mean(axis=1)  # (heads, L)
    padded = np.pad(received[:, :L - w], [(0, 0), (2, 2)])
    pooled = sum(padded[:, j:j + L - w] for j in range(5)) / 5  # avg_pool1d(5), zeros counted
    assert_close(scores[:L - w], pooled.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert np.isinf(scores[L - w:]).all() and (scores[L - w:] > 0).all(), "the observation window is kept"


def bigram_model(backend_name, vocab=50, seed=11):
    """A model without a cache: row t of its logits depends on tokens t-1 and t only, so one token of
    overlap gives every chunk the context a full forward has."""
    a, b = randn(vocab, vocab, seed=seed), randn(vocab, vocab, seed=seed + 1)

    def full(ids):
        ids = np.asarray(ids)
        prev = np.concatenate([[0], ids[:-1]])
        return a[ids] + b[prev] * (np.arange(len(ids)) > 0)[:, None]
    if backend_name == "mlx":
        import mlx.core as mx
        return full, lambda x: mx.array(full(np.array(x)[0]))[None]
    import torch
    return full, lambda x: torch.from_numpy(full(x[0].numpy()))[None]


def test_streaming_processor_merges_without_state_from_an_earlier_call(backend):
    lib, arr, npy, name = backend
    full, model = bigram_model(name)
    ids = np.random.default_rng(12).integers(0, 50, 5000).tolist()
    chunk_outputs = list(lib.StreamingProcessor(chunk_size=2048, overlap=256).process_stream(iter(ids), model))
    assert [len(out) for out in chunk_outputs] == [2048, 2048, 904], "each chunk's new tokens, one row each"
    merged = lib.StreamingProcessor(chunk_size=2048, overlap=256).merge_chunk_outputs(chunk_outputs)
    assert_close(npy(merged), full(ids), rtol=1e-6, atol=1e-6, name="merged by a fresh processor")


def test_streaming_processor_with_a_cached_model_equals_one_forward(backend):
    lib, arr, npy, name = backend
    from longctx import models
    model = models.mlx_qwen3(0) if name == "mlx" else models.torch_qwen3(0)
    ids = np.random.default_rng(13).integers(0, 256, 90).tolist()
    p = lib.StreamingProcessor(chunk_size=32, overlap=8, window=256)
    merged = p.merge_chunk_outputs(list(p.process_stream(iter(ids), model)))
    whole = lib.LongContextQwen3(model, context_strategy="full").process_long_sequence(ids)[0]
    assert_close(npy(merged), npy(whole), rtol=2e-4, atol=2e-4)


def test_adaptive_context_manager():
    from longctx.mlx import AdaptiveContextManager as MLXManager
    from longctx.torch import AdaptiveContextManager as TorchManager
    history = [{"role": "user", "content": "Hello, I need help planning the release."},
               {"role": "assistant", "content": "Sure. What is the date?"}]
    for Manager in (MLXManager, TorchManager):
        manager = Manager(max_context=32768)
        prompt = manager.manage_context(history, "It is on Friday.")
        assert all(m["content"] in prompt for m in history) and prompt.index("planning") < prompt.index("Friday")
        text = ("The weather was nice and we walked around the old town. It is important to back up the database "
                "before the upgrade. We had coffee and talked. The team decided to ship version two. Everyone must "
                "review the design. The launch is on Friday. Maria will lead the migration. That was fun.")
        assert manager.extract_key_points(text) == [
            "It is important to back up the database before the upgrade.", "The team decided to ship version two.",
            "Everyone must review the design.", "The launch is on Friday.", "Maria will lead the migration."]


def test_benchmark_long_context_defaults_are_the_course_texts():
    """``benchmark_long_context()`` as written runs the text's three cases (50k, 100k, 200k tokens)
    with the sub-quadratic techniques: minutes on a laptop, so here its defaults are checked and
    one short length is run with them."""
    import inspect

    from longctx.mlx import benchmark_long_context as mlx_bench
    from longctx.techniques import SUBQUADRATIC
    from longctx.torch import benchmark_long_context as torch_bench
    for bench, backend in ((mlx_bench, "mlx"), (torch_bench, "torch")):
        defaults = inspect.signature(bench).parameters
        assert defaults["techniques"].default is None and defaults["lengths"].default == (50_000, 100_000, 200_000)
        rows = bench(lengths=(512,), repeats=1, heads=2, head_dim=16)
        assert [r.technique for r in rows] == list(SUBQUADRATIC) and all(r.median_ms > 0 for r in rows), backend


def test_long_context_qwen3_takes_tokens_as_mlx_lm_passes_them(backend):
    """``tokens`` of shape ``(1, L)`` (mlx-lm's batch of one) or ``(L,)``; the default strategy,
    hierarchical (levels 2048, 8192, 32768), equals the float64 Qwen3 with LongNet's attention."""
    lib, arr, npy, name = backend
    from longctx import models
    from longctx.models import TINY_QWEN3
    from longctx.testing.oracles import qwen3_logits
    model = models.mlx_qwen3(0) if name == "mlx" else models.torch_qwen3(0)
    ids = np.random.default_rng(14).integers(0, 256, 70)
    long = lib.LongContextQwen3(model, context_strategy="hierarchical")
    batch = npy(long.process_long_sequence(arr(ids[None])))
    flat = npy(long.process_long_sequence(arr(ids)))
    weights = {k: t.detach().numpy() for k, t in models.torch_qwen3(0).state_dict().items()}
    want = qwen3_logits(weights, TINY_QWEN3, ids,
                        lambda i, q, k, v: hierarchical_attention(q, k, v, [2048, 8192, 32768]))
    assert batch.shape == (1, 70, 256)
    assert_close(batch, flat, rtol=0, atol=0, name="(1, L) and (L,) give the same logits")
    assert_close(batch[0], want, rtol=1e-4, atol=1e-4, name="hierarchical vs the float64 oracle")
