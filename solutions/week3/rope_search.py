"""Task 9, part 2: LongRoPE's evolutionary search (book chapter "Task 9: Position extension").

LongRoPE (Ding et al. 2024, Section 3.2) finds one rescale factor per rotated
pair, ``lambda_i`` (pair ``i`` turns ``lambda_i`` times slower than the
original RoPE), and ``n_hat``, the number of first positions that keep the
original RoPE, by an evolutionary search whose fitness is the model's
perplexity at the target length. Nothing here knows about models or arrays:
``evolve`` takes the objective as a function, so this file is NumPy only and
both backends (``longctx.mlx`` and ``longctx.torch``) use it.

The search space (the paper's): factors on a 0.01 grid in ``[low, high]``
(``[1, 1.25 s]`` for an extension by ``s``), non-decreasing over the pairs
(slow pairs are stretched at least as much as fast ones), ``n_hat`` from
``START_TOKENS``. The algorithm:

1. The population starts from the seeds (PI, NTK and YaRN's factors), then
   mutants of random seeds, until it has ``population`` members.
2. Each generation keeps the ``parents`` best evaluated so far (elitist), and
   adds ``mutations`` mutants and ``crossovers`` children of random parents.
3. A candidate that was already evaluated is never evaluated again: a mutant or
   child equal to one seen is drawn again.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from longctx.checks import check_nonnegative_int, check_positive_int

GRID = 0.01
START_TOKENS = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)  # the paper's n_hat choices
TRIES = 1000  # draws before a mutant or child is declared impossible (the space is exhausted)


@dataclass(frozen=True)
class Candidate:
    """One individual: ``factors`` (a tuple on the grid, non-decreasing) and ``start_tokens`` (n_hat).
    Frozen, so equal candidates hash equally: the search keeps a set of those it evaluated."""
    factors: tuple[float, ...]
    start_tokens: int = 0


def snap(factors, low: float, high: float) -> tuple[float, ...]:
    """``factors`` moved into the search space: onto the 0.01 grid, into ``[low, high]``, and made
    non-decreasing (each at least its predecessor). Seeds (PI, NTK, YaRN) go through it."""
    steps = np.clip(np.round(np.asarray(factors, np.float64) / GRID), math.ceil(low / GRID - 1e-9),
                    math.floor(high / GRID + 1e-9))
    return tuple(round(float(x) * GRID, 2) for x in np.maximum.accumulate(steps))


def _grid(a: float, b: float) -> np.ndarray:
    """The grid values in ``[a, b]``."""
    return np.arange(round(a / GRID), round(b / GRID) + 1) * GRID


def mutate(parent: Candidate, rng: np.random.Generator, *, low: float, high: float, probability: float = 0.3,
           start_tokens=START_TOKENS) -> Candidate:
    """A mutant of ``parent``: each factor, with ``probability``, redrawn uniformly from the grid
    between its neighbours (``low`` before the first, ``high`` after the last), so the factors stay
    non-decreasing; ``start_tokens``, with ``probability``, redrawn from ``start_tokens``. May equal
    the parent (``evolve`` draws again). About 10 lines."""
    # BEGIN SOLUTION
    f = list(parent.factors)
    for i in range(len(f)):
        if rng.random() < probability:
            left = f[i - 1] if i else low
            right = f[i + 1] if i + 1 < len(f) else high
            f[i] = round(float(rng.choice(_grid(left, right))), 2)
    n = parent.start_tokens
    if len(start_tokens) > 1 and rng.random() < probability:
        n = int(rng.choice(start_tokens))
    return Candidate(tuple(f), n)
    # END SOLUTION


def crossover(a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate | None:
    """A child of ``a`` and ``b``: each factor, and ``start_tokens``, from either parent with even
    odds; ``None`` when the child is not non-decreasing (``evolve`` draws again). About 5 lines."""
    # BEGIN SOLUTION
    take_b = rng.random(len(a.factors)) < 0.5
    child = tuple(y if t else x for x, y, t in zip(a.factors, b.factors, take_b))
    n = b.start_tokens if rng.random() < 0.5 else a.start_tokens
    if any(x > y for x, y in zip(child, child[1:])):
        return None
    return Candidate(child, n)
    # END SOLUTION


@dataclass
class SearchResult:
    best: Candidate
    score: float
    scores: dict = field(repr=False)  # every candidate evaluated -> its score
    history: list = field(repr=False)  # per generation: (best score so far, candidates evaluated, seconds)


def evolve(objective: Callable[[Candidate], float], seeds, *, low: float, high: float, population: int = 64,
           parents: int = 32, mutations: int = 16, crossovers: int = 16, generations: int = 40,
           probability: float = 0.3, start_tokens=START_TOKENS, seed: int = 0,
           progress: Callable[[int, float], None] | None = None) -> SearchResult:
    """Minimise ``objective`` (a perplexity) over candidates: LongRoPE's search, deterministic for
    ``seed``. ``seeds``: factor vectors (or ``Candidate``) that start the population (snapped into
    the space). ``progress(generation, best score)`` is called after each generation."""
    if not seeds:
        raise ValueError("seeds must be a non-empty list of factor vectors")
    for name, value in (("population", population), ("parents", parents), ("generations", generations)):
        check_positive_int(name, value)
    for name, value in (("mutations", mutations), ("crossovers", crossovers)):
        check_nonnegative_int(name, value)
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got low={low!r}, high={high!r}")
    if not 0 < probability <= 1:
        raise ValueError(f"probability must be in (0, 1], got {probability!r}")
    start_tokens = tuple(check_nonnegative_int("start_tokens", n) for n in start_tokens)
    if not start_tokens:
        raise ValueError("start_tokens must hold at least one choice (0: no position keeps the original RoPE)")
    rng = np.random.default_rng(seed)
    seeds = list(dict.fromkeys(s if isinstance(s, Candidate) else Candidate(snap(s, low, high), start_tokens[0])
                               for s in seeds))
    scores: dict[Candidate, float] = {}  # every candidate evaluated, in order: never one twice
    history, t0 = [], time.perf_counter()

    def evaluate(c: Candidate) -> Candidate:
        scores[c] = float(objective(c))
        return c

    def new(draw: Callable[[], Candidate | None]) -> Candidate:
        """The first candidate ``draw()`` gives that was not evaluated before, evaluated."""
        for _ in range(TRIES):
            c = draw()
            if c is not None and c not in scores:
                return evaluate(c)
        raise RuntimeError(f"no new candidate in {TRIES} draws: the search space is exhausted "
                           "(widen low/high or ask for fewer candidates)")

    def mutant(parent: Candidate) -> Candidate | None:
        return mutate(parent, rng, low=low, high=high, probability=probability, start_tokens=start_tokens)

    def record(generation: int, best: Candidate) -> None:
        history.append((scores[best], len(scores), time.perf_counter() - t0))
        if progress is not None:
            progress(generation, scores[best])

    # Evaluate the seeds; fill the population with mutants of random seeds (``new``). Then, each of
    # ``generations`` times: the ``parents`` best members (elitist) plus ``mutations`` mutants of
    # random parents plus ``crossovers`` children of two different random parents (a new mutant of
    # the first when the child is None or was evaluated) become the population; ``record`` the best
    # after each; `best` is the best candidate evaluated. About 16 lines.
    # BEGIN SOLUTION
    members = [evaluate(s) for s in seeds]
    while len(members) < population:
        members.append(new(lambda: mutant(seeds[int(rng.integers(len(seeds)))])))
    for generation in range(generations):
        elite = sorted(members, key=scores.get)[:parents]
        children = [new(lambda: mutant(elite[int(rng.integers(len(elite)))])) for _ in range(mutations)]
        for _ in range(crossovers):
            i, j = rng.choice(len(elite), 2, replace=False) if len(elite) > 1 else (0, 0)
            child = crossover(elite[i], elite[j], rng)
            fresh = child is not None and child not in scores
            children.append(evaluate(child) if fresh else new(lambda: mutant(elite[i])))
        members = elite + children
        record(generation, min(members, key=scores.get))
    best = min(scores, key=scores.get)
    # END SOLUTION
    return SearchResult(best, scores[best], scores, history)


def search_factors(score: Callable[[dict], float], target_length: int, T0: int, head_dim: int, seeds: dict, *,
                   rope_scaling: dict | None = None, population: int = 64, parents: int = 32, mutations: int = 16,
                   crossovers: int = 16, generations: int = 40, probability: float = 0.3, start_tokens=START_TOKENS,
                   seed: int = 0, progress: bool = True, record: dict | None = None) -> dict:
    """``search_longrope`` without the model: ``score(rope_scaling) -> perplexity`` at
    ``target_length``. Beyond ``T0`` it searches ``long_factor`` from ``seeds`` (name -> factor
    vector: PI, NTK, YaRN at ``s = target_length / T0``) and keeps ``rope_scaling``'s short factors
    (ones without it); at or below ``T0`` it searches ``short_factor`` for ``rope_scaling`` from
    ones, its long and its short factors. Factors lie in ``[1, 1.25 max(s, 1)]``."""
    target_length, T0 = check_positive_int("target_length", target_length), check_positive_int("T0", T0)
    pairs = head_dim // 2
    if target_length > T0:
        s = target_length / T0
        scaling = {"rope_type": "longrope", "factor": s, "original_max_position_embeddings": T0,
                   "short_factor": list((rope_scaling or {}).get("short_factor") or [1.0] * pairs),
                   "long_factor": [1.0] * pairs}
        key = "long_factor"
    else:
        if not rope_scaling or rope_scaling.get("rope_type") != "longrope":
            raise ValueError("rope_scaling (the long search's result, rope_type 'longrope') is needed to search "
                             f"short factors at target_length={target_length} <= the training length {T0}")
        scaling, key = dict(rope_scaling), "short_factor"
        s = scaling.get("factor") or 1.0
        seeds = {"ones": np.ones(pairs), "long": np.array(scaling["long_factor"]),
                 "short": np.array(scaling["short_factor"])}
        start_tokens = (scaling.get("start_tokens", 0),)
    high = round(1.25 * max(s, 1.0), 2)

    def scaling_of(c: Candidate) -> dict:
        out = {**scaling, key: list(c.factors), "start_tokens": c.start_tokens}
        if not c.start_tokens:
            del out["start_tokens"]  # only the keys Hugging Face and mlx-lm know, when n_hat is 0
        return out

    from rich.progress import Progress
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"LongRoPE search at {target_length}", total=generations)

        def report(generation: int, best: float) -> None:
            bar.update(task, completed=generation + 1, description=f"LongRoPE search at {target_length}, "
                                                                   f"perplexity {best:.3f}")
        start_tokens = tuple(start_tokens)
        result = evolve(lambda c: score(scaling_of(c)), list(seeds.values()), low=1.0, high=high,
                        population=population, parents=parents, mutations=mutations, crossovers=crossovers,
                        generations=generations, probability=probability, start_tokens=start_tokens, seed=seed,
                        progress=report)
    if record is not None:
        record.update(seeds={name: result.scores[Candidate(snap(v, 1.0, high), start_tokens[0])]
                             for name, v in seeds.items()},
                      history=result.history, evaluated=len(result.scores), best=result.score)
    return scaling_of(result.best)


__all__ = ["GRID", "START_TOKENS", "Candidate", "SearchResult", "crossover", "evolve", "mutate", "search_factors",
           "snap"]
