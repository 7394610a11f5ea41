"""``longctx bench``: every technique against its baselines, in one process.

Task 1 sliding-window, Task 2 hierarchical (LongNet levels) and Task 3 ring
attention (simulated in one process, 4 shards) against the dense-mask
baseline (``scaled_dot_product_attention`` with an ``L x L`` boolean mask) and
causal full attention, for MLX and torch, across lengths. Each row has the
median time, the peak memory, the useful GFLOP/s (only the multiply-adds of
visible (query, key) pairs count) and, for MLX, its fraction of MLX's own
2048^3 matmul measured in the same run.

``ring_rows`` (``longctx bench --ring``) runs Task 3 across real processes.
``cache_rows`` runs Tasks 4 and 5 through the seeded tiny Qwen3 of
``longctx.models``: tokens/s and peak memory while streaming with a
``SinkKVCache``, and decode time per token with a ``CompressedKVCache`` at
ratio 0.9 against mlx-lm's full ``KVCache`` holding the same context.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx.testing import measure
from longctx.testing.oracles import sliding_mask

DENSE_LIMIT_BYTES = 8 << 30  # a dense baseline whose score matrix needs more is skipped


@dataclass
class Row:
    backend: str
    technique: str
    length: int
    ms: float | None
    peak_mib: float | None
    gflops: float | None
    note: str = ""


HIERARCHICAL_LEVELS = [64, 256, 1024]  # dilations 1, 4, 16: each segment keeps 64 rows
RING_SIZE = 4


def useful_flops(L: int, window: int, heads: int, dim: int) -> float:
    """Multiply-adds that matter: QK^T and PV over the visible keys only (2 * 2 FLOPs each)."""
    visible = sum(min(i + 1, window) for i in range(L))
    return 4.0 * heads * dim * visible


def hierarchical_flops(L: int, levels, heads: int, dim: int) -> float:
    """Multiply-adds over the causal pairs each level keeps: a segment whose head keeps
    ``c`` positions has ``c (c + 1) / 2`` of them (default dilations ``w // levels[0]``)."""
    pairs = 0
    for w in levels:
        r = max(1, w // levels[0])
        for h in range(heads):
            offset = h // -(-heads // r)
            for s0 in range(0, L, w):
                c = len(range(offset, min(w, L - s0), r))
                pairs += c * (c + 1) // 2
    return 4.0 * dim * pairs


def mlx_matmul_gflops(n: int = 2048) -> float:
    import mlx.core as mx
    a = mx.random.normal((n, n))
    mx.eval(a)
    return 2 * n ** 3 / measure.mlx_seconds(lambda: a @ a, repeats=3) / 1e9


def _cases(backend: str, window: int):
    """(technique, make(q, k, v, mask) -> callable) for one backend."""
    if backend == "mlx":
        import mlx.core as mx

        from longctx.mlx import HierarchicalAttention, RingAttention, SlidingWindowAttention
        attn = SlidingWindowAttention(window)
        levels, ring = HierarchicalAttention(HIERARCHICAL_LEVELS), RingAttention(RING_SIZE, 1024)
        return [
            ("sliding", lambda q, k, v, m: lambda: attn(q, k, v)),
            ("hierarchical", lambda q, k, v, m: lambda: levels(q, k, v)),
            (f"ring (1 process, P={RING_SIZE})", lambda q, k, v, m: lambda: ring(q, k, v)),
            ("dense mask", lambda q, k, v, m: lambda: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=q.shape[-1] ** -0.5, mask=m)),
            ("causal full", lambda q, k, v, m: lambda: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=q.shape[-1] ** -0.5, mask="causal")),
        ]
    import torch

    from longctx.torch import HierarchicalAttention, RingAttention, SlidingWindowAttention
    attn = SlidingWindowAttention(window)
    levels, ring = HierarchicalAttention(HIERARCHICAL_LEVELS), RingAttention(RING_SIZE, 1024)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return [
        ("sliding", lambda q, k, v, m: lambda: attn(q, k, v)),
        ("hierarchical", lambda q, k, v, m: lambda: levels(q, k, v)),
        (f"ring (1 process, P={RING_SIZE})", lambda q, k, v, m: lambda: ring(q, k, v)),
        ("dense mask", lambda q, k, v, m: lambda: sdpa(q, k, v, attn_mask=m)),
        ("causal full", lambda q, k, v, m: lambda: sdpa(q, k, v, is_causal=True)),
    ]


def _measure(backend: str, fn, repeats: int) -> tuple[float, float]:
    if backend == "mlx":
        return measure.mlx_seconds(fn, repeats=repeats), measure.mlx_peak_bytes(fn)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return measure.torch_seconds(fn, repeats=repeats), measure.torch_peak_bytes(fn, device)


def run(lengths=(1024, 2048, 4096), window: int = 256, heads: int = 8, dim: int = 64,
        backends=("mlx", "torch"), repeats: int = 3, progress=None) -> list[Row]:
    rows = []
    rng = np.random.default_rng(0)
    for backend in backends:
        cases = _cases(backend, window)
        for L in lengths:
            q, k, v = (rng.standard_normal((1, heads, L, dim)).astype(np.float32) for _ in range(3))
            mask = sliding_mask(L, L, window)
            if backend == "mlx":
                import mlx.core as mx
                q, k, v, m = mx.array(q), mx.array(k), mx.array(v), mx.array(mask)
            else:
                import torch
                dev = "cuda" if torch.cuda.is_available() else "cpu"
                q, k, v, m = (torch.from_numpy(x).to(dev) for x in (q, k, v, mask))
            for technique, make in cases:
                if technique == "hierarchical":
                    flops = hierarchical_flops(L, HIERARCHICAL_LEVELS, heads, dim)
                else:
                    flops = useful_flops(L, L if technique.startswith(("causal", "ring")) else window, heads, dim)
                if technique in ("dense mask", "causal full") and heads * L * L * 8 > DENSE_LIMIT_BYTES:
                    rows.append(Row(backend, technique, L, None, None, None,
                                    f"skipped: ~{heads * L * L * 8 / 2**30:.0f} GiB of scores"))
                else:
                    seconds, peak = _measure(backend, make(q, k, v, m), repeats)
                    rows.append(Row(backend, technique, L, seconds * 1e3, peak / 2**20, flops / seconds / 1e9))
                if progress:
                    progress()
    return rows


def report(rows: list[Row], matmul_gflops: float, window: int, heads: int, dim: int, out: Path, console,
           ring: list[dict] = (), caches: list[dict] = ()) -> None:
    from rich.table import Table
    table = Table(title=f"Tasks 1-3: sliding W={window}, hierarchical levels {HIERARCHICAL_LEVELS}, ring "
                        f"P={RING_SIZE}; H={heads}, D={dim}, float32, B=1 "
                        f"(MLX matmul 2048^3: {matmul_gflops:.0f} GFLOP/s)")
    for column in ("backend", "technique", "L", "ms", "peak MiB", "useful GFLOP/s", "% matmul",
                   "speed vs dense", "memory vs dense"):
        table.add_column(column, justify="right" if column not in ("backend", "technique") else "left")
    dense = {(r.backend, r.length): r for r in rows if r.technique == "dense mask"}
    for r in rows:
        d = dense.get((r.backend, r.length))
        faster = f"{d.ms / r.ms:.1f}x" if d and d.ms and r.ms else ""
        smaller = f"{d.peak_mib / r.peak_mib:.1f}x" if d and d.peak_mib and r.peak_mib else ""
        table.add_row(r.backend, r.technique, str(r.length),
                      f"{r.ms:.1f}" if r.ms else r.note, f"{r.peak_mib:.1f}" if r.peak_mib else "",
                      f"{r.gflops:.1f}" if r.gflops else "",
                      f"{100 * r.gflops / matmul_gflops:.0f}%" if r.gflops and r.backend == "mlx" else "",
                      faster if r.technique != "dense mask" else "1x",
                      smaller if r.technique != "dense mask" else "1x")
    console.print(table)
    for title, extra in (("Task 3 across real processes", ring),
                         ("Tasks 4 and 5 in the tiny Qwen3 (MLX)", caches)):
        if extra:
            extra_table = Table(title=title)
            for column in ("measure", "L", "value", "note"):
                extra_table.add_column(column)
            for r in extra:
                extra_table.add_row(r["what"], str(r["length"]), f"{r['value']:.3g}", r["note"])
            console.print(extra_table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "config": {"window": window, "heads": heads, "dim": dim, "dtype": "float32", "batch": 1},
        "mlx_matmul_gflops": matmul_gflops, "rows": [asdict(r) for r in rows], "ring": list(ring),
        "caches": list(caches)},
        indent=2))
    _plot(rows, window, out / "bench.png")
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")


def _plot(rows: list[Row], window: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for (backend, technique) in dict.fromkeys((r.backend, r.technique) for r in rows):
        pts = [r for r in rows if (r.backend, r.technique) == (backend, technique) and r.ms]
        style = "-" if backend == "mlx" else "--"
        ax_t.plot([r.length for r in pts], [r.ms for r in pts], style, marker="o", label=f"{backend} {technique}")
        ax_m.plot([r.length for r in pts], [r.peak_mib for r in pts], style, marker="o", label=f"{backend} {technique}")
    for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"Sliding window (W={window}), hierarchical, ring vs dense-mask and causal attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ring_rows(backend: str = "mlx", processes: int = 4, length: int = 65536, check_length: int = 4096,
              heads: int = 4, kv_heads: int = 2, dim: int = 32, block_size: int = 1024) -> list[dict]:
    """Task 3 across real processes (``mlx.launch`` / ``torchrun`` on this host).

    Exactness: every rank's error against the float64 oracle at ``check_length``
    (an ``L x L`` oracle at 65536 would not fit), both layouts. Memory and time:
    per-rank peak and seconds per ring step at ``length``, against a
    one-process blockwise run (``RingAttention(1, block_size)``) of the whole
    sequence in this process. Causal work: the (query, key) pairs per rank.
    """
    from longctx.ringrun import causal_work, run_ring
    shape = ["--heads", str(heads), "--kv-heads", str(kv_heads), "--dim", str(dim), "--block-size", str(block_size)]
    rows = []
    for layout in ("contiguous", "zigzag"):
        reports, log = run_ring(backend, processes, "--length", str(check_length), "--check", "--layout", layout,
                                *shape)
        errors = [r.get("max_error") for r in reports]
        if len(reports) != processes or any(e is None for e in errors):
            raise RuntimeError(f"the {layout} ring failed:\n{log[-2000:]}\n{reports}")
        work = [causal_work(r, processes, length, layout, True) for r in range(processes)]
        rows.append({"what": f"exactness, {layout}", "length": check_length, "value": max(errors),
                     "note": f"max |error| over {processes} ranks vs float64 oracle"})
        rows.append({"what": f"causal work per rank, {layout}", "length": length,
                     "value": max(work) / min(work), "note": "max/min pairs: " + ", ".join(f"{w:.3g}" for w in work)})
    reports, log = run_ring(backend, processes, "--length", str(length), "--layout", "zigzag", *shape, timeout=3000)
    if len(reports) != processes or any("error" in r for r in reports):
        raise RuntimeError(f"the ring at L={length} failed:\n{log[-2000:]}\n{reports}")
    rng = np.random.default_rng(0)
    if backend == "mlx":
        import mlx.core as mx

        from longctx.mlx import RingAttention
        q = mx.array(rng.standard_normal((1, heads, length, dim)).astype(np.float32))
        k, v = (mx.array(rng.standard_normal((1, kv_heads, length, dim)).astype(np.float32)) for _ in range(2))
        mx.eval(q, k, v)
        one = RingAttention(1, block_size)
        start = time.perf_counter()
        peak = measure.mlx_peak_bytes(lambda: one(q, k, v))  # one run: it is long at this length
        seconds = time.perf_counter() - start
        rank_peak = max(r["peak_bytes"] for r in reports)
        rows.append({"what": "peak memory per rank / one-process blockwise", "length": length,
                     "value": rank_peak / peak,
                     "note": f"{rank_peak / 2**20:.0f} MiB per rank vs {peak / 2**20:.0f} MiB (goal <= 1/3)"})
        rows.append({"what": "seconds, one-process blockwise", "length": length, "value": seconds, "note": ""})
    step = max(r["seconds_per_step"] for r in reports)
    rows.append({"what": "seconds per ring step (slowest rank)", "length": length, "value": step,
                 "note": f"{processes} processes sharing this machine's cores"})
    return rows


STREAM = dict(chunk_size=512, overlap=0, sink_tokens=4, window=1024)


def _mlx_decode_ms(model, caches, steps: int = 8) -> float:
    import mlx.core as mx
    token = mx.array([[1]])
    mx.eval(model(token, cache=caches))  # warm-up (and, for the compressed cache, its compression)
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(token, cache=caches))
    return 1e3 * (time.perf_counter() - start) / steps


def cache_rows(stream_lengths=(16384,), decode_context: int = 16384, ratio: float = 0.9) -> list[dict]:
    """Tasks 4 and 5 on MLX: streaming tokens/s and peak memory; compressed vs full decode."""
    import itertools

    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from longctx.mlx import CompressedKVCache, ContextCompressor, StreamingProcessor
    from longctx.models import TINY_QWEN3, mlx_qwen3
    model = mlx_qwen3(0)
    rows, peaks = [], {}
    for n in stream_lengths:
        processor = StreamingProcessor(**STREAM)
        ids = itertools.islice(itertools.cycle(range(TINY_QWEN3["vocab_size"])), n)

        def stream():
            for out in processor.process_stream(ids, model):
                last = out
            return last
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        start = time.perf_counter()
        stream()
        seconds = time.perf_counter() - start
        peaks[n] = max(0, mx.get_peak_memory() - before)
        rows.append({"what": "streaming tokens/s (SinkKVCache)", "length": n, "value": n / seconds,
                     "note": f"peak {peaks[n] / 2**20:.1f} MiB; chunk {STREAM['chunk_size']}, "
                             f"{STREAM['sink_tokens']} sinks + window {STREAM['window']}"})
    if len(peaks) > 1:
        lo, hi = min(peaks), max(peaks)
        rows.append({"what": "streaming peak memory, longest / shortest", "length": hi,
                     "value": peaks[hi] / peaks[lo], "note": f"vs {lo} tokens (goal: within 5%)"})

    # Decode with `decode_context` tokens cached: random keys stand in for a prefill (the same for both).
    layers, kv_heads, dim = TINY_QWEN3["num_hidden_layers"], TINY_QWEN3["num_key_value_heads"], TINY_QWEN3["head_dim"]
    rng = np.random.default_rng(0)
    context = [(mx.array(rng.standard_normal((1, kv_heads, decode_context, dim)).astype(np.float32)),
                mx.array(rng.standard_normal((1, kv_heads, decode_context, dim)).astype(np.float32)))
               for _ in range(layers)]
    full = [KVCache() for _ in range(layers)]
    compressed = [CompressedKVCache(ContextCompressor(ratio, method="knorm")) for _ in range(layers)]
    for cache, (k, v) in itertools.chain(zip(full, context), zip(compressed, context)):
        cache.update_and_fetch(k, v)
        mx.eval(cache.state)
    full_ms, compressed_ms = _mlx_decode_ms(model, full), _mlx_decode_ms(model, compressed)
    held = compressed[0].size()
    rows.append({"what": "decode ms/token, full KVCache", "length": decode_context, "value": full_ms,
                 "note": f"{full[0].nbytes * layers / 2**20:.0f} MiB cached"})
    rows.append({"what": f"decode ms/token, CompressedKVCache knorm {ratio}", "length": decode_context,
                 "value": compressed_ms, "note": f"{held} entries held; {full_ms / compressed_ms:.1f}x faster "
                                                 "than full (goal >= 5x)"})
    return rows
