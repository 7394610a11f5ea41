"""Graded tests, Task 9, part 2: LongRoPE's evolutionary search (``rope_search.py``).

Run: ``pytest labs/week3 --task 9`` (your stubs), ``--impl solutions`` or
``--impl torch``. The search is judged by its properties on objectives whose
optimum is known (an L1 distance to a monotone factor vector): every candidate
in the space, none scored twice, elitism, the sizes asked for, determinism;
then once on the tiny Qwen3 through ``search_longrope``.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.task(9)

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


def test_search_with_a_single_parent(lab):
    """``parents=1``: a crossover can only pair the parent with itself, a child already scored, so
    each is a new mutant instead. The search still scores population + generations x (mutants +
    children) candidates, never one twice, and never loses its best."""
    s = search(lab)
    objective, seen = distance_to(np.linspace(1.3, 3.7, 8), 0.01)
    result = s.evolve(objective, [np.full(8, 4.0)], low=1.0, high=4.0, population=5, parents=1, mutations=2,
                      crossovers=2, generations=6, start_tokens=(0,), seed=1)
    assert len(seen) == len(set(seen)) == 5 + 6 * (2 + 2), f"{len(seen)} candidates scored ({len(set(seen))} distinct)"
    bests = [h[0] for h in result.history]
    assert len(bests) == 6 and all(b2 <= b1 for b1, b2 in zip(bests, bests[1:])), bests
    assert result.score == min(result.scores.values())


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
