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

Every technique, its defaults, its memory formula and the class it runs are
declared once in ``longctx.techniques`` (``TECHNIQUES``); this file only runs
and measures them. What you write: the quality figure (``exact_rows``,
``relative_error``), the skip rule and the loop over techniques and lengths
(``benchmark_long_context``), and the measuring loop (``_attention_result``).
"""
from __future__ import annotations

import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from longctx import techniques as registry
from longctx.techniques import ERROR, PASSKEY, BenchmarkResult, default_memory_limit  # shared with the mirror
from longctx.tiles import RowWriter

from .compression import ContextCompressor
from .streaming import SinkKVCache

def estimate_memory(technique: str, length: int, *, heads: int = 8, head_dim: int = 64, **options) -> int:
    """Peak bytes the attention ``technique`` needs at ``length`` (B = 1, float32), inputs included:
    the registry's written arithmetic for MLX (``longctx.techniques.estimate_memory``)."""
    backend = "mlx"
    return registry.estimate_memory(technique, length, heads=heads, head_dim=head_dim, backend=backend, **options)


def exact_rows(q: np.ndarray, k: np.ndarray, v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact causal attention, float64, for query ``rows`` only: ``(1, H, len(rows), D)``."""
    raise NotImplementedError("Task 7: exact_rows -- see the book chapter 'Task 7: Benchmarking long context'")


def relative_error(out, exact: np.ndarray) -> float:
    """``||out - exact|| / ||exact||`` (Frobenius), in float64."""
    raise NotImplementedError("Task 7: relative_error -- see the book chapter 'Task 7: Benchmarking long context'")


def attention_run(technique: str, q: mx.array, k: mx.array, v: mx.array, **options):
    """``(fn, rows)``: ``fn()`` runs the technique and returns its output rows (an ``mx.array``
    ``(1, H, len(rows), D)``); ``rows`` are the query positions those outputs belong to."""
    t, o = registry.technique(technique), registry.bench_options(technique, options)
    L, scale = q.shape[2], q.shape[-1] ** -0.5
    if t.attention is not None:  # a class of the technique's module: cls(**options)(q, k, v)
        attend = t.resolve(__package__, t.attention)(**o)
        return lambda: attend(q, k, v), np.arange(L)
    if technique == "full":
        return lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"), np.arange(L)
    if technique == "streaming":
        def streaming():
            cache, out = SinkKVCache(o["sink_tokens"], o["window"]), RowWriter(q.shape, q.dtype, axis=2)
            for s in range(0, L, o["chunk_size"]):
                e = min(L, s + o["chunk_size"])
                keys, values = cache.update_and_fetch(k[:, :, s:e], v[:, :, s:e])
                out.put(s, mx.fast.scaled_dot_product_attention(q[:, :, s:e], keys, values, scale=scale,
                                                                mask="causal"))
                mx.eval(cache.keys, cache.values)  # one chunk's scores alive at a time
            return out.result()
        return streaming, np.arange(L)
    compressor = ContextCompressor(o["compression_ratio"], method=o["method"],
                                   observation_window=o["observation_window"])
    rows = np.arange(max(0, L - o["observation_window"]), L)

    def compressed():
        kept_k, kept_v, positions = compressor.compress_kv(k, v, q[:, :, rows[0]:])
        visible = positions[:, :, None, :] <= mx.array(rows)[:, None]  # (1, H, rows, kept): causal
        return mx.fast.scaled_dot_product_attention(q[:, :, rows[0]:], kept_k, kept_v, scale=scale, mask=visible)
    return compressed, rows


def benchmark_long_context(techniques=None, lengths=(50_000, 100_000, 200_000), *, backend: str = "mlx",
                           repeats: int = 3, model=None, heads: int = 8, head_dim: int = 64,
                           check_rows: int = 16, memory_limit: int | None = None, seed: int = 0,
                           progress=None) -> list[BenchmarkResult]:
    """One ``BenchmarkResult`` per technique and length, techniques in order, then lengths.

    ``techniques``: names (defaults from ``longctx.techniques``) or ``{name: options}``;
    ``None`` means the sub-quadratic ones. ``backend``: ``"mlx"`` here (the
    torch mirror takes ``"torch"``). ``model``: ``(model, tokenizer)`` for the
    task score instead of random attention inputs. ``progress``: called after
    each row.
    """
    if backend != "mlx":
        raise ValueError(f"backend must be 'mlx' for longctx.mlx (use longctx.torch for 'torch'), got {backend!r}")
    chosen, lengths, repeats, memory_limit = registry.check_benchmark(techniques, lengths, repeats,
                                                                      memory_limit, model)
    memory_limit = memory_limit or default_memory_limit()
    raise NotImplementedError("Task 7: benchmark_long_context -- see the book chapter 'Task 7: Benchmarking long context'")


def _attention_result(name, L, options, heads, head_dim, check_rows, repeats, estimate, seed) -> BenchmarkResult:
    rng = np.random.default_rng((seed, L))  # the same inputs for every technique at this length
    q, k, v = (rng.standard_normal((1, heads, L, head_dim)).astype(np.float32) for _ in range(3))
    fn, rows = attention_run(name, mx.array(q), mx.array(k), mx.array(v), **options)
    raise NotImplementedError("Task 7: _attention_result -- see the book chapter 'Task 7: Benchmarking long context'")


def estimate_model_memory(model, technique: str, length: int, **options) -> int:
    """Peak bytes of a ``LongContextQwen3`` prefill (``longctx.techniques.estimate_model_memory``)."""
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    return registry.estimate_model_memory(model.args, weights, technique, length, **options)


def _model_result(name, L, options, model, repeats, estimate, seed) -> BenchmarkResult:
    from longctx.data import tasks
    from longctx.data.tasks import greedy_answer

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


__all__ = ["BenchmarkResult", "attention_run", "benchmark_long_context",
           "default_memory_limit", "estimate_memory", "estimate_model_memory", "exact_rows", "relative_error"]
