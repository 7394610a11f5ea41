# Learner stub for Task 7, generated from solutions/week3/benchmark.py by `longctx stubs`.
# Replace each `raise NotImplementedError(...)` with your code; grade it with
#     pytest labs/week3 --task 7
"""Task 7: the long-context benchmark (book chapter "Task 7: Benchmarking long context").

``benchmark_long_context(techniques, lengths, backend=, repeats=)`` runs each
technique at each length in one process and returns one ``BenchmarkResult``
per (technique, length): median milliseconds, tokens per second, peak memory
and a quality figure.

* **Attention** (the default): random float32 ``q, k, v (1, heads, L,
  head_dim)``, standard normal from ``np.random.default_rng((seed, L))`` in
  that order (every technique sees the same inputs at a length). Quality is
  the relative error against exact causal attention on ``check_rows`` query
  rows, computed in float64 numpy for those rows only (``O(rows * L)``), so it
  is computable at 200k tokens too.
* **Model** (``model=(model, tokenizer)``, an mlx-lm model): each technique is
  a ``LongContextQwen3`` strategy and each timed run a passkey prompt of
  ``L`` tokens (depths spread over the repeats). Quality is the passkey
  accuracy, the task score.

Before running, every technique's peak memory is estimated from written
arithmetic (``estimate_memory``); one that would not fit in
``memory_limit`` is reported as skipped, with the estimate, and not run.

==============  ====================================================  ================================
technique       what runs (defaults in ``TECHNIQUES``)                memory beyond q, k, v, output
==============  ====================================================  ================================
full            ``mx.fast.scaled_dot_product_attention``, causal      ``2 H L^2`` (scores)
sliding         Task 1, ``window_size``                               ``L W + 12 H L D`` + 2 tiles
hierarchical    Task 2, LongNet ``levels`` (dilations ``w / w0``)     ``2 H L w0`` per level
ring            Task 3 in one process, ``ring_size`` shards           ``4 H L / P * block``
streaming       Task 5's ``SinkKVCache`` chunk by chunk (no RoPE)     ``3 H c (s + W + c)`` + cache
compressed      Task 4: compress to ``1 - compression_ratio``, then   ``3 H w L`` (scores of the
                attend the last ``observation_window`` queries        observation window)
==============  ====================================================  ================================
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from longctx.checks import check_choice, check_positive_int

from .compression import ContextCompressor
from .hierarchical import HierarchicalAttention
from .ring import RingAttention
from .sliding import SlidingWindowAttention
from .streaming import SinkKVCache

TECHNIQUES = {
    "full": {},
    "sliding": {"window_size": 1024},
    "hierarchical": {"levels": [1024, 4096, 16384]},
    "ring": {"ring_size": 4, "block_size": 1024},
    "streaming": {"sink_tokens": 4, "window": 1024, "chunk_size": 1024},
    "compressed": {"compression_ratio": 0.9, "method": "snapkv", "observation_window": 32},
}
SUBQUADRATIC = ("sliding", "hierarchical", "streaming", "compressed")  # the spec's 50k-200k cases
ERROR = "relative error vs exact attention"
PASSKEY = "passkey accuracy"
BYTES = 4  # float32
TILE = 1 << 21  # scores per tile in Task 1's blocked kernel


@dataclass
class BenchmarkResult:
    """One technique at one length. ``skipped`` (a reason) is empty when it ran; a skipped row
    has no time, speed, memory or quality, but always the memory estimate."""
    technique: str
    length: int
    median_ms: float | None
    tokens_per_second: float | None
    peak_memory_bytes: int | None
    quality: float | None
    quality_metric: str
    memory_estimate_bytes: int
    skipped: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def default_memory_limit() -> int:
    """Half the machine's physical memory: what a benchmark may take without swapping."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def estimate_memory(technique: str, length: int, *, heads: int = 8, head_dim: int = 64, **options) -> int:
    """Peak bytes the attention ``technique`` needs at ``length`` (B = 1, float32), inputs included.

    Written arithmetic, an upper bound on the reference's measured peak within
    a small factor (the project tests check both): q, k, v and the output,
    plus what the technique materialises at once.
    """
    o = {**TECHNIQUES[check_choice("technique", technique, tuple(TECHNIQUES))], **options}
    L, H, D = check_positive_int("length", length), heads, head_dim
    raise NotImplementedError("Task 7: estimate_memory -- see the book chapter 'Task 7: Benchmarking long context'")


def exact_rows(q: np.ndarray, k: np.ndarray, v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact causal attention, float64, for query ``rows`` only: ``(1, H, len(rows), D)``."""
    raise NotImplementedError("Task 7: exact_rows -- see the book chapter 'Task 7: Benchmarking long context'")


def relative_error(out, exact: np.ndarray) -> float:
    """``||out - exact|| / ||exact||`` (Frobenius), in float64."""
    raise NotImplementedError("Task 7: relative_error -- see the book chapter 'Task 7: Benchmarking long context'")


def attention_run(technique: str, q: mx.array, k: mx.array, v: mx.array, **options):
    """``(fn, rows)``: ``fn()`` runs the technique and returns its output rows (an ``mx.array``
    ``(1, H, len(rows), D)``); ``rows`` are the query positions those outputs belong to."""
    o = {**TECHNIQUES[technique], **options}
    L, scale = q.shape[2], q.shape[-1] ** -0.5
    raise NotImplementedError("Task 7: attention_run -- see the book chapter 'Task 7: Benchmarking long context'")


def benchmark_long_context(techniques=None, lengths=(50_000, 100_000, 200_000), *, backend: str = "mlx",
                           repeats: int = 3, model=None, heads: int = 8, head_dim: int = 64,
                           check_rows: int = 16, memory_limit: int | None = None, seed: int = 0,
                           progress=None) -> list[BenchmarkResult]:
    """One ``BenchmarkResult`` per technique and length, techniques in order, then lengths.

    ``techniques``: names (defaults from ``TECHNIQUES``) or ``{name: options}``;
    ``None`` means the sub-quadratic ones. ``backend``: ``"mlx"`` here (the
    torch mirror takes ``"torch"``). ``model``: ``(model, tokenizer)`` for the
    task score instead of random attention inputs. ``progress``: called after
    each row.
    """
    raise NotImplementedError("Task 7: benchmark_long_context -- see the book chapter 'Task 7: Benchmarking long context'")


def _attention_result(name, L, options, heads, head_dim, check_rows, repeats, estimate, seed) -> BenchmarkResult:
    rng = np.random.default_rng((seed, L))  # the same inputs for every technique at this length
    q, k, v = (rng.standard_normal((1, heads, L, head_dim)).astype(np.float32) for _ in range(3))
    fn, rows = attention_run(name, mx.array(q), mx.array(k), mx.array(v), **options)
    raise NotImplementedError("Task 7: _attention_result -- see the book chapter 'Task 7: Benchmarking long context'")


def estimate_model_memory(model, technique: str, length: int, **options) -> int:
    """Peak bytes of a ``LongContextQwen3`` prefill of ``length`` tokens: the weights, the
    cache the strategy holds (float32), one chunk's scores and the prompt's logits."""
    from longctx.checks import STRATEGY_OPTIONS
    o = {**STRATEGY_OPTIONS[technique], **options}
    a = model.args
    chunk = min(o.get("chunk_size", 2048), length)
    held = {"sliding": o.get("window_size", 0) + chunk,
            "streaming": o.get("sink_tokens", 0) + o.get("window", 0) + chunk}.get(technique, length)
    held = min(held, length)
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    cache = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * held * BYTES
    scores = 3 * a.num_attention_heads * chunk * held * BYTES
    return weights + cache + scores + length * a.vocab_size * BYTES


def _model_result(name, L, options, model, repeats, estimate, seed) -> BenchmarkResult:
    from longctx.data import tasks
    from longctx.eval import greedy_answer

    from .qwen3_long import LongContextQwen3
    base, tokenizer = model
    rng = np.random.default_rng((seed, L))
    long = LongContextQwen3(base, name, **options)
    times, scores = [], []
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    for i in range(repeats):
        prompt = tasks.passkey(tokenizer, L, (i + 0.5) / repeats, int(rng.integers(10_000, 100_000)))
        start = time.perf_counter()
        text = greedy_answer(long, tokenizer, prompt)
        times.append(time.perf_counter() - start)
        scores.append(prompt.score(text))
    ms = 1e3 * statistics.median(times)
    return BenchmarkResult(name, L, ms, L / (ms / 1e3), max(0, mx.get_peak_memory() - before),
                           float(np.mean(scores)), PASSKEY, estimate)


def _check_techniques(techniques, model) -> dict:
    if techniques is None:
        techniques = SUBQUADRATIC
    if isinstance(techniques, str) or not isinstance(techniques, (list, tuple, dict)) or not techniques:
        raise ValueError(f"techniques must be a non-empty list of names or a dict of name -> options, "
                         f"got {techniques!r}")
    items = techniques.items() if isinstance(techniques, dict) else ((t, {}) for t in techniques)
    chosen = {}
    for name, options in items:
        check_choice("technique", name, tuple(TECHNIQUES))
        if model is not None and name == "ring":
            raise ValueError("technique 'ring' has no LongContextQwen3 strategy: it is benchmarked on "
                             "attention inputs (model=None)")
        chosen[name] = dict(options) if model is not None else {**TECHNIQUES[name], **options}
    return chosen


__all__ = ["SUBQUADRATIC", "TECHNIQUES", "BenchmarkResult", "attention_run", "benchmark_long_context",
           "default_memory_limit", "estimate_memory", "estimate_model_memory", "exact_rows", "relative_error"]
