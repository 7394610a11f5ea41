"""Graded tests, Task 10: memory layers (Focused Transformer / LongLLaMA, Memorizing Transformer).

Run: ``pytest labs/week3 --task 10`` (your stubs), ``--impl solutions`` or
``--impl torch``. Expected values come from ``longctx.testing.oracles``:
``memory_attention`` (one float64 softmax over the causal local keys and the
kept memory entries), ``gated_memory_attention`` and ``memory_model_logits``
(LongLLaMA's windowed forward of the tiny Qwen3, memory keys un-rotated).
"""
import numpy as np
import pytest

from longctx.models import TINY_QWEN3, torch_qwen3
from longctx.testing import assert_close, oracles
from longctx.testing.gradients import assert_gradients_close, gradient_inputs, reference_grads, weighted
from longctx.testing.inputs import make_qkv

pytestmark = pytest.mark.task(10)
CHAPTER = "(book: Task 10, \"One softmax over local and memory\")"


def memory_inputs(seed, B, Hq, Hkv, Lq, Lk, M, D, std=1.0):
    q, k, v = make_qkv(seed, B, Hq, Hkv, Lq, Lk, D, std)
    rng = np.random.default_rng(seed + 1)
    mk = rng.standard_normal((B, Hkv, M, D)).astype(np.float32).astype(np.float64) * std
    mv = rng.standard_normal((B, Hkv, M, D)).astype(np.float32).astype(np.float64)
    return q, k, v, mk, mv


SHAPES = [  # B, Hq, Hkv, Lq, Lk, M, D
    (1, 2, 2, 5, 5, 7, 8), (2, 4, 2, 3, 9, 11, 8), (1, 4, 1, 1, 6, 4, 16), (2, 6, 3, 7, 7, 1, 4),
    (1, 2, 1, 4, 4, 0, 8), (1, 8, 2, 17, 33, 40, 32),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("top_k", [None, 1, 3, 100])
def test_one_softmax_over_local_and_memory(lab, arrays, shape, top_k):
    q, k, v, mk, mv = memory_inputs(sum(shape), *shape)
    m = lab("memory")
    got = m.memory_attention(*(arrays.asarray(x) for x in (q, k, v, mk, mv)), top_k=top_k)
    want = oracles.memory_attention(q, k, v, mk, mv, top_k=top_k)
    assert_close(arrays.numpy(got), want, rtol=1e-4, atol=1e-5, name=f"memory_attention {shape} top_k={top_k} "
                 + CHAPTER)


def test_scale_argument(lab, arrays):
    """``scale`` replaces ``D ** -0.5`` for the local and the memory scores alike."""
    q, k, v, mk, mv = memory_inputs(2, 1, 4, 2, 5, 7, 6, 8)
    m, xs = lab("memory"), [arrays.asarray(x) for x in (q, k, v, mk, mv)]
    got = m.memory_attention(*xs, top_k=3, scale=0.9)
    assert_close(arrays.numpy(got), oracles.memory_attention(q, k, v, mk, mv, top_k=3, scale=0.9), rtol=1e-4,
                 atol=1e-5, name="memory_attention with scale=0.9")
    gate = np.array([0.5, -1.0, 2.0, 0.0])
    got = m.gated_memory_attention(*xs, arrays.asarray(gate), scale=0.9)
    assert_close(arrays.numpy(got), oracles.gated_memory_attention(q, k, v, mk, mv, gate, scale=0.9), rtol=1e-4,
                 atol=1e-5, name="gated_memory_attention with scale=0.9")


def test_documents_do_not_share_memory(lab, arrays):
    """``memory_mask`` hides entries from a batch row: each document sees its own memory only."""
    q, k, v, mk, mv = memory_inputs(3, 3, 4, 2, 6, 6, 10, 8)
    mask = np.zeros((3, 10), bool)
    mask[0, :4], mask[1, 4:], mask[2, ::3] = True, True, True
    for top_k in (None, 2):
        got = lab("memory").memory_attention(*(arrays.asarray(x) for x in (q, k, v, mk, mv)), top_k=top_k,
                                             memory_mask=arrays.asarray(mask, "bool"))
        assert_close(arrays.numpy(got), oracles.memory_attention(q, k, v, mk, mv, top_k=top_k, memory_mask=mask),
                     rtol=1e-4, atol=1e-5, name=f"per-document memory, top_k={top_k}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_with_large_logits(lab, arrays, dtype):
    q, k, v, mk, mv = memory_inputs(5, 1, 4, 2, 9, 12, 20, 16, std=6.0)
    xs = [arrays.asarray(x, dtype) for x in (q, k, v, mk, mv)]
    got = lab("memory").memory_attention(*xs, top_k=5)
    assert arrays.dtype_name(got) == dtype, f"the output must keep the input dtype {dtype}"
    exact = [arrays.numpy(x) for x in xs]  # what the half inputs hold
    want = oracles.memory_attention(*exact, top_k=5)
    assert np.isfinite(arrays.numpy(got)).all(), "large logits overflowed: accumulate in float32"
    assert_close(arrays.numpy(got), want, rtol=3e-2, atol=3e-2, name=f"memory_attention in {dtype}")


def test_top_k_at_least_memory_is_dense(lab, arrays):
    q, k, v, mk, mv = memory_inputs(7, 2, 4, 2, 6, 8, 9, 8)
    m, xs = lab("memory"), [arrays.asarray(x) for x in (q, k, v, mk, mv)]
    dense = arrays.numpy(m.memory_attention(*xs))
    for top_k in (9, 10, 1000):
        assert_close(arrays.numpy(m.memory_attention(*xs, top_k=top_k)), dense, rtol=1e-6, atol=1e-6,
                     name=f"top_k={top_k} >= |memory| must equal dense memory")


@pytest.mark.parametrize("top_k", [1, 2, 5, 9, 12])
def test_top_k_mask_keeps_the_best(lab, arrays, top_k):
    rng = np.random.default_rng(top_k)
    scores = rng.standard_normal((2, 3, 4, 9)).astype(np.float32)
    got = arrays.numpy(lab("memory").top_k_mask(arrays.asarray(scores), top_k)).astype(bool)
    order = np.argsort(-scores, axis=-1)
    want = np.zeros_like(got)
    np.put_along_axis(want, order[..., :top_k], True, axis=-1)
    assert (got == want).all(), f"top_k_mask must keep each row's {top_k} highest scores {CHAPTER}"


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_retrieved_sets_equal_exact_search(lab, arrays, index):
    """``retrieve`` (given) returns the entries your ``top_k_mask`` keeps, best first."""
    if index == "faiss":
        pytest.importorskip("faiss")
    q, _, _, mk, _ = memory_inputs(11, 2, 4, 2, 5, 5, 30, 8)
    m = lab("memory")
    scores = np.einsum("bhid,bhjd->bhij", q, np.repeat(mk, 2, axis=1))
    kept = arrays.numpy(m.top_k_mask(arrays.asarray(scores), 4)).astype(bool)
    got = arrays.numpy(m.retrieve(arrays.asarray(q), arrays.asarray(mk), 4, index=index)).astype(int)
    want = np.argsort(-scores, axis=-1)[..., :4]
    assert (np.sort(np.nonzero(kept)[-1].reshape(got.shape), -1) == np.sort(want, -1)).all(), \
        "top_k_mask must keep the top-4 inner products"
    assert got.shape == want.shape, f"retrieve must return (B, Hq, Lq, top_k), got {got.shape}"
    assert (np.sort(got, -1) == np.sort(want, -1)).all(), f"{index}: not the top-4 inner products"
    assert (got == want).all(), f"{index}: the entries must come best first"


@pytest.mark.parametrize("gate", [-1.5, 0.0, 2.0])
def test_gated_memory_attention(lab, arrays, gate):
    q, k, v, mk, mv = memory_inputs(13, 1, 4, 2, 5, 8, 10, 8)
    g = np.array([gate, -gate, gate / 2, 1.0])
    got = lab("memory").gated_memory_attention(*(arrays.asarray(x) for x in (q, k, v, mk, mv)), arrays.asarray(g),
                                               top_k=4)
    assert_close(arrays.numpy(got), oracles.gated_memory_attention(q, k, v, mk, mv, g, top_k=4), rtol=1e-4,
                 atol=1e-5, name="the Memorizing Transformer's gate")


def test_gate_limits(lab, arrays):
    """Gate closed: local attention alone; open: the memory alone."""
    q, k, v, mk, mv = memory_inputs(17, 1, 2, 1, 6, 6, 7, 8)
    m, xs = lab("memory"), [arrays.asarray(x) for x in (q, k, v, mk, mv)]
    closed = arrays.numpy(m.gated_memory_attention(*xs, arrays.asarray(np.full(2, -1e4))))
    opened = arrays.numpy(m.gated_memory_attention(*xs, arrays.asarray(np.full(2, 1e4))))
    assert_close(closed, oracles.attention(q, k, v, oracles.causal_mask(6, 6)), rtol=1e-5, atol=1e-6,
                 name="a closed gate must give causal local attention")
    assert_close(opened, oracles.attention(q, mk, mv), rtol=1e-5, atol=1e-6, name="an open gate: memory only")


@pytest.mark.parametrize("batch, extra", [(1, 0), (1, 3), (4, 1), (5, 2), (6, 6)])
def test_crossbatch_selector(lab, arrays, batch, extra):
    index, valid = lab("memory").crossbatch_selector(batch, extra)
    index, valid = arrays.numpy(index).astype(int), arrays.numpy(valid).astype(bool)
    assert index.shape == valid.shape == (batch, extra), f"selector must be (batch, extra), got {index.shape}"
    for i in range(batch):
        seen = sorted(index[i][valid[i]])
        assert seen == list(range(max(0, i - extra), i)), \
            f"entry {i} must see entries {list(range(max(0, i - extra), i))} (never itself or a later one), got {seen}"


def test_crossbatch_attention_is_memory_over_earlier_entries(lab, arrays):
    q, k, v, _, _ = memory_inputs(19, 4, 4, 2, 6, 6, 0, 8)
    raw = np.random.default_rng(20).standard_normal(k.shape).astype(np.float32).astype(np.float64)
    got = arrays.numpy(lab("memory").crossbatch_attention(*(arrays.asarray(x) for x in (q, k, v, raw)), 2))
    for i in range(4):
        seen = list(range(max(0, i - 2), i))
        mk = np.concatenate([raw[j:j + 1] for j in seen] or [raw[:1, :, :0]], axis=2)
        mv = np.concatenate([v[j:j + 1] for j in seen] or [v[:1, :, :0]], axis=2)
        assert_close(got[i:i + 1], oracles.memory_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], mk, mv), rtol=1e-4,
                     atol=1e-5, name=f"crossbatch entry {i}: its own window and entries {seen}")


def update(arrays, cache, keys, values):
    return arrays.cache_update(cache, arrays.asarray(keys), arrays.asarray(values))


def layer(arrays, cache):
    return arrays.cache_layers(cache)[0]


def make_cache(lab, arrays, **options):
    return lab("memory").MemoryKVCache(**options)


def test_cache_windowing(lab, arrays):
    """A full local context moves to memory when the next token comes; the memory keeps the last
    ``memory_size`` entries and never holds the current window's tokens."""
    rng = np.random.default_rng(23)
    cache = make_cache(lab, arrays, memory_size=10, last_context_length=2, context_length=4)
    fed = []
    for n in (3, 1, 1, 2, 1, 1, 3, 4, 1):
        keys = rng.standard_normal((1, 2, n, 8))
        fed.append(keys)
        before = layer(arrays, cache).local_length
        assert arrays.cache_offset(layer(arrays, cache)) == (0 if before >= 4 else before), \
            "the next token's local position: the local length, 0 once the local context is full"
        local_k, _ = update(arrays, cache, keys, keys)
        c = layer(arrays, cache)
        everything = np.concatenate(fed, axis=2)
        local = arrays.numpy(local_k)
        assert_close(local[:, :, -n:], keys, atol=1e-6, name="the new entries end the local context")
        if before >= 4:
            assert local.shape[2] == n, "a full local context must move to memory before the next token joins"
        held = c.memory_length
        assert held <= 10, f"memory_size=10 bounds the memory, it holds {held}"
        if held:
            seen = everything.shape[2] - local.shape[2]
            assert_close(arrays.numpy(c.memory_keys), everything[:, :, seen - held:seen], atol=1e-6,
                         name="the memory: the latest entries before the local context, oldest first")


def test_cache_flush_unrotates_and_state_round_trips(lab, arrays):
    """Keys rotated at local positions go to memory un-rotated; state/meta_state restore a cache."""
    D = 8
    rope, rotate = arrays.rope(D)
    cache = lab("memory").MemoryKVCache(16, 2, context_length=6, rope=rope)
    raw = np.random.default_rng(29).standard_normal((1, 2, 5, D))
    update(arrays, cache, rotate(raw[:, :, :3], 0), raw[:, :, :3])
    update(arrays, cache, rotate(raw[:, :, 3:], 3), raw[:, :, 3:])
    cache_layer = layer(arrays, cache)
    cache_layer.flush()
    assert cache_layer.local_length == 0 and cache_layer.memory_length == 5
    assert_close(arrays.numpy(cache_layer.memory_keys), raw, atol=1e-4, name="memory keys must be un-rotated")
    update(arrays, cache, rotate(raw[:, :, :2], 0), raw[:, :, :2])
    state, meta = cache_layer.state, cache_layer.meta_state
    again = make_cache(lab, arrays, memory_size=1, last_context_length=0, context_length=1)
    layer(arrays, again).state, layer(arrays, again).meta_state = state, meta
    restored = layer(arrays, again)
    assert (restored.local_length, restored.memory_length, restored.memory_size, restored.context_length) == \
        (2, 5, 16, 6), "state and meta_state must restore the local context, the memory and the options"
    assert_close(arrays.numpy(restored.memory_keys), raw, atol=1e-4, name="restored memory")


@pytest.fixture(scope="module")
def weights():
    return {name: t.detach().numpy() for name, t in torch_qwen3(0).state_dict().items()}


def tokens(n, seed=0):
    """Distinct ids: two equal tokens have equal first-layer keys, and top-k between equal keys
    is decided by rounding (un-rotated in float32 or float64), not by the technique."""
    return np.random.default_rng(seed).permutation(256)[:n].tolist()


@pytest.mark.parametrize("n, options", [
    (70, {"context_length": 16, "last_context_length": 10, "memory_layers": [1]}),
    (61, {"context_length": 16, "last_context_length": 0, "memory_layers": [0, 1], "chunk_size": 5}),
    (50, {"context_length": 12, "last_context_length": 12, "memory_layers": [1], "top_k": 3}),
    (64, {"context_length": 8, "last_context_length": 5, "memory_layers": 0, "memory_size": 20, "top_k": 6}),
    (40, {"context_length": 1, "last_context_length": 1, "memory_layers": [1]}),
])
def test_memory_model_equals_longllamas_windows(lab, arrays, tiny_model, weights, n, options):
    """LongContextQwen3 "memory" on the tiny Qwen3 against the float64 windowed forward: local keys
    rotated inside their window, memory keys un-rotated, each window joining memory after it."""
    model, _, _ = tiny_model
    ids = tokens(n, seed=n)
    o = dict(options)
    layers = o.pop("memory_layers")
    o.pop("chunk_size", None)
    want = oracles.memory_model_logits(weights, TINY_QWEN3, ids, memory_layers=np.atleast_1d(layers).tolist(), **o)
    got = arrays.numpy(lab("qwen3_long").LongContextQwen3(model, "memory", **options).process_long_sequence(ids))[0]
    assert_close(got, want, rtol=1e-4, atol=1e-4, name=f"memory {options} " + CHAPTER, axes=("token", "vocab"))


def test_an_empty_memory_is_the_base_model(lab, arrays, tiny_model):
    model, forward, _ = tiny_model
    ids = tokens(30, seed=1)
    got = lab("qwen3_long").LongContextQwen3(model, "memory", context_length=32, last_context_length=30,
                                             chunk_size=7).process_long_sequence(ids)
    assert_close(arrays.numpy(got)[0], arrays.numpy(forward(ids)), rtol=1e-5, atol=1e-5,
                 name="a prompt kept local (empty memory) must give the base model's logits")


def test_generation_moves_a_full_context_to_memory(lab, arrays, tiny_model, weights):
    """Greedy generation equals the float64 forward over the windows generation made: the
    prompt's prefix (all but its last 4 tokens, the last one held back for ``generate``) in windows
    of 8, then local contexts growing to 8 that move to memory when the next token comes."""
    model, _, _ = tiny_model
    ids = tokens(20, seed=3)
    out = list(lab("qwen3_long").LongContextQwen3(model, "memory", context_length=8, last_context_length=4,
                                                  memory_layers=[1]).generate(ids, 12))
    seq, prefix = ids + out, len(ids) - 1 - 4
    for t in range(len(ids), len(seq)):
        windows = [(s, min(s + 8, prefix)) for s in range(0, prefix, 8)]
        windows += [(s, min(s + 8, t)) for s in range(prefix, t, 8)]
        logits = oracles.memory_model_logits(weights, TINY_QWEN3, seq[:t], windows=windows, memory_layers=[1])
        assert int(np.argmax(logits[-1])) == seq[t], f"generated token {t - len(ids)} differs from the oracle"


@pytest.mark.parametrize("top_k", [None, 3])
def test_trains_with_the_oracles_gradient(lab, arrays, top_k):
    """Training through memory attention: one softmax over the local keys and the kept memory
    entries; top-k's choice is not differentiated, the kept scores are."""
    q, k, v, w = gradient_inputs(37, 37, seed=10)
    layer = lab("memory").MemoryAttention(8, top_k)
    assert_gradients_close(arrays.grads(layer, q, k, v, w),
                           reference_grads(weighted(oracles.memory_counts(q, k, 8, top_k)), q, k, v, w),
                           name=f"MemoryAttention(8, top_k={top_k})")
