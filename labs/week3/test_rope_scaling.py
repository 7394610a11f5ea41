"""Graded tests, Task 9: position extension (PI, NTK, YaRN, Llama 3, LongRoPE's factors).

Run: ``pytest labs/week3 --task 9`` (your stubs), ``--impl solutions`` or
``--impl torch``. Expected values come from the float64 formulas of
``longctx.testing.oracles`` (``rope_frequencies``, ``rope``), written pair by
pair from the papers. The search has its own file, ``test_rope_search.py``.
"""
import itertools
import math

import numpy as np
import pytest

from longctx.techniques.rope import check_rope_scaling
from longctx.testing import assert_close, oracles

pytestmark = pytest.mark.task(9)

T0 = 512
CHAPTER = "(book: Task 9, \"The five methods\")"


def scalings(pairs: int, factor: float, T0: int = T0, seed: int = 0) -> dict:
    """One config of each rope_type for an extension by ``factor`` of a model trained to ``T0``."""
    rng = np.random.default_rng(seed)
    return {
        "linear": {"rope_type": "linear", "factor": factor},
        "dynamic": {"rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": T0},
        "yarn": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T0},
        "yarn-betas": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T0,
                       "beta_fast": 16, "beta_slow": 2, "truncate": False},
        "yarn-mscale": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T0,
                        "mscale": 0.8, "mscale_all_dim": 0.5},
        "yarn-mscale-alone": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T0,
                              "mscale": 0.707},  # transformers needs both to use them: here, mscale is unused
        "yarn-attention-factor": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T0,
                                  "attention_factor": 0.9},
        "llama3": {"rope_type": "llama3", "factor": factor, "original_max_position_embeddings": T0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        "llama3-narrow": {"rope_type": "llama3", "factor": factor, "original_max_position_embeddings": T0,
                          "low_freq_factor": 2.0, "high_freq_factor": 3.0},
        "longrope": {"rope_type": "longrope", "factor": factor, "original_max_position_embeddings": T0,
                     "short_factor": np.round(1 + 0.2 * np.sort(rng.random(pairs)), 2).tolist(),
                     "long_factor": np.round(1 + (factor - 1) * np.sort(rng.random(pairs)), 2).tolist()},
    }


def frequencies(lab, arrays, scaling, head_dim, base, seq_len):
    inv_freq, factor = lab("rope_scaling").rope_frequencies(scaling, head_dim, base, seq_len)
    return arrays.numpy(inv_freq).astype(np.float64), float(factor)


GRID = [(d, base, factor, T) for d, base, factor, T in itertools.product(
    (8, 32, 128), (10_000.0, 500_000.0), (1.0, 2.0, 4.0, 8.5), (512, 8192))]


@pytest.mark.parametrize("kind", list(scalings(4, 2.0)))
@pytest.mark.parametrize("seq_len", ["none", "below", "at", "above"])
def test_inverse_frequencies_and_attention_factor(lab, arrays, kind, seq_len):
    """Every (head_dim, base, factor, T0) of a grid, below, at and above the original length."""
    for d, base, factor, T in GRID:
        scaling = scalings(d // 2, factor, T)[kind]
        L = {"none": None, "below": T // 3, "at": T, "above": int(T * factor) + 7}[seq_len]
        inv_freq, attention_factor = frequencies(lab, arrays, scaling, d, base, L)
        want, want_factor = oracles.rope_frequencies(check_rope_scaling(scaling, d), d, base, L)
        where = f"{kind}, head_dim {d}, base {base:g}, factor {factor}, T0 {T}, seq_len {L}"
        assert inv_freq.shape == want.shape, f"{where}: inv_freq shape {inv_freq.shape}, want {want.shape} (D/2)"
        worst = int(np.argmax(np.abs(inv_freq / want - 1)))
        assert np.allclose(inv_freq, want, rtol=3e-6, atol=0), (
            f"{where}: inv_freq[{worst}] = {inv_freq[worst]:.6g}, want {want[worst]:.6g} (ratio "
            f"{inv_freq[worst] / want[worst]:.4g}: a factor multiplied instead of divided, a ramp reversed, "
            f"the wrong factor set for this length?) {CHAPTER}")
        assert math.isclose(attention_factor, want_factor, rel_tol=1e-6), (
            f"{where}: attention factor {attention_factor:.6g}, want {want_factor:.6g} (mscale ignored, "
            f"applied twice, or the wrong formula?) {CHAPTER}")


@pytest.mark.parametrize("T, factor", [(512, 4.0), (4096, 8.0), (100, 2.5)])
def test_longrope_switches_after_the_original_length(lab, arrays, T, factor):
    """Short factors up to and including T0 tokens, long ones from T0 + 1."""
    scaling = scalings(16, factor, T)["longrope"]
    theta = oracles.rope_frequencies({"rope_type": "default"}, 32, 10_000.0)[0]
    for L, which in ((T - 1, "short_factor"), (T, "short_factor"), (T + 1, "long_factor"), (None, "short_factor")):
        inv_freq, _ = frequencies(lab, arrays, scaling, 32, 10_000.0, L)
        assert np.allclose(inv_freq, theta / np.array(scaling[which]), rtol=3e-6), \
            f"at seq_len {L} (T0 {T}) LongRoPE must use its {which} {CHAPTER}"


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
@pytest.mark.parametrize("d, factor", [(32, 4.0), (64, 16.0), (128, 2.0)])
def test_methods_are_longrope_with_a_factor_vector(lab, arrays, kind, d, factor):
    """PI, YaRN and Llama 3 are LongRoPE with per-pair factors lambda_i = theta_i / theta'_i, which
    ``rescale_factors`` gives (for YaRN 1 / ((1 - r_i) + r_i / s), not the blend (1 - r_i) + r_i s)."""
    m = lab("rope_scaling")
    scaling = scalings(d // 2, factor)[kind]
    want_freq, want_factor = oracles.rope_frequencies(check_rope_scaling(scaling, d), d, 10_000.0, 4 * T0)
    theta = oracles.rope_frequencies({"rope_type": "default"}, d, 10_000.0)[0]
    lam = np.asarray(m.rescale_factors(scaling, d, 10_000.0, 4 * T0), np.float64)
    assert np.allclose(lam, theta / want_freq, rtol=3e-6), f"rescale_factors of {kind} is not theta / theta'"
    long = {"rope_type": "longrope", "factor": factor, "original_max_position_embeddings": T0,
            "short_factor": [1.0] * (d // 2), "long_factor": lam.tolist(), "attention_factor": want_factor}
    inv_freq, attention_factor = frequencies(lab, arrays, long, d, 10_000.0, 4 * T0)
    assert np.allclose(inv_freq, want_freq, rtol=1e-5), f"LongRoPE with {kind}'s factors does not rotate as {kind}"
    assert math.isclose(attention_factor, want_factor, rel_tol=1e-6)


def rotate(lab, arrays, scaling, x, offset, *, traditional=False, dtype="float32", seq_len=None, d=None,
           base=10_000.0):
    rope = lab("rope_scaling").ScaledRoPE(d or x.shape[-1], base, scaling, traditional=traditional)
    rope.seq_len = seq_len
    return arrays.numpy(rope(arrays.asarray(x, dtype), offset=offset)).astype(np.float64)


def want_rotation(scaling, x, offset, *, traditional=False, seq_len=None, base=10_000.0):
    d = x.shape[-1]
    s = check_rope_scaling(scaling, d)
    inv_freq, factor = oracles.rope_frequencies(s, d, base, seq_len or offset + x.shape[-2])
    original = oracles.rope_frequencies({"rope_type": "default"}, d, base)[0]
    return oracles.rope(x, inv_freq, factor, offset=offset, traditional=traditional,
                        start_tokens=s.get("start_tokens", 0), original=original)


@pytest.mark.parametrize("kind", ["none", "linear", "dynamic", "yarn", "yarn-mscale", "llama3", "longrope"])
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("L, offset", [(7, 0), (1, 600), (33, 490), (130, 1900)])
def test_rotated_queries_and_keys(lab, arrays, kind, traditional, L, offset):
    """``rope(x, offset)`` for ``x (B, H, L, D)``: pairs (i, i + D/2), or (2i, 2i + 1) when traditional."""
    x = np.random.default_rng(L + offset).standard_normal((2, 3, L, 32))
    scaling = None if kind == "none" else scalings(16, 4.0)[kind]
    got = rotate(lab, arrays, scaling, x, offset, traditional=traditional)
    assert_close(got, want_rotation(scaling, x, offset, traditional=traditional), rtol=1e-3, atol=1e-3,
                 name=f"{kind} RoPE (traditional={traditional}) at positions {offset}..{offset + L - 1}",
                 axes=("batch", "head", "position", "dim"))


@pytest.mark.parametrize("start_tokens, L, offset", [(4, 10, 0), (16, 8, 12), (8, 5, 8), (3, 1, 2), (256, 20, 0)])
def test_start_tokens_keep_the_original_rope(lab, arrays, start_tokens, L, offset):
    """LongRoPE's n_hat: positions below ``start_tokens`` rotate with the original RoPE (and the attention
    factor), the rest with the long factors, in one call and across calls."""
    scaling = {**scalings(16, 4.0)["longrope"], "start_tokens": start_tokens}
    x = np.random.default_rng(start_tokens).standard_normal((1, 2, L, 32))
    got = rotate(lab, arrays, scaling, x, offset, seq_len=4 * T0)
    assert_close(got, want_rotation(scaling, x, offset, seq_len=4 * T0), rtol=1e-3, atol=1e-3,
                 name=f"n_hat={start_tokens}, positions {offset}..{offset + L - 1}",
                 axes=("batch", "head", "position", "dim"))


def test_seq_len_chooses_the_frequencies(lab, arrays):
    """``rope.seq_len`` (set for a whole prompt) picks the factors; unset, the call's own ``offset + L``."""
    scaling = scalings(16, 4.0)["longrope"]
    x = np.random.default_rng(5).standard_normal((1, 2, 6, 32))
    short = want_rotation(scaling, x, 10)  # 16 positions: short factors
    long = want_rotation(scaling, x, 10, seq_len=4 * T0)
    assert_close(rotate(lab, arrays, scaling, x, 10), short, rtol=1e-3, atol=1e-3, name="seq_len unset")
    assert_close(rotate(lab, arrays, scaling, x, 10, seq_len=4 * T0), long, rtol=1e-3, atol=1e-3,
                 name="seq_len = 4 T0")
    dyn = scalings(16, 4.0)["dynamic"]
    assert_close(rotate(lab, arrays, dyn, x, 3000), want_rotation(dyn, x, 3000), rtol=1e-3, atol=1e-3,
                 name="dynamic NTK at 3006 positions")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(lab, arrays, dtype):
    """fp16/bf16 inputs with large values keep their dtype and the float32 result within its precision."""
    x = 30 * np.random.default_rng(9).standard_normal((1, 4, 64, 64))
    scaling = scalings(32, 8.0)["yarn"]
    rope = lab("rope_scaling").ScaledRoPE(64, 10_000.0, scaling)
    out = rope(arrays.asarray(x, dtype), offset=3000)
    assert arrays.dtype_name(out) == dtype, f"ScaledRoPE returned {arrays.dtype_name(out)} for {dtype} input"
    want = want_rotation(scaling, arrays.numpy(arrays.asarray(x, dtype)).astype(np.float64), 3000)
    tol = 0.02 if dtype == "bfloat16" else 3e-3
    assert_close(arrays.numpy(out).astype(np.float64), want, rtol=tol, atol=tol * 30, name=f"{dtype} rotation")
