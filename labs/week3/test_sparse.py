"""Graded tests, Task 12: global + local sparse attention (Longformer, BigBird).

Run: ``pytest labs/week3 --task 12`` (your stubs), ``--impl solutions`` or
``--impl torch``. Expected values come from ``longctx.testing.oracles``:
``longformer_mask`` / ``longformer_attention`` (dense float64 masks) and
``bigbird_counts`` / ``bigbird_attention`` (how many times each key enters each
query's softmax: HF's evaluation mode repeats block 0).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.testing import assert_close, oracles
from longctx.testing.gradients import assert_gradients_close, gradient_inputs, reference_grads, weighted
from longctx.testing.inputs import make_qkv

pytestmark = pytest.mark.task(12)
LONGFORMER = "(book: Task 12, \"Longformer\")"
BIGBIRD = "(book: Task 12, \"BigBird\")"


def longformer_mistakes(q, k, v, window, globals_, causal):
    lq, lk = q.shape[2], k.shape[2]
    mask = oracles.longformer_mask(lq, lk, window, globals_, causal)
    local = oracles.longformer_mask(lq, lk, window, (), causal)  # the band alone, global rows local too
    p = oracles.query_positions(lq, lk)
    g = np.isin(np.arange(lk), globals_)[None, :]
    rows = np.isin(p, globals_)[:, None]
    out = {"global tokens ignored (the band alone)": oracles.attention(q, k, v, local),
           "global queries attend only to their band, not to every key":
               oracles.attention(q, k, v, np.where(rows, local | (g & (np.arange(lk) <= p[:, None]) if causal
                                                                   else local | g), mask))}
    twice = (local & g & ~rows).astype(float)
    if twice.any():
        out["a global key inside the band counted twice (take it out of the band)"] = \
            oracles.weighted_attention(q, k, v, mask + twice)
    if not causal:
        out["one-sided window of `window` keys instead of window / 2"] = oracles.attention(
            q, k, v, oracles.longformer_mask(lq, lk, 2 * window, globals_, causal))
    return out


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.sampled_from([1, 2]), L=st.integers(1, 150),
       half=st.integers(1, 40), causal=st.booleans(), globals_=st.lists(st.integers(0, 149), max_size=4),
       seed=st.integers(0, 999))
def test_longformer_equals_oracle(lab, arrays, B, Hkv, rep, L, half, causal, globals_, seed):
    """Any length (not a multiple of the block, one block, window > L), GQA, both variants."""
    window = 2 * half if not causal else half
    globals_ = [g for g in globals_ if g < L]
    q, k, v = make_qkv(seed, B, Hkv * rep, Hkv, L, L, 8)
    got = lab("sparse").longformer_attention(*(arrays.asarray(x) for x in (q, k, v)), window, globals_, causal)
    assert_close(arrays.numpy(got), oracles.longformer_attention(q, k, v, window, globals_, causal), rtol=2e-4,
                 atol=2e-5, mistakes=longformer_mistakes(q, k, v, window, globals_, causal),
                 name=f"longformer L={L} window={window} globals={globals_} causal={causal} {LONGFORMER}")


@pytest.mark.parametrize("L, window, globals_, causal", [
    (130, 8, (0, 64, 65, 129), False), (130, 8, (0, 64, 65, 129), True), (70, 200, (3,), False),
    (150, 1, (0, 1, 2), True), (200, 16, tuple(range(0, 200, 9)), False)])
def test_longformer_awkward_cases(lab, arrays, L, window, globals_, causal):
    q, k, v = make_qkv(L + window, 1, 4, 2, L, L, 16)
    got = lab("sparse").longformer_attention(*(arrays.asarray(x) for x in (q, k, v)), window, globals_, causal)
    assert_close(arrays.numpy(got), oracles.longformer_attention(q, k, v, window, globals_, causal), rtol=2e-4,
                 atol=2e-5, mistakes=longformer_mistakes(q, k, v, window, globals_, causal),
                 name=f"longformer L={L} window={window} causal={causal} {LONGFORMER}")


@pytest.mark.parametrize("causal", [False, True])
def test_global_rows_return_the_rows_and_their_log_sum_exp(lab, arrays, causal):
    """``global_rows`` on a run of keys that starts at ``first_key``: each row's softmax over the
    keys of the run it may see, and the natural log of its denominator; causal, a row before the
    run sees none of it (``out = 0``, ``lse = -inf``)."""
    q, k, v = make_qkv(7, 1, 4, 2, 5, 37, 16, std=3.0)
    rows, first, scale = np.array([3, 11, 12, 30, 36]), 12, 0.3
    mask = (first + np.arange(37 - first))[None, :] <= rows[:, None] if causal else np.ones((5, 37 - first), bool)
    out, lse = lab("sparse").global_rows(*(arrays.asarray(x) for x in (q, k[:, :, first:], v[:, :, first:])), rows,
                                         first, causal, scale)
    out, lse = arrays.numpy(out), arrays.numpy(lse)
    expected = oracles.attention_lse(q, k[:, :, first:], mask, scale=scale)
    assert lse.shape == expected.shape, f"lse has shape {lse.shape}, expected {expected.shape} (B, Hq, R)"
    assert (np.isneginf(lse) == np.isneginf(expected)).all(), \
        f"lse must be -inf exactly where a row sees no key of the run (rows {rows}, first key {first}) {LONGFORMER}"
    finite = np.isfinite(expected)
    assert_close(lse[finite], expected[finite], rtol=1e-5, atol=1e-5,
                 name=f"lse (natural log of the denominator, the row max included) {LONGFORMER}")
    assert_close(out, oracles.attention(q, k[:, :, first:], v[:, :, first:], mask, scale=scale), rtol=2e-5,
                 atol=2e-5, name=f"global rows against a run of keys (causal={causal}) {LONGFORMER}")


def test_longformer_global_queries_use_their_own_projections(lab, arrays):
    """HF's ``query_global``/``key_global``/``value_global``: a global query's row comes from them
    alone; every other row from ``q, k, v``."""
    q, k, v = make_qkv(1, 2, 4, 2, 96, 96, 8)
    gq, gk, gv = make_qkv(2, 2, 4, 2, 96, 96, 8)
    for causal, window in ((False, 10), (True, 7)):
        got = lab("sparse").longformer_attention(*(arrays.asarray(x) for x in (q, k, v)), window, (0, 50), causal,
                                                 global_qkv=tuple(arrays.asarray(x) for x in (gq, gk, gv)))
        want = oracles.longformer_attention(q, k, v, window, (0, 50), causal, global_qkv=(gq, gk, gv))
        assert_close(arrays.numpy(got), want, rtol=2e-4, atol=2e-5, mistakes={
            "global rows computed from q, k, v instead of global_qkv":
                oracles.longformer_attention(q, k, v, window, (0, 50), causal)},
            name=f"longformer with global_qkv, causal={causal} {LONGFORMER}")


@pytest.mark.parametrize("L, steps, window", [(90, 4, 9), (40, 3, 64)])
def test_longformer_decode_rows_equal_the_long_call(lab, arrays, L, steps, window):
    """Causal: queries that are the last ``Lq`` positions (a decode step) get the rows of the
    one long call, global queries among them included."""
    q, k, v = make_qkv(L, 1, 4, 2, L + steps, L + steps, 8)
    sparse, xs = lab("sparse"), [arrays.asarray(x) for x in (q, k, v)]
    globals_ = (2, L + 1)
    full = arrays.numpy(sparse.longformer_attention(*xs, window, globals_, True))
    for t in range(L, L + steps):
        row = sparse.longformer_attention(xs[0][:, :, t:t + 1], xs[1][:, :, :t + 1], xs[2][:, :, :t + 1], window,
                                          [g for g in globals_ if g <= t], True)
        assert_close(arrays.numpy(row), full[:, :, t:t + 1], rtol=2e-4, atol=2e-5,
                     name=f"decode row at position {t} {LONGFORMER}")
    assert_close(full, oracles.longformer_attention(q, k, v, window, globals_, True), rtol=2e-4, atol=2e-5,
                 name="the long call")


# ---------------------------------------------------------------- BigBird

@pytest.mark.parametrize("n, r, causal", [(8, 2, False), (12, 3, False), (6, 3, False), (10, 2, True),
                                          (5, 4, True), (1, 2, False), (2, 1, False)])
def test_random_blocks_avoid_what_is_already_seen(lab, arrays, n, r, causal):
    """Per head and query block: -1 for global query blocks; otherwise ``min(r, available)``
    distinct blocks that are not global, not in the window and (causal) in the past."""
    blocks = np.asarray(lab("sparse").bigbird_random_blocks(n, r, 7, heads=3, causal=causal))
    assert blocks.shape == (3, n, r), f"shape (heads, num_blocks, r) = {(3, n, r)}, got {blocks.shape}"
    assert (blocks[:, [0, n - 1]] == -1).all(), "global query blocks 0 and n-1 draw no random block"
    for h in range(3):
        for i in range(1, n - 1):
            chosen = [int(c) for c in blocks[h, i] if c >= 0]
            seen = {0, i - 2, i - 1, i} if causal else {0, n - 1, i - 1, i, i + 1}
            pool = [c for c in range(1, n - 1) if c not in seen and (not causal or c < i)]
            assert len(set(chosen)) == len(chosen), f"head {h} block {i}: a random block drawn twice: {chosen}"
            assert not set(chosen) - set(pool), (f"head {h} block {i}: random blocks {chosen} overlap the window "
                                                  f"or a global block, or lie in the future {BIGBIRD}")
            assert len(chosen) == min(r, len(pool)), \
                f"head {h} block {i}: {len(chosen)} blocks, want min(r, available) = {min(r, len(pool))}"
            assert (blocks[h, i, len(chosen):] == -1).all(), "the unused entries are -1, after the drawn ones"


def test_random_blocks_are_seeded(lab, arrays):
    sparse = lab("sparse")
    a, b = (np.asarray(sparse.bigbird_random_blocks(16, 3, 5, heads=4)) for _ in range(2))
    assert (a == b).all(), "the same seed gives the same blocks"
    c = np.asarray(sparse.bigbird_random_blocks(16, 3, 6, heads=4))
    assert (a != c).any(), "another seed gives other blocks"
    assert len({tuple(a[h].ravel()) for h in range(4)}) > 1, "each head draws its own blocks"


@pytest.mark.parametrize("B, Hq, Hkv, n, b, r, causal", [
    (1, 4, 2, 8, 4, 2, False), (2, 2, 1, 10, 3, 1, True), (1, 2, 2, 3, 5, 2, False), (1, 2, 1, 1, 7, 2, True),
    (1, 2, 2, 12, 2, 3, True), (1, 3, 3, 9, 8, 3, False), (1, 2, 2, 2, 4, 1, True), (1, 2, 1, 7, 1, 2, False)])
def test_bigbird_equals_oracle(lab, arrays, B, Hq, Hkv, n, b, r, causal):
    q, k, v = make_qkv(n * b + r, B, Hq, Hkv, n * b, n * b, 8)
    sparse = lab("sparse")
    blocks = np.asarray(sparse.bigbird_random_blocks(n, r, 3, heads=Hq, causal=causal))
    got = sparse.bigbird_attention(*(arrays.asarray(x) for x in (q, k, v)), b, r, 3, causal)
    none = np.full_like(blocks, -1)
    mistakes = {"random blocks ignored": oracles.bigbird_attention(q, k, v, b, none, causal)}
    if n > 3 and not causal:
        twice = oracles.bigbird_counts(Hq, n, b, none, causal)
        twice[:, b:2 * b, :b] += 1  # block 1's window meets global block 0
        mistakes["a window block that is also global counted twice"] = oracles.weighted_attention(q, k, v, twice[None])
    assert_close(arrays.numpy(got), oracles.bigbird_attention(q, k, v, b, blocks, causal), rtol=2e-4, atol=2e-5,
                 mistakes=mistakes, name=f"bigbird n={n} b={b} r={r} causal={causal} {BIGBIRD}")


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_given_random_blocks_count_as_often_as_they_appear(lab, arrays, causal):
    """``random_blocks=0`` is HF's evaluation mode: every middle block attends to block 0 ``1 + r``
    times. Explicit blocks (duplicates included) are used as given."""
    n, b, r, Hq = 9, 4, 2, 2
    q, k, v = make_qkv(4, 1, Hq, 1, n * b, n * b, 8)
    sparse, xs = lab("sparse"), [arrays.asarray(x) for x in (q, k, v)]
    zeros = np.zeros((Hq, n, r), np.int64)
    zeros[:, [0, n - 1]] = -1
    got = sparse.bigbird_attention(*xs, b, r, 0, causal, random_blocks=0)
    assert_close(arrays.numpy(got), oracles.bigbird_attention(q, k, v, b, zeros, causal), rtol=2e-4, atol=2e-5,
                 mistakes={"duplicate blocks counted once": oracles.bigbird_attention(
                     q, k, v, b, np.full_like(zeros, -1), causal)},
                 name=f"bigbird with random_blocks=0 (HF eval), causal={causal} {BIGBIRD}")
    rng = np.random.default_rng(1)
    given_blocks = rng.integers(-1, n, (Hq, n, r))
    want_blocks = given_blocks.copy()
    want_blocks[:, [0, n - 1]] = -1
    got = sparse.bigbird_attention(*xs, b, r, 0, causal, random_blocks=given_blocks)
    assert_close(arrays.numpy(got), oracles.bigbird_attention(q, k, v, b, want_blocks, causal), rtol=2e-4,
                 atol=2e-5, name=f"bigbird with explicit random_blocks, causal={causal} {BIGBIRD}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_with_large_logits(lab, arrays, dtype):
    q, k, v = make_qkv(6, 1, 4, 2, 96, 96, 16, std=6.0)
    xs = [arrays.asarray(x, dtype) for x in (q, k, v)]
    exact = [arrays.numpy(x) for x in xs]
    sparse = lab("sparse")
    got = sparse.longformer_attention(*xs, 6, (0, 40), True)
    assert arrays.dtype_name(got) == dtype, f"the output keeps the input dtype {dtype}"
    assert_close(arrays.numpy(got), oracles.longformer_attention(*exact, 6, (0, 40), True), rtol=3e-2, atol=3e-2,
                 name=f"longformer in {dtype}")
    got = sparse.bigbird_attention(*xs, 8, 2, 0, False)
    blocks = np.asarray(sparse.bigbird_random_blocks(12, 2, 0, heads=4))
    assert arrays.dtype_name(got) == dtype, f"the output keeps the input dtype {dtype}"
    assert_close(arrays.numpy(got), oracles.bigbird_attention(*exact, 8, blocks), rtol=3e-2, atol=3e-2,
                 name=f"bigbird in {dtype}")


@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_peak_memory_grows_linearly(lab, arrays, record, name):
    """Gathered by blocks, not masked: 4x the length costs ~4x the memory (an L x L mask: 16x)."""
    sparse = lab("sparse")
    run = {"longformer": lambda q, k, v: sparse.longformer_attention(q, k, v, 64, (0, 5), True),
           "bigbird": lambda q, k, v: sparse.bigbird_attention(q, k, v, 32, 2, 0, True)}[name]
    peaks = {}
    for L in (1024, 4096):
        q, k, v = (arrays.asarray(x) for x in make_qkv(L, 1, 2, 2, L, L, 16))
        peaks[L] = arrays.peak_bytes(lambda: run(q, k, v))
    growth = peaks[4096] / max(peaks[1024], 1)
    record(f"{name} peak memory L=4096 vs 1024", f"{growth:.1f}x (linear 4x, quadratic 16x)")
    assert peaks[1024] > 0, "no memory measured: is the work done lazily and never evaluated?"
    assert growth < 7.0, f"{name}: peak memory grew {growth:.1f}x when L grew 4x: something is L x L"


@pytest.mark.parametrize("causal", [True, False])
def test_longformer_trains_with_the_oracles_gradient(lab, arrays, causal):
    """Training through Longformer: local rows, global rows (their whole past) and global keys."""
    L, window, glob = (37, 6, (0, 9)) if causal else (36, 6, (3,))
    q, k, v, w = gradient_inputs(L, L, seed=12)
    layer = lab("sparse").LongformerAttention(window, glob, causal=causal)
    mask = oracles.longformer_mask(L, L, window, glob, causal)
    assert_gradients_close(arrays.grads(layer, q, k, v, w), reference_grads(weighted(mask), q, k, v, w),
                           name=f"LongformerAttention({window}, {glob}, causal={causal})")


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_trains_with_the_oracles_gradient(lab, arrays, causal):
    """Training through BigBird: a key counted twice in a row's softmax gets twice the gradient."""
    sparse = lab("sparse")
    q, k, v, w = gradient_inputs(48, 48, seed=13)
    blocks = np.asarray(sparse.bigbird_random_blocks(6, 2, 0, heads=4, causal=causal))
    counts = oracles.bigbird_counts(4, 6, 8, blocks, causal)
    assert_gradients_close(arrays.grads(sparse.BigBirdAttention(8, 2, 0, causal=causal), q, k, v, w),
                           reference_grads(weighted(counts), q, k, v, w),
                           name=f"BigBirdAttention(8, 2, causal={causal})")
