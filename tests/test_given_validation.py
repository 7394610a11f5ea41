"""Argument checks that the labs *give* (``longctx.checks`` and the checks around each TODO): tested
here on both references, not graded, since a learner cannot break them (a graded point is for what
the learner writes). Each bad call raises a ``ValueError`` naming the argument. The tests of Tasks
1-8 keep their graded files' bodies, with the same ``lab`` and ``arrays`` faces."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx.testing.backends import make_backend
from longctx.testing.inputs import make_qkv
from longctx.testing.oracles import attention_weights

BACKENDS = ["mlx", "torch"]


def reference(backend: str, module: str):
    return importlib.import_module(f"longctx.{backend}.{module}")


class Reference:
    """``lab("sliding")``: the reference's module in the backend under test (as the graded ``lab``)."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, module: str):
        return reference(self.backend, module)


@pytest.fixture(params=BACKENDS)
def lab(request):
    return Reference(request.param)


@pytest.fixture
def arrays(lab):
    return make_backend(lab.backend)


@pytest.fixture
def tiny_model(lab):
    from longctx import models
    from longctx.testing.harness import _tiny
    return _tiny(lab.backend, models, {})


@pytest.fixture
def shipped_model(lab):
    from longctx.models import load_trained
    return load_trained(lab.backend)


@pytest.fixture(scope="module")
def tok():
    from longctx.models import tiny_tokenizer
    return tiny_tokenizer()


def compressor(lab, ratio=0.5, **kw):
    return lab("compression").ContextCompressor(ratio, **kw)


def processor(lab, chunk_size=8, overlap=0, **kw):
    return lab("streaming").StreamingProcessor(chunk_size, overlap, **kw)


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def run(lab, techniques, lengths, **kw):
    kw = {"repeats": 1, "heads": 2, "head_dim": 16, "backend": lab.backend, **kw}
    return lab("benchmark").benchmark_long_context(techniques, lengths, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, key", [
    ({"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 512, "short_factor": [1.0] * 16,
      "long_factor": [1.0] * 15}, "long_factor"),
    ({"rope_type": "linear", "factor": 0.5}, "factor"),
    ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ({"rope_type": "ntk-by-parts", "factor": 4.0}, "rope_type"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 512, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0}, "high_freq_factor"),
])
def test_bad_rope_scalings_raise(backend, bad, key):
    m = reference(backend, "rope_scaling")
    with pytest.raises(ValueError, match=key):
        m.rope_frequencies(bad, 32, 10_000.0)
    with pytest.raises(ValueError, match=key):
        m.ScaledRoPE(32, 10_000.0, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_memory_arguments_raise(backend):
    from longctx.models import mlx_qwen3, torch_qwen3
    arrays = make_backend(backend)
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 3, 8)), rng.standard_normal((1, 1, 3, 8)), rng.standard_normal((1, 1, 3, 8))
    mk, mv = rng.standard_normal((1, 1, 4, 8)), rng.standard_normal((1, 1, 4, 8))
    xs = [arrays.asarray(x) for x in (q, k, v, mk, mv)]
    m = reference(backend, "memory")
    model = (mlx_qwen3 if backend == "mlx" else torch_qwen3)(0)
    LC = reference(backend, "qwen3_long").LongContextQwen3
    for options, name in (({"top_k": 0}, "top_k"), ({"memory_layers": [2]}, "memory_layers"),
                          ({"memory_layers": [-1]}, "memory_layers"), ({"last_context_length": -1},
                                                                       "last_context_length"),
                          ({"last_context_length": 600, "context_length": 512}, "last_context_length")):
        with pytest.raises(ValueError, match=name):
            LC(model, "memory", **options)
    with pytest.raises(ValueError, match="memory_keys"):
        m.memory_attention(*xs[:3], arrays.asarray(mk[..., :4]), xs[4])
    with pytest.raises(ValueError, match="top_k"):
        m.memory_attention(*xs, top_k=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_linear_attention_input_raises(backend):
    arrays = make_backend(backend)
    m = reference(backend, "linear")
    x = arrays.asarray(np.ones((1, 2, 6, 4)))
    _, state = m.linear_attention(x, x, x)
    for chunk in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            m.linear_attention(x, x, x, chunk_size=chunk)
    with pytest.raises(ValueError, match="state"):
        m.linear_attention(x, x, x, state=(state[0], state[0]))
    with pytest.raises(ValueError, match="state"):
        m.linear_attention(x, x, x, state=state[0])
    with pytest.raises(ValueError, match="Lq"):
        m.linear_attention_quadratic(x[:, :, :3], x, x)
    with pytest.raises(ValueError, match="Lq"):
        m.linear_attention(arrays.asarray(np.ones((1, 2, 7, 4))), x, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_sparse_attention_input_raises(backend):
    arrays = make_backend(backend)
    sparse = reference(backend, "sparse")
    x = arrays.asarray(np.ones((1, 2, 16, 4)))
    for window in (3, 0, -2, 2.0):
        with pytest.raises(ValueError, match="window"):
            sparse.longformer_attention(x, x, x, window)
    for globals_ in ((16,), (-1,), (0.5,)):
        with pytest.raises(ValueError, match="global_tokens"):
            sparse.longformer_attention(x, x, x, 4, globals_)
    with pytest.raises(ValueError, match="Lq"):
        sparse.longformer_attention(x[:, :, :3], x, x, 4)  # bidirectional needs Lq == Lk
    with pytest.raises(ValueError, match="block_size"):
        sparse.bigbird_attention(x, x, x, 5, 1, 0)  # 16 is not a multiple of 5
    for block in (0, -4):
        with pytest.raises(ValueError, match="block_size"):
            sparse.bigbird_attention(x, x, x, block, 1, 0)
    with pytest.raises(ValueError, match="num_random_blocks"):
        sparse.bigbird_attention(x, x, x, 4, -1, 0)
    with pytest.raises(ValueError, match="random_blocks"):
        sparse.bigbird_attention(x, x, x, 4, 1, 0, random_blocks=np.zeros((2, 3, 1), np.int64))


# ---------------------------------------------------------------- Tasks 1-8 (moved from their graded files)


def test_sliding_global_tokens_out_of_range_raise(lab, arrays):
    sliding = lab("sliding")
    x = arrays.asarray(np.ones((1, 2, 8, 4)))
    attn = sliding.SlidingWindowAttention(window_size=2, global_tokens=(0, 7))
    assert arrays.numpy(attn(x, x, x)).shape == (1, 2, 8, 4)
    with pytest.raises(ValueError, match="global_tokens"):
        sliding.SlidingWindowAttention(window_size=2, global_tokens=(8,))(x, x, x)
    for bad in ((-1,), (1.5,), "0"):
        with pytest.raises(ValueError, match="global_tokens"):
            sliding.SlidingWindowAttention(window_size=2, global_tokens=bad)


def test_sliding_bad_input_raises_naming_the_argument(lab, arrays):
    """The given checks (``longctx.checks``, called before your code) refuse bad input with a
    ``ValueError`` naming the argument; good input around them still computes."""
    sliding = lab("sliding")
    attn = sliding.SlidingWindowAttention(window_size=4)
    x = arrays.asarray(np.ones((1, 2, 8, 4)))
    assert arrays.numpy(attn(x, x, x)).shape == (1, 2, 8, 4) and arrays.numpy(attn.create_sliding_mask(3)).shape == (3, 3)
    for window in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="window_size"):
            sliding.SlidingWindowAttention(window_size=window)
    for shapes, match in [(((2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4)), "q"),  # q is 3-D
                          (((1, 3, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4)), "Hq=3"),  # Hq % Hkv != 0
                          (((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 9, 4)), "k and v"),
                          (((1, 2, 9, 4), (1, 2, 8, 4), (1, 2, 8, 4)), "Lq=9"),
                          (((1, 2, 8, 4), (1, 2, 8, 5), (1, 2, 8, 5)), "head dim"),
                          (((2, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4)), "batch")]:
        with pytest.raises(ValueError, match=match):
            attn(*(arrays.asarray(np.zeros(shape)) for shape in shapes))
    for seq_len, offset, match in [(0, 0, "seq_len"), (4, -1, "offset")]:
        with pytest.raises(ValueError, match=match):
            attn.create_sliding_mask(seq_len, offset)


def test_hierarchical_bad_input_raises_naming_the_argument(lab, arrays):
    """The given checks refuse bad levels, dilations, scales and shapes with a ``ValueError``
    naming the argument; good input around them still computes."""
    q, k, v = make_qkv(0, 1, 4, 2, 16, 16, 8)
    Q, K, V = arrays.asarray(q), arrays.asarray(k), arrays.asarray(v)
    mod = lab("hierarchical")
    assert arrays.numpy(mod.HierarchicalAttention([8, 16])(Q, K, V)).shape == (1, 4, 16, 8)
    for kwargs, word in [(dict(levels=[]), "levels"), (dict(levels=[0, 8]), "levels"),
                         (dict(levels=[8, 16], dilations=[2, 2]), "dilations"),
                         (dict(levels=[8, 16], dilations=[1]), "dilations"),
                         (dict(levels=[8, 16], dilations=[1, 32]), "dilation"),
                         (dict(levels=[8], dilations=[0]), "dilations"), (dict(levels=[8], scale=-1.0), "scale")]:
        with pytest.raises(ValueError, match=word):
            mod.HierarchicalAttention(**kwargs)
    for args, word in (((0, 1), "segment_size"), ((8, 0), "dilation"), ((4, 8), "dilation")):
        with pytest.raises(ValueError, match=word):
            mod.dilated_attention(Q, K, V, *args)
    with pytest.raises(ValueError, match="heads"):
        mod.dilated_attention(arrays.asarray(make_qkv(0, 1, 3, 2, 16, 16, 8)[0]), K, V, 8, 1)
    with pytest.raises(ValueError, match="head dim"):
        mod.HierarchicalAttention([8])(Q, arrays.asarray(k[:, :, :, :4]), arrays.asarray(v[:, :, :, :4]))


def test_compression_bad_input_raises_naming_the_argument(lab, arrays):
    """The given checks refuse bad options and shapes, naming the argument; good input around
    them still computes."""
    q, k, v = make_qkv(0, 1, 4, 2, 6, 10, 8)
    snap, h2o = compressor(lab, method="snapkv"), compressor(lab, method="h2o")
    assert arrays.numpy(snap.compress_kv(arrays.asarray(k), arrays.asarray(v), arrays.asarray(q))[0]).shape[2] == 5
    for kwargs, match in [({"compression_ratio": 1.0}, "compression_ratio"),
                          ({"compression_ratio": -0.1}, "compression_ratio"),
                          ({"compression_ratio": True}, "compression_ratio"),
                          ({"compression_ratio": float("nan")}, "compression_ratio"), ({"method": "random"}, "method"),
                          ({"sink_tokens": -1}, "sink_tokens"), ({"recent_tokens": 1.5}, "recent_tokens"),
                          ({"observation_window": 0}, "observation_window"), ({"pool_kernel": 4}, "pool_kernel")]:
        ratio = kwargs.pop("compression_ratio", 0.5)
        with pytest.raises(ValueError, match=match):
            lab("compression").ContextCompressor(ratio, **kwargs)
    with pytest.raises(ValueError, match="tokens"):
        snap.compute_importance(arrays.asarray(np.zeros((3, 4))), arrays.asarray(attention_weights(q, k)))
    with pytest.raises(ValueError, match="attention_weights"):
        snap.compute_importance(arrays.asarray(k), arrays.asarray(attention_weights(q, k)[..., :9]))
    with pytest.raises(ValueError, match="attention_weights"):
        h2o.compute_importance(arrays.asarray(k), None)
    with pytest.raises(ValueError, match="importance_scores"):
        snap.compress_context(arrays.asarray(k), arrays.asarray(np.zeros((1, 2, 9))))
    with pytest.raises(ValueError, match="queries"):
        snap.compress_kv(arrays.asarray(k), arrays.asarray(v))
    with pytest.raises(ValueError, match="heads"):
        snap.compress_kv(arrays.asarray(k), arrays.asarray(v), arrays.asarray(q[:, :3]))  # 3 query heads, 2 kv heads


def test_streaming_bad_arguments_raise(lab, arrays, tiny_model):
    """The given checks refuse bad options, naming them; good input around them still streams."""
    model, _, _ = tiny_model
    p = processor(lab, 8, window=16)
    assert [arrays.numpy(out).shape[0] for out in p.process_stream(iter(tokens(20)), model)] == [8, 8, 4]
    for kwargs, match in [({"chunk_size": 0}, "chunk_size"), ({"overlap": -1}, "overlap"), ({"window": 0}, "window"),
                          ({"sink_tokens": -2}, "sink_tokens")]:
        args = {"chunk_size": 8, "overlap": 0, **kwargs}
        with pytest.raises(ValueError, match=match):
            lab("streaming").StreamingProcessor(args.pop("chunk_size"), args.pop("overlap"), **args)
    with pytest.raises(ValueError, match="window"):
        lab("streaming").SinkKVCache(4, 0)


def test_adaptive_bad_arguments_raise(lab, tok):
    """The given checks refuse bad options and messages, naming them; good input still fits."""
    A = lab("adaptive").AdaptiveContextManager
    assert "hello" in A(1000, tokenizer=tok).manage_context([{"role": "user", "content": "hello"}], "x")
    for kw, name in (({"max_context": 0}, "max_context"), ({"max_context": 10, "reserve_tokens": 10}, "reserve"),
                     ({"keep_recent_turns": -1}, "keep_recent_turns"), ({"reserve_tokens": -1}, "reserve_tokens"),
                     ({"summarizer": "text"}, "summarizer"), ({"tokenizer": 3}, "tokenizer")):
        with pytest.raises(ValueError, match=name):
            A(**kw)
    m = A(1000, tokenizer=tok)
    for history, current in (("hi", "x"), ([{"role": "user"}], "x"), ([{"role": "user", "content": 3}], "x"),
                             ([], None)):
        with pytest.raises(ValueError):
            m.manage_context(history, current)


def test_benchmark_bad_arguments_raise(lab, shipped_model):
    """The given checks refuse bad arguments, naming them; good ones still run."""
    assert run(lab, ["sliding"], [64])[0].median_ms > 0
    for kw, name in [(dict(techniques=["nope"]), "technique"), (dict(techniques="sliding"), "techniques"),
                     (dict(techniques=[]), "techniques"), (dict(lengths=[]), "lengths"), (dict(lengths=[0]), "length"),
                     (dict(repeats=0), "repeats"), (dict(backend="jax"), "backend"), (dict(memory_limit=0), "memory_limit"),
                     (dict(techniques=["ring"], model=shipped_model), "ring")]:
        kw = {"techniques": ["sliding"], "lengths": [64], **kw}
        with pytest.raises(ValueError, match=name):
            run(lab, kw.pop("techniques"), kw.pop("lengths"), **kw)


def test_qwen3_long_bad_arguments_raise(lab, arrays, tiny_model):
    """The given checks refuse bad strategies, options and tokens, naming them; good input still runs."""
    model, _, _ = tiny_model
    L = lab("qwen3_long").LongContextQwen3
    assert arrays.numpy(L(model, "full").process_long_sequence([1, 2, 3])).shape == (1, 3, 256)
    for args, kw, name in (((model, "dense"), {}, "context_strategy"), ((model, "sliding"), {"window": 4}, "window"),
                           ((model, "sliding"), {"window_size": 0}, "window_size"),
                           ((model, "full"), {"chunk_size": 0}, "chunk_size"),
                           ((model, "compressed"), {"method": "lru"}, "method"), (("model", "full"), {}, "base_model")):
        with pytest.raises(ValueError, match=name):
            L(*args, **kw)
    w = L(model, "full")
    for ids in ([], [[1, 2], [3, 4]], [300], [-1], "abc"):
        with pytest.raises(ValueError, match="tokens"):
            w.process_long_sequence(ids)
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(iter(w.generate([1, 2], 0)))


def test_ring_bad_arguments_raise_value_error(lab, arrays):
    """The given checks refuse bad input, naming the argument; good input around them still computes."""
    mod = lab("ring")
    q, k, v = make_qkv(0, 1, 4, 2, 16, 16, 8)
    assert arrays.numpy(mod.RingAttention(2, 4)(*(arrays.asarray(x) for x in (q, k, v)))).shape == (1, 4, 16, 8)
    for kwargs, word in ((dict(ring_size=0), "ring_size"), (dict(ring_size=2, block_size=0), "block_size"),
                         (dict(ring_size=2, scale=0.0), "scale")):
        with pytest.raises(ValueError, match=word):
            mod.RingAttention(**kwargs)
    q, k, v = make_qkv(0, 1, 4, 2, 16, 16, 8)
    ring = mod.RingAttention(2, 4)
    with pytest.raises(ValueError, match="length"):
        ring(arrays.asarray(q[:, :, :8]), arrays.asarray(k), arrays.asarray(v))  # Lq != Lk
    with pytest.raises(ValueError, match="heads"):
        ring(arrays.asarray(make_qkv(0, 1, 3, 2, 16, 16, 8)[0]), arrays.asarray(k), arrays.asarray(v))
    with pytest.raises(ValueError, match="ring_position"):
        ring.ring_attention_step(arrays.asarray(q), arrays.asarray(k), arrays.asarray(v), -1)
    with pytest.raises(ValueError, match="diagonal"):
        ring.ring_attention_step(arrays.asarray(q), arrays.asarray(k[:, :, :8]), arrays.asarray(v[:, :, :8]), 0)
    with pytest.raises(ValueError, match="layout"):
        mod.ring_attention_distributed(arrays.asarray(q), arrays.asarray(k), arrays.asarray(v), layout="spiral")
    with pytest.raises(ValueError, match="zigzag"):
        mod.ring_attention_distributed(arrays.asarray(q[:, :, :7]), arrays.asarray(k[:, :, :7]), arrays.asarray(v[:, :, :7]),
                                       layout="zigzag")
