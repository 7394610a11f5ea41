"""Graded tests, Task 9: position extension (PI, NTK, YaRN, Llama 3, LongRoPE and its search).

Run: ``pytest labs/week3 --task 9`` (your stubs), ``--impl solutions`` or
``--impl torch``. Expected values come from the float64 formulas of
``longctx.testing.oracles`` (``rope_frequencies``, ``rope``), written pair by
pair from the papers; the search is judged by its properties on objectives
whose optimum is known, then once on the tiny Qwen3.
"""
import itertools
import math

import numpy as np
import pytest

from longctx.checks import check_rope_scaling
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


@pytest.mark.parametrize("bad, key", [
    ({"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 512, "short_factor": [1.0] * 16,
      "long_factor": [1.0] * 15}, "long_factor"),
    ({"rope_type": "linear", "factor": 0.5}, "factor"),
    ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ({"rope_type": "ntk-by-parts", "factor": 4.0}, "rope_type"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 512, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0}, "high_freq_factor"),
])
def test_bad_configs_raise(lab, arrays, bad, key):
    m = lab("rope_scaling")
    frequencies(lab, arrays, scalings(16, 4.0)["yarn"], 32, 10_000.0, None)  # a good call first
    with pytest.raises(ValueError, match=key):
        m.rope_frequencies(bad, 32, 10_000.0)
    with pytest.raises(ValueError, match=key):
        m.ScaledRoPE(32, 10_000.0, bad)


# ---------------------------------------------------------------- the search

def search(lab):
    return lab("rope_search")


def distance_to(target, start_weight=0.0):
    """An objective with a known optimum: L1 distance to a monotone ``target`` (plus n_hat's cost)."""
    target = np.asarray(target, np.float64)
    seen = []

    def objective(c):
        assert c not in seen, f"candidate {c} evaluated twice: the search must remember what it scored"
        seen.append(c)
        return float(np.abs(np.asarray(c.factors) - target).sum() + start_weight * abs(c.start_tokens - 8))
    return objective, seen


def on_grid(factors, low, high):
    f = np.asarray(factors)
    return (np.allclose(f, np.round(f / 0.01) * 0.01, atol=1e-9) and bool(np.all(np.diff(f) >= 0))
            and f.min() >= low - 1e-9 and f.max() <= high + 1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutants_stay_in_the_space(lab, seed):
    """A mutant is on the grid, non-decreasing and in bounds; with probability 1 the parent changes."""
    s = search(lab)
    rng = np.random.default_rng(seed)
    parent = s.Candidate(s.snap(np.linspace(1, 5, 12), 1.0, 5.0), 0)
    changed, starts = 0, set()
    for _ in range(200):
        child = s.mutate(parent, rng, low=1.0, high=5.0, probability=0.3, start_tokens=(0, 4, 8))
        assert on_grid(child.factors, 1.0, 5.0), f"mutant {child.factors} leaves the search space"
        assert child.start_tokens in (0, 4, 8)
        changed += child != parent
        starts.add(child.start_tokens)
    assert changed > 150, f"only {changed} of 200 mutants differ from the parent at probability 0.3 of 12 pairs"
    assert starts == {0, 4, 8}, f"n_hat took only {sorted(starts)} in 200 mutants: it is part of the individual"
    fixed = s.mutate(parent, rng, low=1.0, high=5.0, probability=1.0, start_tokens=(0,))
    moved = np.asarray(fixed.factors) != np.asarray(parent.factors)
    assert moved.any(), "probability 1 must redraw every factor"
    ends = [s.mutate(s.Candidate((1.0, 1.0, 1.0), 0), rng, low=1.0, high=1.5, probability=1.0,
                     start_tokens=(0,)).factors for _ in range(300)]
    assert max(f[-1] for f in ends) == 1.5 and min(f[0] for f in ends) == 1.0, \
        "the first factor may go down to low and the last up to high (inclusive)"


def test_crossover_takes_each_factor_from_a_parent(lab):
    s = search(lab)
    rng = np.random.default_rng(0)
    a = s.Candidate((1.0, 1.2, 1.4, 1.6, 1.8, 2.0), 0)
    b = s.Candidate((1.1, 1.3, 1.5, 1.7, 1.9, 2.1), 8)
    children = [s.crossover(a, b, rng) for _ in range(200)]
    assert all(c is not None for c in children), "children of interleaved monotone parents are monotone"
    for c in children:
        assert all(x in (p, q) for x, p, q in zip(c.factors, a.factors, b.factors))
        assert c.start_tokens in (0, 8)
    from_b = np.mean([[x == q for x, q in zip(c.factors, b.factors)] for c in children])
    assert 0.35 < from_b < 0.65, f"{from_b:.0%} of the factors come from the second parent, not about half"
    assert {c.start_tokens for c in children} == {0, 8}
    crossing = s.Candidate((1.0, 1.5), 0), s.Candidate((2.0, 2.5), 0)
    outcomes = {s.crossover(*crossing, rng) for _ in range(100)}
    assert None in outcomes, "the child (2.0, 1.5) of (1.0, 1.5) and (2.0, 2.5) is not monotone: None"
    assert all(c is None or on_grid(c.factors, 1.0, 3.0) for c in outcomes)


SPACE = dict(low=1.0, high=4.0, population=12, parents=6, mutations=4, crossovers=3, generations=15)


@pytest.mark.parametrize("seed", [0, 3])
def test_search_properties(lab, seed):
    """Monotone, on the grid, in bounds; each candidate scored once; the best never worse than a seed;
    the population and offspring sizes as asked; the same seed, the same search."""
    s = search(lab)
    target = np.linspace(1.3, 3.7, 10)
    objective, seen = distance_to(target, 0.01)
    seeds = [np.full(10, 4.0), np.ones(10), np.geomspace(1, 4, 10)]
    result = s.evolve(objective, seeds, seed=seed, start_tokens=(0, 2, 8), **SPACE)
    assert len(seen) == len(result.scores) == 12 + 15 * (4 + 3), \
        f"{len(seen)} candidates scored: want population 12 + 15 generations x (4 mutants + 3 children)"
    assert all(on_grid(c.factors, 1.0, 4.0) for c in seen), "a candidate outside the search space was scored"
    assert result.best in seen and result.score == min(objective_value for objective_value in result.scores.values())
    seed_scores = [result.scores[c] for c in seen[:3]]
    assert result.score <= min(seed_scores), "the best is worse than a seed: elitism lost it"
    assert result.score < 0.5 * min(seed_scores), \
        f"15 generations went from {min(seed_scores):.2f} to {result.score:.2f} only: is selection keeping the best?"
    bests = [h[0] for h in result.history]
    assert len(bests) == 15 and all(b2 <= b1 for b1, b2 in zip(bests, bests[1:])), \
        f"best score by generation {bests} must never go up (the parents are kept)"
    again, seen2 = distance_to(target, 0.01)
    assert s.evolve(again, seeds, seed=seed, start_tokens=(0, 2, 8), **SPACE).best == result.best and seen2 == seen, \
        "the same seed must give the same search"


def test_search_finds_the_optimum_of_a_separable_objective(lab):
    s = search(lab)
    target = np.round(np.geomspace(1.0, 2.0, 6), 2)
    objective, seen = distance_to(target)
    result = s.evolve(objective, [np.full(6, 2.0)], low=1.0, high=2.0, population=16, parents=8, mutations=8,
                      crossovers=8, generations=60, start_tokens=(0,), seed=0)
    assert result.score < 0.15, f"after {len(seen)} candidates the best is {result.score:.2f} from the optimum"


def test_search_on_a_model(lab, arrays, tiny_models):
    """``search_longrope`` on the tiny Qwen3 trained (here: configured) to 16 tokens, for 32: a LongRoPE
    dict whose factors are in the space and score no worse than PI, NTK and YaRN."""
    m = lab("rope_scaling")
    model, _, _ = tiny_models(max_position_embeddings=16)
    rows = np.random.default_rng(0).integers(0, 256, (2, 33))
    record = {}
    found = m.search_longrope(model, 32, sequences=rows, population=6, parents=3, mutations=2, crossovers=1,
                              generations=2, start_tokens=(0, 2), progress=False, record=record)
    assert found["rope_type"] == "longrope" and found["original_max_position_embeddings"] == 16
    assert found["factor"] == 2.0 and found["short_factor"] == [1.0] * 8
    assert on_grid(found["long_factor"], 1.0, 2.5), f"long_factor {found['long_factor']} outside [1, 1.25 s]"
    assert set(record["seeds"]) == {"pi", "ntk", "yarn"} and record["evaluated"] == 6 + 2 * 3
    best = m.perplexity(model, rows, found)
    assert best == pytest.approx(record["best"], rel=1e-5)
    assert best <= min(record["seeds"].values()) + 1e-9
    short = m.search_longrope(model, 16, sequences=rows[:, :17], rope_scaling=found, population=4, parents=2,
                              mutations=1, crossovers=1, generations=2, progress=False)
    assert short["long_factor"] == found["long_factor"], "the short search keeps the long factors"
    assert on_grid(short["short_factor"], 1.0, 2.5)
