"""Task 7 in PyTorch: the long-context benchmark, the mirror of ``longctx.mlx``.

Same names, arguments and results as ``solutions/week3/benchmark.py`` (read
the book chapter there); the techniques are ``longctx.torch``'s, on the CPU
or, when there is one, the CUDA device (``device=``). Timing synchronises
CUDA; peak memory is CUDA's allocator counter or, on the CPU, the live
storage counter of ``longctx.measure``.

One estimate differs: PyTorch's CPU and CUDA ``scaled_dot_product_attention``
with ``is_causal`` runs a fused flash kernel (no ``L x L`` scores), so
``full`` costs ``O(L)`` memory here, and only its ``O(L^2)`` time limits it.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from longctx import techniques as registry
from longctx.techniques import ERROR, PASSKEY, BenchmarkResult, default_memory_limit
from longctx import measure
from longctx.exact import causal_rows as exact_rows
from longctx.exact import relative_error

from .compression import ContextCompressor
from .streaming import SinkLayer


def estimate_memory(technique: str, length: int, *, heads: int = 8, head_dim: int = 64, **options) -> int:
    """The registry's arithmetic for torch (``longctx.techniques``): ``full``'s flash kernel keeps
    only q, k, v, the output and the log-sum-exp per row."""
    return registry.estimate_memory(technique, length, heads=heads, head_dim=head_dim, backend="torch", **options)


def attention_run(technique: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options):
    """``(fn, rows)`` as in ``longctx.mlx``: ``fn()`` returns the output rows for query positions ``rows``."""
    t, o = registry.technique(technique), registry.bench_options(technique, options)
    L, scale = q.shape[2], q.shape[-1] ** -0.5
    if t.attention is not None:  # a class of the technique's module: cls(**options)(q, k, v)
        attend = t.resolve(__package__, t.attention)(**o)
        return lambda: attend(q, k, v), np.arange(L)
    if technique == "full":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), np.arange(L)
    if technique == "streaming":
        def streaming():
            cache, out = SinkLayer(o["sink_tokens"], o["window"]), torch.empty_like(q)  # filled chunk by chunk
            for s in range(0, L, o["chunk_size"]):
                e = min(L, s + o["chunk_size"])
                keys, values = cache.update(k[:, :, s:e], v[:, :, s:e])
                n = keys.shape[2]  # the chunk's queries are the last e - s of the n keys
                visible = torch.arange(n, device=q.device) <= torch.arange(n - (e - s), n, device=q.device)[:, None]
                out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], keys, values, attn_mask=visible)
            return out
        return streaming, np.arange(L)
    compressor = ContextCompressor(o["compression_ratio"], method=o["method"],
                                   observation_window=o["observation_window"])
    rows = np.arange(max(0, L - o["observation_window"]), L)

    def compressed():
        kept_k, kept_v, positions = compressor.compress_kv(k, v, q[:, :, rows[0]:])
        visible = positions[:, :, None, :] <= torch.as_tensor(rows, device=q.device)[:, None]
        return F.scaled_dot_product_attention(q[:, :, rows[0]:], kept_k, kept_v, attn_mask=visible, scale=scale)
    return compressed, rows


def benchmark_long_context(techniques=None, lengths=(50_000, 100_000, 200_000), *, backend: str = "torch",
                           repeats: int = 3, model=None, heads: int = 8, head_dim: int = 64,
                           check_rows: int = 16, memory_limit: int | None = None, seed: int = 0,
                           device: str | None = None, progress=None) -> list[BenchmarkResult]:
    """As ``longctx.mlx``'s, on ``device`` (default: CUDA when available); ``model`` is
    ``(transformers model, tokenizer)``."""
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' for longctx.torch (use longctx.mlx for 'mlx'), got {backend!r}")
    chosen, lengths, repeats, memory_limit = registry.check_benchmark(techniques, lengths, repeats,
                                                                      memory_limit, model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if memory_limit is None:
        memory_limit = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else default_memory_limit()
    results = []
    for name, options in chosen.items():
        for L in lengths:
            if model is None:
                estimate = estimate_memory(name, L, heads=heads, head_dim=head_dim, **options)
            else:
                estimate = estimate_model_memory(model[0], name, L, **options)
            if estimate > memory_limit:
                results.append(registry.skipped_result(name, L, estimate, memory_limit, PASSKEY if model else ERROR))
            elif model is None:
                results.append(_attention_result(name, L, options, heads, head_dim, check_rows, repeats,
                                                 estimate, seed, device))
            else:
                results.append(_model_result(name, L, options, model, repeats, estimate, seed))
            if progress:
                progress(results[-1])
    return results


def _attention_result(name, L, options, heads, head_dim, check_rows, repeats, estimate, seed, device):
    rng = np.random.default_rng((seed, L))  # the same inputs for every technique at this length
    q, k, v = (rng.standard_normal((1, heads, L, head_dim)).astype(np.float32) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(x).to(device) for x in (q, k, v))
    fn, rows = attention_run(name, tq, tk, tv, **options)
    with torch.no_grad():
        out = fn()
        seconds = measure.torch_seconds(fn, repeats=repeats, warmup=0)
        peak = measure.torch_peak_bytes(fn, device) + 3 * q.nbytes  # the inputs count, as in the estimate
    picked = np.unique(np.linspace(0, len(rows) - 1, min(check_rows, len(rows))).round().astype(int))
    error = relative_error(out.float().cpu().numpy()[:, :, picked], exact_rows(q, k, v, rows[picked]))
    return BenchmarkResult(name, L, 1e3 * seconds, L / seconds, peak, error, ERROR, estimate)


def estimate_model_memory(model, technique: str, length: int, **options) -> int:
    """As ``longctx.mlx``'s (``longctx.techniques.estimate_model_memory``), for a transformers Qwen3."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return registry.estimate_model_memory(model.config, weights, technique, length, **options)


def _model_result(name, L, options, model, repeats, estimate, seed) -> BenchmarkResult:
    from longctx.data import tasks
    from longctx.data.tasks import greedy_answer

    from .qwen3_long import LongContextQwen3
    base, tokenizer = model
    rng = np.random.default_rng((seed, L))
    long = LongContextQwen3(base, name, **options)
    device = next(base.parameters()).device
    times, scores, peaks = [], [], []
    for i in range(repeats):
        prompt = tasks.passkey(tokenizer, L, (i + 0.5) / repeats, int(rng.integers(10_000, 100_000)))
        text = []
        start = time.perf_counter()
        peaks.append(measure.torch_peak_bytes(lambda: text.append(greedy_answer(long, tokenizer, prompt)), device))
        times.append(time.perf_counter() - start)
        scores.append(prompt.score(text[0]))
    ms = 1e3 * statistics.median(times)
    return BenchmarkResult(name, L, ms, L / (ms / 1e3), max(peaks), float(np.mean(scores)), PASSKEY, estimate)


__all__ = ["BenchmarkResult", "attention_run", "benchmark_long_context",
           "default_memory_limit", "estimate_memory", "estimate_model_memory", "exact_rows", "relative_error"]
