"""Graded tests, Task 2: hierarchical (LongNet dilated) attention.

Run: ``pytest labs/week3 --task 2`` (your stubs), ``--impl solutions`` or
``--impl torch``. Expected values come from float64 oracles in
``longctx.testing.oracles`` (``dilated_pairs``, ``hierarchical_attention``).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from longctx.testing import assert_close, oracles
from longctx.testing.gradients import assert_gradients_close, gradient_inputs, reference_grads, weighted
from longctx.testing.inputs import make_qkv
from longctx.testing.oracles import (attention, causal_mask, dilated_attention, dilated_pairs,
                                     hierarchical_attention, hierarchical_mistakes)

pytestmark = pytest.mark.task(2)


def run_level(lab, arrays, q, k, v, w, r, dtype="float32", **kw):
    out, lse = lab("hierarchical").dilated_attention(arrays.asarray(q, dtype), arrays.asarray(k, dtype),
                                                     arrays.asarray(v, dtype), w, r, **kw)
    return out, lse


def check_level(lab, arrays, q, k, v, w, r, **kw):
    out, lse = run_level(lab, arrays, q, k, v, w, r, **kw)
    want_out, want_lse = dilated_attention(q, k, v, w, r, **kw)
    assert arrays.dtype_name(out) == "float32", f"out dtype {arrays.dtype_name(out)}, expected float32 (the dtype of q)"
    lse = arrays.numpy(lse)
    assert lse.shape == want_lse.shape, f"lse shape {lse.shape}, expected (B, Hq, Lq) = {want_lse.shape}"
    kept, got_kept = np.isfinite(want_lse), np.isfinite(lse)
    if not np.array_equal(kept, got_kept):
        b, h, i = (int(x) for x in np.argwhere(kept != got_kept)[0])
        hint = ""
        if kw.get("head_offsets", True):
            same = np.isfinite(dilated_attention(q, k, v, w, r, **{**kw, "head_offsets": False})[1])
            if np.array_equal(same, got_kept):
                hint = " -- looks like every head uses offset 0 (the offset must be h // ceil(Hq / r))"
        raise AssertionError(f"kept queries differ at [B={b}, H={h}, L={i}]: lse finite = {bool(got_kept[b, h, i])}, "
                             f"expected {bool(kept[b, h, i])} (lse must be -inf exactly where a head does not "
                             f"keep the query){hint}")
    assert_close(np.where(kept, lse, 0.0), np.where(kept, want_lse, 0.0), rtol=1e-4, atol=2e-5, name="lse",
                 axes=("B", "H", "L"))
    mistakes = {"dilation offset not per head (every head keeps offset 0)":
                dilated_attention(q, k, v, w, r, **{**kw, "head_offsets": False})[0]}
    assert_close(arrays.numpy(out), want_out, rtol=2e-4, atol=2e-5, mistakes=mistakes)


def run_mix(lab, arrays, q, k, v, levels, dilations=None, dtype="float32", **kw):
    attn = lab("hierarchical").HierarchicalAttention(levels, dilations, **kw)
    return attn(arrays.asarray(q, dtype), arrays.asarray(k, dtype), arrays.asarray(v, dtype))


def check_mix(lab, arrays, q, k, v, levels, dilations=None, causal=True, rtol=2e-4, atol=2e-5):
    out = run_mix(lab, arrays, q, k, v, levels, dilations, causal=causal)
    assert arrays.dtype_name(out) == "float32", f"output dtype {arrays.dtype_name(out)}, expected float32"
    assert_close(arrays.numpy(out), hierarchical_attention(q, k, v, levels, dilations, causal=causal),
                 rtol=rtol, atol=atol, mistakes=hierarchical_mistakes(q, k, v, levels, dilations, causal=causal))


# ---------------------------------------------------------------- one level

@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), rep=st.sampled_from([1, 2, 4]), Lk=st.integers(1, 160),
       q_frac=st.sampled_from([1.0, 1.0, 0.3, 0.0]), D=st.sampled_from([3, 8, 16]), w=st.integers(1, 48),
       r_frac=st.floats(0, 1), causal=st.booleans(), head_offsets=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_level_equals_oracle_random_shapes(lab, arrays, B, Hkv, rep, Lk, q_frac, D, w, r_frac, causal, head_offsets,
                                           seed):
    """Segments that do not divide L, dilations that do not divide the segment or the heads, GQA, Lq < Lk."""
    r = 1 + int(r_frac * (w - 1))
    Lq = max(1, int(Lk * q_frac))
    q, k, v = make_qkv(seed, B, Hkv * rep, Hkv, Lq, Lk, D)
    check_level(lab, arrays, q, k, v, w, r, causal=causal, head_offsets=head_offsets)


@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, w, r", [
    (1, 4, 4, 37, 37, 8, 8, 2),     # L not a multiple of w
    (1, 8, 2, 64, 64, 16, 16, 4),   # GQA 4:1, heads split into 4 offset groups
    (1, 3, 1, 50, 50, 8, 12, 5),    # r does not divide w, Hq not a multiple of r
    (2, 2, 1, 1, 90, 8, 32, 4),     # one decode step: its segment only
    (1, 4, 2, 13, 70, 8, 16, 2),    # a chunk of queries that starts mid-segment
    (1, 6, 3, 20, 20, 8, 64, 8),    # segment larger than L
    (1, 2, 2, 30, 30, 4, 1, 1),     # w = 1: every query sees only itself
])
def test_level_equals_oracle_awkward_cases(lab, arrays, B, Hq, Hkv, Lq, Lk, D, w, r):
    q, k, v = make_qkv(Lk * 7 + w, B, Hq, Hkv, Lq, Lk, D)
    check_level(lab, arrays, q, k, v, w, r)


def test_each_head_keeps_its_own_offset(lab, arrays):
    """Hq = r = 4: head h keeps exactly the positions t with (t - s0) % 4 == h."""
    q, k, v = make_qkv(11, 1, 4, 4, 24, 24, 8)
    _, lse = run_level(lab, arrays, q, k, v, 8, 4)
    kept = np.isfinite(arrays.numpy(lse))[0]
    for h in range(4):
        want = (np.arange(24) % 8) % 4 == h
        assert np.array_equal(kept[h], want), (
            f"head {h} keeps positions {np.flatnonzero(kept[h]).tolist()}, expected "
            f"{np.flatnonzero(want).tolist()} (offset h // ceil(Hq / r) = {h}); the dilation offset must be per head")


def test_kept_pattern_equals_oracle_pairs(lab, arrays):
    """A single key carries a large value: the output reveals which keys each query saw."""
    Hq, L, w, r = 4, 40, 16, 4
    pairs = dilated_pairs(Hq, L, L, w, r)
    q = np.zeros((1, Hq, L, 4))
    k = np.zeros((1, Hq, L, 4))
    for j in (0, 5, 17, 22, 33):
        v = np.zeros((1, Hq, L, 4))
        v[0, :, j] = 1.0
        out, _ = run_level(lab, arrays, q, k, v, w, r)
        got = arrays.numpy(out)[0, :, :, 0] > 0  # (Hq, L): queries that saw key j
        assert np.array_equal(got, pairs[:, :, j]), (
            f"queries that see key {j}: got {[np.flatnonzero(g).tolist() for g in got]}, expected "
            f"{[np.flatnonzero(p).tolist() for p in pairs[:, :, j]]}")


# ---------------------------------------------------------------- the mix of levels

@given(Hkv=st.integers(1, 2), rep=st.sampled_from([1, 2, 3]), Lk=st.integers(1, 150),
       q_frac=st.sampled_from([1.0, 1.0, 0.4]), base=st.sampled_from([2, 4, 8, 16]), nlev=st.integers(1, 3),
       custom=st.booleans(), causal=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_mix_equals_union_softmax(lab, arrays, Hkv, rep, Lk, q_frac, base, nlev, custom, causal, seed):
    """LSE-mixed levels == one softmax over the union of their keys, with multiplicity."""
    levels = [base * 3 ** i for i in range(nlev)]
    dilations = [1] + [1 + (seed + i) % (levels[i] // 2 or 1) for i in range(1, nlev)] if custom else None
    Lq = max(1, int(Lk * q_frac))
    q, k, v = make_qkv(seed, 1, Hkv * rep, Hkv, Lq, Lk, 8)
    check_mix(lab, arrays, q, k, v, levels, dilations, causal=causal)


@pytest.mark.parametrize("levels, dilations, Lq, Lk", [
    ([64, 512, 4096], None, 300, 300),   # the spec's default levels; the larger two exceed L
    ([8, 32], [1, 4], 77, 77),
    ([5, 11, 23], [1, 2, 7], 100, 100),  # nothing divides anything
    ([16, 64], None, 1, 129),            # a decode step
    ([4], None, 33, 33),                 # one level
])
def test_mix_awkward_cases(lab, arrays, levels, dilations, Lq, Lk):
    q, k, v = make_qkv(Lk + len(levels), 1, 4, 2, Lq, Lk, 16)
    check_mix(lab, arrays, q, k, v, levels, dilations)


def test_levels_are_mixed_by_lse_not_averaged(lab, arrays):
    """Two levels see very different amounts of evidence: averaging them is visibly wrong."""
    q, k, v = make_qkv(5, 1, 2, 2, 64, 64, 8, std=2.0)
    check_mix(lab, arrays, q, k, v, [4, 64], [1, 1])


@given(L=st.integers(1, 120), extra=st.integers(0, 50), seed=st.integers(0, 999))
def test_one_level_covering_the_sequence_is_full_attention(lab, arrays, L, extra, seed):
    q, k, v = make_qkv(seed, 1, 4, 2, L, L, 8)
    out = run_mix(lab, arrays, q, k, v, [L + extra], [1])
    assert_close(arrays.numpy(out), attention(q, k, v, causal_mask(L, L)), rtol=2e-4, atol=2e-5)
    out = run_mix(lab, arrays, q, k, v, [L + extra], [1], causal=False)
    assert_close(arrays.numpy(out), attention(q, k, v), rtol=2e-4, atol=2e-5, name="non-causal output")


def test_custom_scale(lab, arrays):
    q, k, v = make_qkv(3, 1, 4, 2, 40, 40, 16)
    attn = lab("hierarchical").HierarchicalAttention([8, 32], scale=0.3)
    out = attn(arrays.asarray(q), arrays.asarray(k), arrays.asarray(v))
    assert_close(arrays.numpy(out), hierarchical_attention(q, k, v, [8, 32], scale=0.3), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("dtype, rtol, atol", [("float16", 2e-2, 2e-2), ("bfloat16", 6e-2, 6e-2)])
def test_low_precision_large_logits(lab, arrays, dtype, rtol, atol):
    """std-30 inputs: raw logits in the thousands overflow a float16 softmax that is not max-subtracted."""
    q, k, v = make_qkv(9, 1, 4, 2, 96, 96, 32, std=30.0)
    q, k, v = (arrays.numpy(arrays.asarray(x, dtype)) for x in (q, k, v))  # what the low-precision input holds
    out = run_mix(lab, arrays, q, k, v, [8, 32], dtype=dtype)
    assert arrays.dtype_name(out) == dtype, f"output dtype {arrays.dtype_name(out)}, expected {dtype}"
    assert_close(arrays.numpy(out), hierarchical_attention(q, k, v, [8, 32]), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- gathered, not masked

def test_memory_grows_linearly(lab, arrays, record):
    """Levels [32, 128, 512]: peak memory for 4x the length must grow ~4x (an L x L mask: 16x)."""
    attn = lab("hierarchical").HierarchicalAttention([32, 128, 512])
    peaks = {}
    for L in (1024, 4096):
        q, k, v = (arrays.asarray(x) for x in make_qkv(L, 1, 4, 2, L, L, 32))
        arrays.numpy(attn(q, k, v))  # warm-up
        peaks[L] = arrays.peak_bytes(lambda: attn(q, k, v))
    growth = peaks[4096] / max(peaks[1024], 1)
    record("memory x4 L", f"{growth:.1f}x ({peaks[4096] / 2**20:.0f} MiB at L=4096)")
    assert growth < 7, (f"peak memory grew {growth:.1f}x for 4x the length ({peaks[1024] / 2**20:.1f} -> "
                        f"{peaks[4096] / 2**20:.1f} MiB): gather the kept rows per segment instead of masking "
                        f"an L x L score matrix")


@pytest.mark.parametrize("causal", [True, False])
def test_trains_with_the_oracles_gradient(lab, arrays, causal):
    """Training through the layer: the levels are mixed through their log-sum-exps, so ``dq`` and
    ``dk`` flow through them too; the gradient is dense float64 attention's in which a key counts
    once per level that keeps the pair."""
    q, k, v, w = gradient_inputs(37, 37, seed=2)
    layer = lab("hierarchical").HierarchicalAttention([8, 32], causal=causal)
    counts = oracles.hierarchical_counts(4, 37, 37, [8, 32], causal=causal)
    assert_gradients_close(arrays.grads(layer, q, k, v, w), reference_grads(weighted(counts), q, k, v, w),
                           name=f"HierarchicalAttention([8, 32], causal={causal})")
