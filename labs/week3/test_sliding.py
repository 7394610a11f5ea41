"""Graded tests, Task 1: sliding-window attention.

Run: ``pytest labs/week3 --task 1`` (your stubs), ``--impl solutions`` (the
MLX reference), ``--impl torch`` (the PyTorch mirror). Expected values come
from float64 oracles in ``longctx.testing.oracles``.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from longctx.testing import assert_close, assert_mask_equal
from longctx.testing.gradients import assert_gradients_close, gradient_inputs, reference_grads, weighted
from longctx.testing.inputs import make_qkv
from longctx.testing.oracles import sliding_mask, sliding_mistakes, sliding_window_attention, weighted_attention

pytestmark = pytest.mark.task(1)


def run(lab, arrays, window, q, k, v, *, scale=None, dtype="float32"):
    attn = lab("sliding").SlidingWindowAttention(window_size=window, scale=scale)
    return attn(arrays.asarray(q, dtype), arrays.asarray(k, dtype), arrays.asarray(v, dtype))


def check(lab, arrays, window, q, k, v, *, scale=None, rtol=2e-4, atol=2e-5):
    out = run(lab, arrays, window, q, k, v, scale=scale)
    assert arrays.dtype_name(out) == "float32", f"output dtype {arrays.dtype_name(out)}, expected float32 (the dtype of q)"
    assert_close(arrays.numpy(out), sliding_window_attention(q, k, v, window, scale=scale), rtol=rtol, atol=atol,
                 mistakes=sliding_mistakes(q, k, v, window, scale=scale))


# ---------------------------------------------------------------- the mask

@pytest.mark.parametrize("seq_len, offset, window", [(1, 0, 1), (7, 0, 3), (9, 0, 1), (10, 0, 20),
                                                     (6, 5, 4), (3, 17, 8), (33, 2, 32)])
def test_mask_shape_and_row_sums(lab, arrays, seq_len, offset, window):
    attn = lab("sliding").SlidingWindowAttention(window_size=window)
    mask = arrays.numpy(attn.create_sliding_mask(seq_len, offset))
    assert mask.shape == (seq_len, offset + seq_len), f"mask shape {mask.shape}, expected {(seq_len, offset + seq_len)}"
    rows = mask.sum(axis=1)
    want = np.minimum(offset + np.arange(seq_len) + 1, window)
    assert np.array_equal(rows, want), f"row sums {rows.tolist()}, expected min(offset + i + 1, W) = {want.tolist()}"


@given(seq_len=st.integers(1, 70), offset=st.integers(0, 40), window=st.integers(1, 90))
def test_mask_equals_oracle(lab, arrays, seq_len, offset, window):
    mask = arrays.numpy(lab("sliding").SlidingWindowAttention(window_size=window).create_sliding_mask(seq_len, offset))
    lk = offset + seq_len
    p, j = np.arange(offset, lk)[:, None], np.arange(lk)[None, :]
    assert_mask_equal(mask, sliding_mask(seq_len, lk, window), mistakes={
        "the band is two-sided: future positions are visible": np.abs(j - p) < window,
        "window off by one: window_size + 1 keys visible": sliding_mask(seq_len, lk, window + 1),
        "window off by one: window_size - 1 keys visible": sliding_mask(seq_len, lk, window - 1),
        "offset ignored: rows placed at positions 0 .. seq_len-1": (j <= p - offset) & (j > p - offset - window),
    })


# ---------------------------------------------------------------- attention values

@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), rep=st.sampled_from([1, 2, 3]), Lk=st.integers(1, 300),
       q_frac=st.sampled_from([1.0, 1.0, 0.5, 0.0]), D=st.sampled_from([3, 8, 16, 24]),
       window=st.integers(1, 320), seed=st.integers(0, 2 ** 16))
def test_equals_oracle_random_shapes(lab, arrays, B, Hkv, rep, Lk, q_frac, D, window, seed):
    """Random shapes: L not a multiple of any block, W = 1, W >= L, GQA, Lq < Lk, batch > 1."""
    Lq = max(1, int(Lk * q_frac))
    q, k, v = make_qkv(seed, B, Hkv * rep, Hkv, Lq, Lk, D)
    check(lab, arrays, window, q, k, v)


@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, window", [
    (1, 1, 1, 1, 1, 8, 1),        # one token
    (2, 4, 2, 33, 33, 16, 1),     # window 1: each query sees only itself
    (1, 2, 1, 129, 129, 32, 64),  # L = 2W + 1
    (2, 6, 2, 100, 100, 8, 100),  # W = L
    (1, 4, 4, 50, 50, 16, 4096),  # W >> L
    (1, 8, 2, 1, 257, 64, 32),    # one decode step deep in the sequence, GQA 4:1
    (1, 2, 2, 17, 300, 16, 50),   # a chunk of 17 queries at the end of 300 keys
    (3, 2, 1, 64, 64, 8, 16),     # batch rows must not mix
])
def test_equals_oracle_awkward_cases(lab, arrays, B, Hq, Hkv, Lq, Lk, D, window):
    q, k, v = make_qkv(B * 1000 + Lk, B, Hq, Hkv, Lq, Lk, D)
    check(lab, arrays, window, q, k, v)


def test_window_one_returns_own_value(lab, arrays):
    q, k, v = make_qkv(7, 1, 4, 2, 20, 20, 8)
    out = arrays.numpy(run(lab, arrays, 1, q, k, v))
    want = np.repeat(v, 2, axis=1)  # query head h reads kv head h // 2
    assert_close(out, want, rtol=1e-5, atol=1e-6, mistakes={
        "GQA heads mapped as h % Hkv instead of h // (Hq // Hkv)": v[:, [0, 1, 0, 1]]})


@given(L=st.integers(1, 150), extra=st.integers(0, 60), seed=st.integers(0, 999))
def test_window_at_least_length_is_causal_attention(lab, arrays, L, extra, seed):
    from longctx.testing.oracles import attention, causal_mask
    q, k, v = make_qkv(seed, 1, 2, 1, L, L, 8)
    out = arrays.numpy(run(lab, arrays, L + extra, q, k, v))
    assert_close(out, attention(q, k, v, causal_mask(L, L)), rtol=2e-4, atol=2e-5)


def test_custom_scale(lab, arrays):
    q, k, v = make_qkv(3, 1, 2, 2, 40, 40, 16)
    check(lab, arrays, 9, q, k, v, scale=0.37)


@pytest.mark.parametrize("L, window, steps", [(96, 16, 5), (70, 200, 3), (130, 1, 4)])
def test_decode_rows_equal_prefill_rows(lab, arrays, L, window, steps):
    """Decoding the last tokens one at a time (Lq = 1, Lk growing) gives the prefill's last rows."""
    q, k, v = make_qkv(L, 2, 4, 2, L, L, 16)
    full = arrays.numpy(run(lab, arrays, window, q, k, v))
    for t in range(L - steps, L):
        step = arrays.numpy(run(lab, arrays, window, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1]))
        assert_close(step, full[:, :, t:t + 1], rtol=2e-4, atol=2e-5, name=f"decode step at position {t}",
                     mistakes=sliding_mistakes(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], window))


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-2), ("bfloat16", 3e-2)])
def test_low_precision_with_large_logits(lab, arrays, dtype, tol):
    """Scores up to ~1e5 before scaling overflow float16: accumulate in float32, subtract the row max."""
    q, k, v = make_qkv(11, 1, 4, 2, 80, 80, 64, std=60.0)
    q16, k16, v16 = (arrays.numpy(arrays.asarray(x, dtype)) for x in (q, k, v))  # the values the kernel really sees
    out = run(lab, arrays, 24, q, k, v, dtype=dtype)
    assert arrays.dtype_name(out) == dtype, f"output dtype {arrays.dtype_name(out)}, expected {dtype} (the dtype of q)"
    assert_close(arrays.numpy(out), sliding_window_attention(q16, k16, v16, 24), rtol=tol, atol=tol)


# ---------------------------------------------------------------- stretch: the fused kernel

@pytest.mark.task(1, stretch=True)
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float16", 5e-3)])
def test_stretch_fused_kernel_equals_the_oracle(lab, arrays, dtype, tol):
    """``_kernel_source`` (the stretch exercise), launched by the given ``_fused``, on an Apple GPU
    or MLX's CUDA backend: GQA, a decode-like ``Lq < Lk``, a window wider than the keys."""
    if not arrays.gpu_kernels:
        pytest.skip("the fused kernel runs on an Apple GPU or MLX's CUDA backend")
    sliding = lab("sliding")
    for B, Hq, Hkv, Lq, Lk, D, W in [(1, 4, 2, 100, 100, 64, 17), (2, 8, 8, 1, 300, 128, 64),
                                     (1, 2, 1, 37, 260, 32, 500)]:
        q, k, v = make_qkv(D + W, B, Hq, Hkv, Lq, Lk, D)
        seen = [arrays.numpy(arrays.asarray(x, dtype)) for x in (q, k, v)]
        out = sliding._fused(*(arrays.asarray(x, dtype) for x in (q, k, v)), W, D ** -0.5)
        assert_close(arrays.numpy(out), sliding_window_attention(*seen, W), rtol=tol, atol=tol,
                     name=f"fused kernel, {dtype}, B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} W={W}")


# ---------------------------------------------------------------- stretch: the band backward

@pytest.mark.task(1, stretch=True)
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, W, dtype, steps", [
    (1, 4, 2, 50, 50, 8, 7, "float32", "one"),  # GQA: dK, dV summed over a kv head's query heads
    (2, 2, 1, 37, 100, 16, 1, "float32", "one"),  # batch 2, window 1, decode offset (Lq < Lk)
    (1, 2, 2, 30, 30, 8, 100, "float32", "one"),  # window > L
    (1, 6, 2, 90, 130, 16, 40, "float32", "many"),  # a step per query block: overlapping windows added back
    (1, 2, 1, 64, 64, 32, 24, "float16", "one"),  # half precision in, float32 inside
])
def test_stretch_band_backward_equals_the_oracles_gradient(lab, arrays, monkeypatch, B, Hq, Hkv, Lq, Lk, D, W, dtype,
                                                           steps):
    """``_band_backward`` (the stretch exercise; the MLX reference's backward for its fused GPU kernels)
    against float64 autograd, given the exact forward output: the rowsum(dO * O) term, the scale in
    dQ and dK, GQA's sum over query heads, and every tile's keys added back where they came from."""
    sliding = lab("sliding")
    if not hasattr(sliding, "_band_backward"):
        pytest.skip("the torch mirror's backward is autograd's (and its Triton kernels' on CUDA)")
    if steps == "many":
        monkeypatch.setattr(sliding, "TILE_ELEMENTS", 1)
    q, k, v = make_qkv(Lq + W, B, Hq, Hkv, Lq, Lk, D)
    w = np.random.default_rng(W).standard_normal(q.shape)
    seen = [arrays.numpy(arrays.asarray(x, dtype)).astype(np.float64) for x in (q, k, v, w)]
    out = sliding_window_attention(*seen[:3], W)
    got = sliding._band_backward(*(arrays.asarray(x, dtype) for x in (*seen[:3], out, seen[3])), W, D ** -0.5)
    assert [arrays.dtype_name(g) for g in got] == [dtype] * 3, "dq, dk, dv must come back in the inputs' dtype"
    want = reference_grads(weighted(sliding_mask(Lq, Lk, W)), *seen)
    assert_gradients_close([arrays.numpy(g) for g in got], want, tol=2e-5 if dtype == "float32" else 5e-3,
                           name=f"band backward B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} W={W} {dtype}")


# ---------------------------------------------------------------- growth, not time

def test_peak_memory_grows_linearly_in_length(lab, arrays, record):
    """At a fixed window, 4x the length may cost ~4x the memory (an L x L score matrix costs 16x)."""
    attn = lab("sliding").SlidingWindowAttention(window_size=32)
    peaks = {}
    for L in (1024, 2048, 4096):
        q, k, v = (arrays.asarray(x) for x in make_qkv(L, 1, 2, 2, L, L, 16))
        peaks[L] = arrays.peak_bytes(lambda: attn(q, k, v))
    growth = peaks[4096] / max(peaks[1024], 1)
    record("peak memory L=4096 vs 1024", f"{growth:.1f}x (linear 4x, quadratic 16x)")
    assert peaks[1024] > 0, "no memory measured: is the work done lazily and never evaluated?"
    assert growth < 7.0, (f"peak memory grew {growth:.1f}x when L grew 4x "
                          f"({ {L: f'{b / 2**20:.1f} MiB' for L, b in peaks.items()} }): something is L x L")


# ---------------------------------------------------------------- global tokens (Longformer's, in a causal window)

@given(seq_len=st.integers(1, 60), offset=st.integers(0, 40), window=st.integers(1, 30),
       globals_=st.lists(st.integers(0, 99), max_size=4))
def test_global_tokens_mask_equals_oracle(lab, arrays, seq_len, offset, window, globals_):
    """A global position is visible to every query at or after it, inside the window or not."""
    globals_ = [g for g in globals_ if g < offset + seq_len]
    attn = lab("sliding").SlidingWindowAttention(window_size=window, global_tokens=globals_)
    got = arrays.numpy(attn.create_sliding_mask(seq_len, offset)).astype(bool)
    assert_mask_equal(got, sliding_mask(seq_len, offset + seq_len, window, globals_),
                      name=f"mask with global_tokens={globals_} (book: Task 1, \"Global tokens\")")


@pytest.mark.parametrize("Hq, Hkv, Lq, Lk, window, globals_", [
    (4, 2, 300, 300, 17, (0, 3, 150)),  # a global inside some windows: counted once
    (2, 1, 5, 90, 8, (1, 80, 89)),  # decode rows; globals after some queries stay unseen
    (2, 2, 50, 50, 100, (2,)),  # window > L: every global is inside every window
    (2, 2, 1, 70, 1, (0, 69)),  # window 1: the query itself plus the sinks
    (3, 3, 130, 130, 5, tuple(range(0, 130, 7))),  # many globals
])
def test_global_tokens_attention_equals_oracle(lab, arrays, Hq, Hkv, Lq, Lk, window, globals_):
    q, k, v = make_qkv(Lk + window, 1, Hq, Hkv, Lq, Lk, 16)
    attn = lab("sliding").SlidingWindowAttention(window_size=window, global_tokens=globals_)
    out = attn(*(arrays.asarray(x) for x in (q, k, v)))
    want = sliding_window_attention(q, k, v, window, global_tokens=globals_)
    inside = np.isin(np.arange(Lk), globals_)[None, :] & sliding_mask(Lq, Lk, window)
    mistakes = {"global tokens ignored (plain sliding window)": sliding_window_attention(q, k, v, window)}
    if inside.any():
        counts = sliding_mask(Lq, Lk, window, globals_) + inside  # a global inside the window twice
        mistakes["global tokens counted twice when inside the window (take them out of the band)"] = \
            weighted_attention(q, k, v, counts)
    assert_close(arrays.numpy(out), want, rtol=2e-4, atol=2e-5, mistakes=mistakes,
                 name=f"global_tokens={globals_[:5]}... (book: Task 1, \"Global tokens\")")


# ---------------------------------------------------------------- speed (last: right before fast)

def test_faster_than_dense_masked_attention(lab, arrays, record):
    """Against the naive baseline in the same process: a dense L x L masked softmax.
    Doing the band's work only must win by far; visiting every key (quadratic time) cannot.
    The two run in turn and the fastest of each is compared, so another program on the machine
    slows both alike."""
    L, W = 4096, 32
    attn = lab("sliding").SlidingWindowAttention(window_size=W)
    q, k, v = (arrays.asarray(x) for x in make_qkv(5, 1, 2, 2, L, L, 16))
    mask = sliding_mask(L, L, W)
    sliding, dense = arrays.race(lambda: attn(q, k, v), lambda: arrays.masked_attention(q, k, v, mask), rounds=4)
    record("speed vs dense masked SDPA (L=4096, W=32)", f"{dense / sliding:.1f}x faster")
    assert sliding < 0.5 * dense, (f"sliding took {sliding * 1e3:.1f} ms, the dense masked baseline "
                                   f"{dense * 1e3:.1f} ms: the work should grow as L * W, not L * L")


@pytest.mark.parametrize("Lq, Lk, window, glob", [(37, 37, 1, ()), (37, 37, 7, ()), (20, 37, 5, ()),
                                                  (20, 37, 4, (0, 9, 30))])
def test_trains_with_the_oracles_gradient(lab, arrays, Lq, Lk, window, glob):
    """Training through the layer: ``dq, dk, dv`` are those of dense float64 attention under the
    window (GQA, queries the last ``Lq`` of ``Lk``, global tokens)."""
    q, k, v, w = gradient_inputs(Lq, Lk, seed=window)
    layer = lab("sliding").SlidingWindowAttention(window, global_tokens=glob)
    assert_gradients_close(arrays.grads(layer, q, k, v, w),
                           reference_grads(weighted(sliding_mask(Lq, Lk, window, glob)), q, k, v, w),
                           name=f"SlidingWindowAttention({window}, global_tokens={glob}), Lq={Lq}, Lk={Lk}")
