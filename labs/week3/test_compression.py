"""Graded tests, Task 4: context and KV-cache compression.

Run: ``pytest labs/week3 --task 4`` (your stubs), ``--impl solutions`` or
``--impl torch``. Expected values come from float64 oracles in
``longctx.testing.oracles`` (``compression_scores``, ``kept_indices``); the
project's ``tests/test_kvpress.py`` checks those against NVIDIA's kvpress.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from longctx.testing import assert_close
from longctx.testing.inputs import make_qkv
from longctx.testing.oracles import (attention, attention_weights, compression_scores, kept_indices,
                                     n_kept)

pytestmark = pytest.mark.task(4)

METHODS = ["h2o", "snapkv", "knorm", "streaming"]


def compressor(lab, ratio=0.5, **kw):
    return lab("compression").ContextCompressor(ratio, **kw)


def check_kept(got, want, what="kept positions"):
    got = np.asarray(got).astype(np.int64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape} (budget per row and head)"
    bad = np.argwhere(got != want)
    if len(bad):
        idx = tuple(bad[0][:-1])
        g, w = set(got[idx].tolist()), set(want[idx].tolist())
        hint = ""
        if g == w:
            hint = " -- same set, wrong order: keep the original order"
        elif sorted(g) != sorted(w):
            hint = f" -- kept {sorted(g - w)[:5]} instead of {sorted(w - g)[:5]}"
        raise AssertionError(f"{what} differ at {idx}: {got[idx].tolist()[:12]}..., expected "
                             f"{want[idx].tolist()[:12]}...{hint}")


# ---------------------------------------------------------------- scores

@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), rep=st.sampled_from([1, 2]), L=st.integers(2, 70),
       q_frac=st.sampled_from([1.0, 0.5, 0.1]), D=st.sampled_from([4, 8]), method=st.sampled_from(METHODS),
       window=st.integers(1, 12), kernel=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2 ** 16))
def test_importance_from_attention_weights(lab, arrays, B, Hkv, rep, L, q_frac, D, method, window, kernel, seed):
    """``compute_importance(keys, weights)`` equals the oracle for every method (GQA, Lq < L)."""
    Lq = max(1, int(L * q_frac))
    q, k, _ = make_qkv(seed, B, Hkv * rep, Hkv, Lq, L, D)
    c = compressor(lab, method=method, observation_window=window, pool_kernel=kernel)
    a = attention_weights(q, k)
    got = arrays.numpy(c.compute_importance(arrays.asarray(k), arrays.asarray(a)))
    want = compression_scores(method, k, q, observation_window=window, pool_kernel=kernel)
    assert got.shape == want.shape, f"scores shape {got.shape}, expected (B, Hkv, L) = {want.shape}"
    inf = np.isinf(want)
    assert np.array_equal(np.isinf(got), inf), "snapkv: exactly the observation window scores +inf"
    mistakes = {}
    if method == "knorm":
        mistakes["positive key norm (knorm keeps the *smallest* norms)"] = -want
    if method == "snapkv":
        no_pool = compression_scores(method, k, q, observation_window=window, pool_kernel=1)
        mistakes["no average pooling"] = np.where(inf, 0, no_pool)
    assert_close(np.where(inf, 0, got), np.where(inf, 0, want), rtol=1e-4, atol=1e-6, name="scores",
                 axes=("B", "H", "L"), mistakes=mistakes)


def test_importance_for_ids_and_hidden_states(lab, arrays):
    """Scores have the shape of the tokens without their feature axis; heads are averaged."""
    rng = np.random.default_rng(0)
    q, k, _ = make_qkv(1, 2, 3, 1, 9, 9, 8)
    a = attention_weights(q, k)  # (2, 3, 9, 9)
    hidden = rng.standard_normal((2, 9, 16))
    ids = np.arange(9) * 7
    for method in ("h2o", "snapkv"):
        c = compressor(lab, method=method, observation_window=3)
        want = compression_scores(method, k, q, observation_window=3)  # (2, 1, 9): one kv head = all heads
        got = arrays.numpy(c.compute_importance(arrays.asarray(hidden), arrays.asarray(a)))
        assert got.shape == (2, 9), f"{method}: hidden (B, L, D) gives scores (B, L), got {got.shape}"
        assert_close(np.where(np.isinf(want[:, 0]), 0, got), np.where(np.isinf(want[:, 0]), 0, want[:, 0]),
                     rtol=1e-4, atol=1e-6, name=f"{method} scores (hidden)")
        for weights in (a[0], a[0, 0]):  # (H, Lq, L) and (Lq, L)
            got = arrays.numpy(c.compute_importance(arrays.asarray(ids, "int32"), arrays.asarray(weights)))
            ref = compression_scores(method, k[:1], q[:1, :weights.shape[0]] if weights.ndim == 3 else q[:1, :1],
                                     observation_window=3)[0, 0]
            assert got.shape == (9,), f"{method}: ids (L,) give scores (L,), got {got.shape}"
            assert_close(np.where(np.isinf(ref), 0, got), np.where(np.isinf(ref), 0, ref), rtol=1e-4, atol=1e-6,
                         name=f"{method} scores (ids, weights {weights.shape})")
    knorm = arrays.numpy(compressor(lab, method="knorm").compute_importance(arrays.asarray(hidden)))
    assert_close(knorm, -np.linalg.norm(hidden.astype(np.float32), axis=-1), rtol=1e-5, atol=1e-5,
                 name="knorm scores (hidden)")
    with pytest.raises(ValueError, match="knorm"):
        compressor(lab, method="knorm").compute_importance(arrays.asarray(ids, "int32"))


# ---------------------------------------------------------------- keeping

@given(shape=st.sampled_from([(1, 1), (2, 3), (1, 2)]), L=st.integers(1, 90), ratio=st.floats(0, 0.95),
       sinks=st.integers(0, 6), recent=st.integers(0, 12), ties=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_compress_context_keeps_budget_sinks_recent_order(lab, arrays, shape, L, ratio, sinks, recent, ties, seed):
    """Exact budget per row and head, sinks and recent kept, ties to the earlier position, order kept."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, (*shape, L)).astype(np.float64) if ties else rng.standard_normal((*shape, L))
    keys = rng.standard_normal((*shape, L, 4))
    c = compressor(lab, ratio, method="knorm", sink_tokens=sinks, recent_tokens=recent)
    kept = c.compress_context(arrays.asarray(keys), arrays.asarray(scores))
    want = kept_indices(scores, n_kept(L, ratio), sinks, recent)
    check_kept(arrays.numpy(kept.positions), want)
    assert arrays.dtype_name(kept.positions) == "int32", f"positions dtype {arrays.dtype_name(kept.positions)}"
    assert_close(arrays.numpy(kept.tokens), np.take_along_axis(keys, want[..., None], axis=-2), rtol=0, atol=1e-6,
                 name="kept tokens")


def test_compress_context_ids(lab, arrays):
    ids = np.array([5, 9, 2, 7, 7, 1, 3, 8, 6, 4])
    scores = np.array([0, 1, 5, 1, 5, 0, 2, 0, 0, 0], dtype=np.float64)
    kept = compressor(lab, 0.5, method="h2o", sink_tokens=1, recent_tokens=1).compress_context(
        arrays.asarray(ids, "int32"), arrays.asarray(scores))
    want = kept_indices(scores, 5, 1, 1)  # [0, 2, 4, 6, 9]: the sink, the two 5s, the 2, the last
    check_kept(arrays.numpy(kept.positions), want)
    assert arrays.numpy(kept.tokens).tolist() == ids[want].tolist()


@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.sampled_from([1, 2, 4]), L=st.integers(1, 80),
       q_frac=st.sampled_from([1.0, 0.3]), method=st.sampled_from(METHODS), ratio=st.floats(0, 0.9),
       sinks=st.integers(0, 4), recent=st.integers(0, 8), window=st.integers(1, 10),
       seed=st.integers(0, 2 ** 16))
def test_compress_kv_equals_oracle(lab, arrays, B, Hkv, rep, L, q_frac, method, ratio, sinks, recent, window, seed):
    """``compress_kv`` computes its own attention (blockwise) and keeps the oracle's entries."""
    Lq = max(1, int(L * q_frac))
    q, k, v = make_qkv(seed, B, Hkv * rep, Hkv, Lq, L, 8, std=2.0)
    c = compressor(lab, ratio, method=method, sink_tokens=sinks, recent_tokens=recent, observation_window=window)
    ck, cv, pos = c.compress_kv(arrays.asarray(k), arrays.asarray(v), arrays.asarray(q))
    scores = compression_scores(method, k, q, observation_window=window)
    want = kept_indices(scores, n_kept(L, ratio), sinks, recent)
    check_kept(arrays.numpy(pos), want)
    assert_close(arrays.numpy(ck), np.take_along_axis(k, want[..., None], axis=2), rtol=0, atol=1e-6, name="kept keys")
    assert_close(arrays.numpy(cv), np.take_along_axis(v, want[..., None], axis=2), rtol=0, atol=1e-6,
                 name="kept values")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["h2o", "snapkv", "knorm"])
def test_low_precision_with_large_logits(lab, arrays, dtype, method):
    """bfloat16/float16 keys and queries with logits in the hundreds: scores accumulate in float32, no
    overflow, and the kept set is the oracle's on the same (rounded) numbers."""
    q, k, v = make_qkv(9, 1, 4, 2, 24, 96, 16, std=6.0)
    qa, ka, va = (arrays.asarray(x, dtype) for x in (q, k, v))
    q, k, v = (arrays.numpy(x) for x in (qa, ka, va))  # what the backend holds after rounding
    c = compressor(lab, 0.6, method=method, sink_tokens=2, recent_tokens=4, observation_window=8)
    ck, _, pos = c.compress_kv(ka, va, qa)
    assert arrays.dtype_name(ck) == dtype, f"kept keys dtype {arrays.dtype_name(ck)}, expected {dtype}"
    scores = compression_scores(method, k, q, observation_window=8)
    want = kept_indices(scores, n_kept(96, 0.6), 2, 4)
    got = arrays.numpy(pos).astype(int)
    assert got.shape == want.shape and (np.diff(got, axis=-1) > 0).all(), "budget kept, in order"
    # Peaky attention makes SnapKV's pooled scores tie up to rounding: accept a different pick
    # only where the scores agree to float32 precision.
    for idx in np.ndindex(*got.shape[:-1]):
        swapped = set(got[idx]) ^ set(want[idx])
        spread = np.ptp(scores[idx][sorted(swapped)]) if swapped else 0.0
        assert spread <= 1e-5 * np.abs(scores[idx][np.isfinite(scores[idx])]).max(), \
            f"kept {sorted(set(got[idx]) - set(want[idx]))} instead of {sorted(set(want[idx]) - set(got[idx]))}"


def test_ratio_zero_keeps_everything_and_attention_is_unchanged(lab, arrays):
    q, k, v = make_qkv(3, 1, 4, 2, 5, 40, 8)
    for method in METHODS:
        ck, cv, pos = compressor(lab, 0.0, method=method).compress_kv(arrays.asarray(k), arrays.asarray(v), arrays.asarray(q))
        assert arrays.numpy(pos).astype(int).tolist() == [[list(range(40))] * 2], f"{method}: ratio 0 keeps all"
        decode = q[:, :, -1:]
        assert_close(attention(decode, arrays.numpy(ck), arrays.numpy(cv)), attention(decode, k, v), rtol=1e-6,
                     atol=1e-7, name=f"{method}: attention over the ratio-0 cache")


def test_compression_keeps_most_of_the_attention(lab, arrays):
    """The point of h2o/snapkv: at ratio 0.75 the last query's output stays close; streaming does worse
    here because the heavy hitters sit in the middle."""
    q, k, v = make_qkv(5, 1, 2, 1, 64, 256, 16)
    k[:, :, 50:60] += 2.0 * q[:, :1, -1:].mean(axis=2, keepdims=True)  # heavy hitters in the middle
    full = attention(q[:, :, -1:], k, v)
    errors = {}
    for method in METHODS:
        ck, cv, _ = compressor(lab, 0.75, method=method, recent_tokens=8).compress_kv(
            arrays.asarray(k), arrays.asarray(v), arrays.asarray(q))
        errors[method] = np.abs(attention(q[:, :, -1:], arrays.numpy(ck), arrays.numpy(cv)) - full).max()
    assert errors["h2o"] < errors["streaming"] and errors["snapkv"] < errors["streaming"], errors


# ---------------------------------------------------------------- the cache

def new_cache(lab, **kw):
    return lab("compression").CompressedKVCache(compressor(lab, **kw))


def update(arrays, cache, k, v):
    return arrays.cache_update(cache, k, v)


def layer(arrays, cache):
    """The object holding one layer's entries (the cache itself in mlx-lm, ``layers[0]`` in transformers)."""
    return arrays.cache_layers(cache)[0]


def by_first_feature(x):
    """Rows sorted by their first feature: a cache may store its entries in any order."""
    return np.take_along_axis(x, np.argsort(x[..., :1], axis=-2), axis=-2)


@pytest.mark.parametrize("method", ["knorm", "streaming"])
def test_cache_compresses_after_prefill_and_holds_its_budget(lab, arrays, method):
    """Prefill (chunked), then decode: between steps the cache holds ``n_kept(tokens seen)`` entries,
    chosen as the oracle chooses, with their true positions; a step attends to those plus itself."""
    ratio, sinks, recent, prompt, steps = 0.7, 2, 4, 37, 12
    _, k, v = make_qkv(11, 1, 2, 2, 1, prompt + steps, 8)
    cache = new_cache(lab, ratio=ratio, method=method, sink_tokens=sinks, recent_tokens=recent)
    for start in range(0, prompt, 16):  # mlx-lm prefills in chunks
        end = min(prompt, start + 16)
        got_k, _ = update(arrays, cache, arrays.asarray(k[:, :, start:end]), arrays.asarray(v[:, :, start:end]))
        assert arrays.numpy(got_k).shape[2] == end, "before compression the cache is a plain cache"
    held = np.broadcast_to(np.arange(prompt), (1, 2, prompt))  # compressed at the first decode step
    for t in range(prompt, prompt + steps):
        got_k, got_v = update(arrays, cache, arrays.asarray(k[:, :, t:t + 1]), arrays.asarray(v[:, :, t:t + 1]))
        candidates = np.concatenate([held, np.full((1, 2, 1), t)], axis=2)
        scores = np.take_along_axis(compression_scores(method, k[:, :, :t + 1]), candidates, axis=2)
        budget = n_kept(t + 1, ratio)
        held = np.take_along_axis(candidates, kept_indices(scores, budget, sinks, recent, candidates, t + 1), axis=2)
        check_kept(np.sort(arrays.numpy(layer(arrays, cache).positions), axis=-1), held, f"positions held after token {t}")
        for name, got, want in (("keys", got_k, k), ("values", got_v, v)):
            assert_close(by_first_feature(arrays.numpy(got)), by_first_feature(np.take_along_axis(
                want, candidates[..., None], axis=2)), rtol=0, atol=1e-6,
                name=f"{name} token {t} attends to (what was held, and itself)")
    offset = arrays.cache_offset(cache)
    assert offset == prompt + steps, f"offset {offset}: it must count every token (RoPE positions)"


def test_cache_snapkv_with_queries(lab, arrays):
    q, k, v = make_qkv(2, 1, 4, 2, 30, 30, 8)
    cache = new_cache(lab, ratio=0.5, method="snapkv", observation_window=6, recent_tokens=0, sink_tokens=1)
    update(arrays, cache, arrays.asarray(k), arrays.asarray(v))
    layer(arrays, cache).compress(arrays.asarray(q))
    want = kept_indices(compression_scores("snapkv", k, q, observation_window=6), 15, 1, 0)
    check_kept(np.sort(arrays.numpy(layer(arrays, cache).positions), axis=-1), want)
    lazy = new_cache(lab, ratio=0.5, method="snapkv")
    update(arrays, lazy, arrays.asarray(k), arrays.asarray(v))
    with pytest.raises(ValueError, match="queries"):  # no queries reach a cache: say so, never guess
        update(arrays, lazy, arrays.asarray(k[:, :, :1]), arrays.asarray(v[:, :, :1]))


def test_cache_in_the_model_ratio_zero_equals_full_cache(lab, arrays, tiny_model):
    """Prefill + decode through the tiny Qwen3: ratio 0 gives the full cache's logits."""
    model, forward, full_cache = tiny_model
    ids = np.random.default_rng(0).integers(0, 256, 24)
    plain = full_cache()
    comp = arrays.model_cache(lambda: new_cache(lab, ratio=0.0, method="knorm"), model)
    for chunk in (ids[:20], ids[20:21], ids[21:22], ids[22:]):
        assert_close(arrays.numpy(forward(chunk, comp)), arrays.numpy(forward(chunk, plain)), rtol=1e-4, atol=1e-4,
                     name="logits with the ratio-0 compressed cache")


def test_compress_kv_memory_is_blockwise(lab, arrays, record):
    """Scores for h2o come from all queries, but never as an L x L matrix."""
    L, H = 8192, 2
    q, k, v = make_qkv(0, 1, H, H, L, L, 16)
    c = compressor(lab, 0.9, method="h2o")
    qa, ka, va = arrays.asarray(q), arrays.asarray(k), arrays.asarray(v)
    peak = arrays.peak_bytes(lambda: c.compress_kv(ka, va, qa)[0])
    dense = H * L * L * 4
    record("h2o compress_kv peak (L=8192)", f"{peak / 2**20:.0f} MiB ({dense / max(peak, 1):.0f}x under one "
                                             f"L x L float32 score matrix per head)")
    assert peak < dense / 8, f"peak {peak / 2**20:.0f} MiB: an L x L score matrix is {dense / 2**20:.0f} MiB"
