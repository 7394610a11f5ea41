"""Task 9's search in the torch mirror: LongRoPE's evolutionary search works on candidates and an
objective, not on arrays, so it has one source, the reference (``solutions/week3/rope_search.py``),
which imports NumPy only: loading it here leaves ``mlx`` out of the process."""
from longctx.mlx.rope_search import (GRID, START_TOKENS, Candidate, SearchResult, crossover, evolve, mutate,
                                     search_factors, snap)

__all__ = ["GRID", "START_TOKENS", "Candidate", "SearchResult", "crossover", "evolve", "mutate", "search_factors",
           "snap"]
