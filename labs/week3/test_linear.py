"""Graded tests, Task 11: linear attention (Katharopoulos et al. 2020).

Run: ``pytest labs/week3 --task 11`` (your stubs), ``--impl solutions`` or
``--impl torch``. Expected values come from ``longctx.testing.oracles.linear_attention``:
a float64 loop over tokens that adds ``phi(k_j) v_j^T`` to the state and reads it with
``phi(q_i)``, ``phi(x) = elu(x) + 1``.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.testing import assert_close, oracles
from longctx.testing.gradients import assert_gradients_close, gradient_inputs, linear_quadratic, reference_grads
from longctx.testing.inputs import make_qkv

pytestmark = pytest.mark.task(11)
CHAPTER = "(book: Task 11, \"Three forms of one computation\")"


def mistakes(q, k, v, state=None):
    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    return {
        "feature map missing (phi(x) = x)": oracles.linear_attention(q, k, v, state, phi=lambda x: x)[0],
        "relu without the + 1 (phi(x) = max(x, 0))": oracles.linear_attention(q, k, v, state, phi=relu)[0],
        "the normaliser phi(q) . z is dropped": oracles.linear_attention(q, k, v, state, normalise=False)[0],
    }


def as_state(arrays, state):
    return tuple(arrays.asarray(x) for x in state)


def empty(B, Hkv, D):
    return np.zeros((B, Hkv, D, D)), np.zeros((B, Hkv, D))


def test_feature_map_is_elu_plus_one(lab, arrays):
    x = np.array([-30.0, -2.0, -0.5, 0.0, 1e-3, 0.7, 3.0, 50.0])
    got = arrays.numpy(lab("linear").feature_map(arrays.asarray(x)))
    assert_close(got, oracles.elu_plus_one(x), rtol=1e-6, atol=1e-7, axes=("x",),
                 name="feature_map = elu(x) + 1: positive everywhere, x + 1 above 0, exp(x) below")


SHAPES = [(1, 1, 1, 1, 4), (1, 2, 2, 7, 8), (2, 4, 2, 19, 8), (1, 6, 3, 33, 16), (2, 3, 1, 64, 4)]


@pytest.mark.parametrize("B, Hq, Hkv, L, D", SHAPES)
def test_quadratic_form_equals_oracle(lab, arrays, B, Hq, Hkv, L, D):
    q, k, v = make_qkv(L + D, B, Hq, Hkv, L, L, D)
    got = lab("linear").linear_attention_quadratic(*(arrays.asarray(x) for x in (q, k, v)))
    assert_close(arrays.numpy(got), oracles.linear_attention(q, k, v)[0], rtol=1e-4, atol=1e-5,
                 mistakes=mistakes(q, k, v), name=f"linear_attention_quadratic {B, Hq, Hkv, L, D} {CHAPTER}")


@pytest.mark.parametrize("B, Hq, Hkv, L, D", SHAPES)
def test_recurrent_form_equals_oracle_from_a_state(lab, arrays, B, Hq, Hkv, L, D):
    """The state holds tokens that came before: start from the oracle's state after 5 of them."""
    q0, k0, v0 = make_qkv(L, B, Hq, Hkv, 5, 5, D)
    state = oracles.linear_attention(q0, k0, v0)[1]
    q, k, v = make_qkv(L + 1, B, Hq, Hkv, L, L, D)
    out, (S, z) = lab("linear").linear_attention_recurrent(*(arrays.asarray(x) for x in (q, k, v)),
                                                           as_state(arrays, state))
    want, (S_want, z_want) = oracles.linear_attention(q, k, v, state)
    assert_close(arrays.numpy(out), want, rtol=1e-4, atol=1e-5, mistakes=mistakes(q, k, v, state),
                 name=f"linear_attention_recurrent {B, Hq, Hkv, L, D} {CHAPTER}")
    assert_close(arrays.numpy(S), S_want, rtol=1e-4, atol=1e-4, name="recurrent: the state S after the call")
    assert_close(arrays.numpy(z), z_want, rtol=1e-4, atol=1e-4, axes=("B", "H", "D"),
                 name="recurrent: the normaliser z after the call")


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), rep=st.sampled_from([1, 2, 3]), L=st.integers(1, 90),
       D=st.sampled_from([4, 8]), chunk=st.sampled_from([1, 2, 5, 16, 64, 200]), prior=st.integers(0, 6),
       seed=st.integers(0, 999))
def test_chunked_form_equals_oracle(lab, arrays, B, Hkv, rep, L, D, chunk, prior, seed):
    """Any length against any chunk size (one chunk, L not a multiple, chunk > L), from a state."""
    q0, k0, v0 = make_qkv(seed + 1, B, Hkv * rep, Hkv, prior, prior, D) if prior else (None,) * 3
    state = oracles.linear_attention(q0, k0, v0)[1] if prior else empty(B, Hkv, D)
    q, k, v = make_qkv(seed, B, Hkv * rep, Hkv, L, L, D)
    out, (S, z) = lab("linear").linear_attention_chunked(*(arrays.asarray(x) for x in (q, k, v)),
                                                         as_state(arrays, state), chunk)
    want, (S_want, z_want) = oracles.linear_attention(q, k, v, state)
    assert_close(arrays.numpy(out), want, rtol=1e-4, atol=1e-5, mistakes=mistakes(q, k, v, state),
                 name=f"linear_attention_chunked L={L} chunk={chunk} {CHAPTER}")
    assert_close(arrays.numpy(S), S_want, rtol=1e-4, atol=1e-4, name="chunked: the state S after the call")
    assert_close(arrays.numpy(z), z_want, rtol=1e-4, atol=1e-4, axes=("B", "H", "D"),
                 name="chunked: the normaliser z after the call")


def chunked_mistake(q, k, v, chunk, *, state_first=False, diagonal=True, eps=1e-6):
    """Float64 chunked linear attention with a classic mistake: the state takes each chunk
    before its rows read it (``state_first``), or the intra-chunk mask drops the diagonal."""
    rep = q.shape[1] // k.shape[1]
    fq, fk, v = oracles.elu_plus_one(q), np.repeat(oracles.elu_plus_one(k), rep, 1), np.repeat(v, rep, 1)
    B, H, L, D = q.shape
    S, z, out = np.zeros((B, H, D, D)), np.zeros((B, H, D)), np.zeros(q.shape)
    for c0 in range(0, L, chunk):
        c = slice(c0, min(L, c0 + chunk))
        kv, kz = np.einsum("bhjd,bhje->bhde", fk[:, :, c], v[:, :, c]), fk[:, :, c].sum(2)
        if state_first:
            S, z = S + kv, z + kz
        n = c.stop - c.start
        a = np.einsum("bhid,bhjd->bhij", fq[:, :, c], fk[:, :, c]) * np.tril(np.ones((n, n)), 0 if diagonal else -1)
        num = np.einsum("bhid,bhde->bhie", fq[:, :, c], S) + a @ v[:, :, c]
        den = np.einsum("bhid,bhd->bhi", fq[:, :, c], z)[..., None] + a.sum(-1, keepdims=True)
        out[:, :, c] = num / (den + eps)
        if not state_first:
            S, z = S + kv, z + kz
    return out


def test_chunk_rows_read_the_state_before_their_chunk(lab, arrays):
    """Two chunks of 4 (and 3 of 3 over 8 tokens): row 5 sees keys 0..5 -- the state from
    before its chunk plus its chunk's keys up to itself, diagonal included."""
    q, k, v = make_qkv(3, 1, 4, 2, 8, 8, 4)
    for chunk in (4, 3):
        out, _ = lab("linear").linear_attention_chunked(*(arrays.asarray(x) for x in (q, k, v)),
                                                        as_state(arrays, empty(1, 2, 4)), chunk)
        mistakes = {"the state took the chunk before its rows read it (an inclusive prefix sum)":
                    chunked_mistake(q, k, v, chunk, state_first=True),
                    "the diagonal is left out of the intra-chunk mask": chunked_mistake(q, k, v, chunk, diagonal=False)}
        assert_close(arrays.numpy(out), oracles.linear_attention(q, k, v)[0], rtol=1e-4, atol=1e-5,
                     mistakes=mistakes, name=f"chunks of {chunk} over 8 tokens {CHAPTER}")


@settings(max_examples=25, deadline=None)
@given(L=st.integers(2, 70), chunk=st.integers(1, 40), seed=st.integers(0, 999))
def test_three_forms_agree(lab, arrays, L, chunk, seed):
    q, k, v = (arrays.asarray(x) for x in make_qkv(seed, 1, 4, 2, L, L, 8))
    m = lab("linear")
    quadratic = arrays.numpy(m.linear_attention_quadratic(q, k, v))
    state = as_state(arrays, empty(1, 2, 8))
    recurrent, (S1, z1) = m.linear_attention_recurrent(q, k, v, state)
    chunked, (S2, z2) = m.linear_attention_chunked(q, k, v, state, chunk)
    assert_close(arrays.numpy(recurrent), quadratic, rtol=1e-4, atol=1e-5, name="recurrent vs quadratic")
    assert_close(arrays.numpy(chunked), quadratic, rtol=1e-4, atol=1e-5, name=f"chunked({chunk}) vs quadratic")
    assert_close(arrays.numpy(S2), arrays.numpy(S1), rtol=1e-4, atol=1e-4, name="chunked vs recurrent state")


@pytest.mark.parametrize("L, steps, chunk", [(40, 4, 16), (9, 3, 64), (100, 2, 7)])
def test_prefill_then_decode_equals_one_long_call(lab, arrays, L, steps, chunk):
    """State carried across calls loses nothing: prefill ``L`` tokens, then ``steps`` decode
    calls of one token each, equal the last rows of one call over all of them."""
    m = lab("linear")
    q, k, v = make_qkv(L, 2, 4, 2, L + steps, L + steps, 8)
    xs = [arrays.asarray(x) for x in (q, k, v)]
    full, _ = m.linear_attention(*xs, chunk_size=chunk)
    out, state = m.linear_attention(*(x[:, :, :L] for x in xs), chunk_size=chunk)
    for t in range(L, L + steps):
        row, state = m.linear_attention(*(x[:, :, t:t + 1] for x in xs), state=state, chunk_size=chunk)
        assert_close(arrays.numpy(row), arrays.numpy(full)[:, :, t:t + 1], rtol=1e-4, atol=1e-5,
                     name=f"decode step at position {t} vs one long call")
    assert_close(arrays.numpy(full), oracles.linear_attention(q, k, v)[0], rtol=1e-4, atol=1e-5,
                 mistakes=mistakes(q, k, v), name="linear_attention over all tokens")


def test_queries_the_last_positions_of_the_keys(lab, arrays):
    """``Lq < Lk``: the keys before the queries only go into the state."""
    q, k, v = make_qkv(8, 1, 4, 2, 5, 23, 8)
    out, (S, _) = lab("linear").linear_attention(*(arrays.asarray(x) for x in (q, k, v)), chunk_size=4)
    want, (S_want, _) = oracles.linear_attention(q, k, v)
    assert_close(arrays.numpy(out), want, rtol=1e-4, atol=1e-5, mistakes=mistakes(q, k, v), name="Lq=5 < Lk=23")
    assert_close(arrays.numpy(S), S_want, rtol=1e-4, atol=1e-4, name="the state after Lq < Lk")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_accumulates_in_float32(lab, arrays, dtype):
    """Large features (elu(x) + 1 = x + 1 for x > 0) over 300 tokens overflow a float16 state."""
    q, k, v = make_qkv(9, 1, 2, 2, 300, 300, 16, std=8.0)
    xs = [arrays.asarray(x, dtype) for x in (q, k, v)]
    m = lab("linear")
    out, (S, z) = m.linear_attention(*xs, chunk_size=32)
    assert arrays.dtype_name(out) == dtype, f"the output keeps the input dtype {dtype}"
    assert arrays.dtype_name(S) == "float32" and arrays.dtype_name(z) == "float32", "the state is float32"
    exact = [arrays.numpy(x) for x in xs]
    assert_close(arrays.numpy(out), oracles.linear_attention(*exact)[0], rtol=2e-2, atol=2e-2,
                 name=f"linear_attention in {dtype}")
    rec, _ = m.linear_attention_recurrent(*(x[:, :, :40] for x in xs), (S * 0, z * 0))
    assert_close(arrays.numpy(rec), oracles.linear_attention(*(x[:, :, :40] for x in exact))[0], rtol=2e-2,
                 atol=2e-2, name=f"linear_attention_recurrent in {dtype}")


def test_peak_memory_does_not_grow_with_length(lab, arrays, record):
    """The chunked path keeps a state, not a cache: beyond the inputs and the output, its peak
    memory is the same at 4x the length (quadratic attention: 16x)."""
    m = lab("linear")
    extra = {}
    for L in (4096, 16384):
        q, k, v = (arrays.asarray(x) for x in make_qkv(L, 1, 2, 2, L, L, 16))
        extra[L] = arrays.peak_bytes(lambda: m.linear_attention(q, k, v)[0]) - L * 2 * 16 * 4  # the output
    record("peak memory beyond q, k, v, out: L=16384 vs 4096", f"{extra[16384] / 2**20:.1f} vs "
                                                                f"{extra[4096] / 2**20:.1f} MiB")
    assert extra[16384] < 1.5 * extra[4096] + (1 << 20), \
        f"memory beyond inputs and output grew from {extra[4096] / 2**20:.1f} to {extra[16384] / 2**20:.1f} MiB"


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_trains_with_the_oracles_gradient(lab, arrays, chunk_size):
    """Training through the chunked form, and through a state carried from one call to the next:
    the second call's loss reaches the first call's keys and values only through the state."""
    linear = lab("linear")
    q, k, v, w = gradient_inputs(37, 37, seed=11)
    assert_gradients_close(arrays.grads(linear.LinearAttention(chunk_size), q, k, v, w),
                           reference_grads(linear_quadratic, q, k, v, w), name=f"LinearAttention({chunk_size})")

    def second_call(q, k, v):
        _, state = linear.linear_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], chunk_size=chunk_size)
        return linear.linear_attention(q[:, :, 16:], k[:, :, 16:], v[:, :, 16:], state=state,
                                       chunk_size=chunk_size)[0]
    assert_gradients_close(arrays.grads(second_call, q, k, v, w[:, :, 16:]),
                           reference_grads(lambda q, k, v: linear_quadratic(q, k, v)[:, :, 16:], q, k, v,
                                           w[:, :, 16:]),
                           name=f"linear_attention continued from a state, chunk_size={chunk_size}")
