"""``longctx bench``: Task 7's ``benchmark_long_context`` for each backend, as a table, a PNG and JSON.

Every technique runs in one process against ``full`` (causal attention) as
the baseline, on random attention inputs, or as ``LongContextQwen3``
strategies in a model (``--model``, scored on passkey retrieval). The table
adds the ratios against ``full`` at the same length and backend, and the
useful GFLOP/s where the work is known (only the multiply-adds of visible
(query, key) pairs count).

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
from pathlib import Path

import numpy as np

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx import techniques as registry
from longctx import measure

def techniques_for(names, window: int) -> dict:
    """CLI names -> options: the registry's defaults, with ``--window`` mapped by each technique."""
    return {name: registry.bench_options(name, registry.technique(name).from_window(window)) for name in names}


def mlx_matmul_gflops(n: int = 2048) -> float:
    import mlx.core as mx
    a = mx.random.normal((n, n))
    mx.eval(a)
    return 2 * n ** 3 / measure.mlx_seconds(lambda: a @ a, repeats=3) / 1e9


def run(backend: str, techniques: dict, lengths, *, model=None, progress=None, **kw) -> list[dict]:
    """``benchmark_long_context`` of ``backend``, as dicts with ``backend`` and ``gflops`` added."""
    if backend == "mlx":
        from longctx.mlx.benchmark import benchmark_long_context
    else:
        from longctx.torch.benchmark import benchmark_long_context
    results = benchmark_long_context(techniques, lengths, backend=backend, model=model, progress=progress, **kw)
    rows = []
    for r in results:
        row = {"backend": backend, **r.to_dict(), "gflops": None}
        flops = None if model else registry.useful_flops(r.technique, r.length, techniques[r.technique],
                                                 kw.get("heads", 8), kw.get("head_dim", 64))
        if flops and r.median_ms:
            row["gflops"] = flops / (r.median_ms / 1e3) / 1e9
        rows.append(row)
    return rows


SCALING_TIME = 4.4  # goal for time(4L) / time(L): linear, with 10% slack
SCALING_MEMORY = (1.1, 4 * 2**20)  # goal for beyond(4L): at most 1.1 beyond(L) + 4 MiB


def scaling_rows(backend: str, techniques: dict, length: int, *, heads: int = 4, head_dim: int = 64,
                 repeats: int = 1, progress=None, **kw) -> list[dict]:
    """``longctx bench --scaling``: each technique at ``length`` and ``4 * length``, with the time
    ratio and the peak memory beyond q, k, v and the output at both lengths, and whether they
    meet the goals: linear time (``SCALING_TIME``) and memory beyond the output that does not grow
    (``SCALING_MEMORY``). A compressed cache's output includes the entries it keeps."""
    lengths = [length, 4 * length]
    rows = run(backend, techniques, lengths, heads=heads, head_dim=head_dim, repeats=repeats, progress=progress, **kw)
    out = []
    for name, options in techniques.items():
        short, long = (next(r for r in rows if r["technique"] == name and r["length"] == L) for L in lengths)
        beyond = []
        for r in (short, long):
            qkv = heads * r["length"] * head_dim * 4
            output = qkv
            if name == "compressed":  # the attended rows and the (K, V) it keeps
                output = heads * options["observation_window"] * head_dim * 4 + 2 * (1 - options["compression_ratio"]) * qkv
            beyond.append(None if r["median_ms"] is None else r["peak_memory_bytes"] - 3 * qkv - output)
        ran = None not in beyond
        ratio = long["median_ms"] / short["median_ms"] if ran else None
        out.append({"backend": backend, "technique": name, "length": length, "ms": short["median_ms"],
                    "ms_4x": long["median_ms"], "time_ratio": ratio, "beyond_bytes": beyond[0],
                    "beyond_4x_bytes": beyond[1], "skipped": short["skipped"] or long["skipped"],
                    "linear_time": ran and ratio <= SCALING_TIME,
                    "flat_memory": ran and beyond[1] <= SCALING_MEMORY[0] * max(beyond[0], 0) + SCALING_MEMORY[1]})
    return out


def backward_rows(backend: str, techniques: dict, lengths, *, heads: int = 4, head_dim: int = 64, repeats: int = 3,
                  memory_limit: int | None = None, device: str | None = None, progress=None) -> list[dict]:
    """``longctx bench --backward``: training cost. Each technique with an attention class (and
    ``full``, the backend's fused attention) at each length: the forward time, the forward+backward
    time (``dq, dk, dv`` of ``sum(out * w)``), timed in turn (``measure.interleaved_seconds``), and
    the peak memory of forward+backward beyond ``q, k, v`` and the loss weights. A row whose
    forward estimate times 3 (scores, their softmax and its gradient) exceeds ``memory_limit`` is
    skipped, with the reason."""
    import importlib

    import numpy as np
    limit = registry.default_memory_limit() if memory_limit is None else memory_limit
    package = importlib.import_module(f"longctx.{backend}")
    nn = importlib.import_module(f"longctx.{backend}.nn")
    rows = []
    for L in lengths:
        rng = np.random.default_rng(L)
        inputs = [rng.standard_normal((1, heads, L, head_dim)).astype(np.float32) for _ in range(4)]
        for name, options in techniques.items():
            t = registry.technique(name)
            if not (t.attention or name == "full"):
                continue
            estimate = 3 * registry.estimate_memory(name, L, heads=heads, head_dim=head_dim,
                                                    backend="mlx" if backend == "mlx" else "torch", **options)
            row = {"backend": backend, "technique": name, "length": L, "forward_ms": None, "forward_backward_ms": None,
                   "peak_memory_bytes": None, "memory_estimate_bytes": estimate, "skipped": ""}
            if estimate > limit:
                row["skipped"] = f"needs ~{estimate / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB"
            else:
                layer = nn.CausalAttention() if name == "full" else t.resolve(package.__name__, t.attention)(**options)
                forward, train, peak = _training_runs(backend, layer, inputs, device)
                fwd, fb = measure.interleaved_seconds(forward, train, rounds=repeats)
                row.update(forward_ms=fwd * 1e3, forward_backward_ms=fb * 1e3, peak_memory_bytes=peak())
            rows.append(row)
            if progress:
                progress(row)
    for r in rows:  # ratios against full attention's forward+backward at the same length
        full = next((f for f in rows if f["technique"] == "full" and f["length"] == r["length"]), None)
        ran = r["forward_backward_ms"] is not None
        r["backward_x_forward"] = (r["forward_backward_ms"] - r["forward_ms"]) / r["forward_ms"] if ran else None
        r["x_full"] = (r["forward_backward_ms"] / full["forward_backward_ms"]
                       if ran and full and full["forward_backward_ms"] else None)
    return rows


def _training_runs(backend: str, layer, inputs, device):
    """``(forward, forward + backward, peak bytes of forward + backward)`` as blocking calls."""
    if backend == "mlx":
        import mlx.core as mx
        q, k, v, w = (mx.array(x) for x in inputs)
        grads = mx.grad(lambda q, k, v: (layer(q, k, v) * w).sum(), argnums=(0, 1, 2))
        return (measure.mlx_blocking(lambda: layer(q, k, v)), measure.mlx_blocking(lambda: grads(q, k, v)),
                lambda: measure.mlx_peak_bytes(lambda: grads(q, k, v)))
    import torch
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v, w = (torch.tensor(x, device=dev) for x in inputs)

    def forward():
        with torch.no_grad():
            return layer(q, k, v)

    def train():
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad((layer(*x) * w).sum(), x)
    return (measure.torch_blocking(forward), measure.torch_blocking(train),
            lambda: measure.torch_peak_bytes(train, dev))


def backward_markdown(rows: list[dict]) -> str:
    """The ``--backward`` rows as a Markdown table (``backward.md``, which the book includes)."""
    lines = ["| backend | technique | L | forward ms | fwd+bwd ms | bwd / fwd | x full | peak MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['backend']} | {r['technique']} | {r['length']:,} | skipped: {r['skipped']} | | | | |")
            continue
        x_full = "" if r["x_full"] is None else f"{r['x_full']:.2f}"
        lines.append(f"| {r['backend']} | {r['technique']} | {r['length']:,} | {r['forward_ms']:,.1f} | "
                     f"{r['forward_backward_ms']:,.1f} | {r['backward_x_forward']:.2f} | {x_full} | "
                     f"{r['peak_memory_bytes'] / 2**20:,.1f} |")
    return "\n".join(lines) + "\n"


def report_backward(rows: list[dict], config: dict, out: Path, console) -> Path:
    """The ``--backward`` table, ``backward.json`` and ``backward.md``."""
    from rich.table import Table
    table = Table(title=f"Training cost: {config['title']}")
    for column in ("backend", "technique", "L", "forward ms", "fwd+bwd ms", "bwd / fwd", "x full", "peak MiB"):
        table.add_column(column, justify="left" if column in ("backend", "technique") else "right")
    for r in rows:
        if r["skipped"]:
            table.add_row(r["backend"], r["technique"], f"{r['length']:,}", f"skipped: {r['skipped']}", *[""] * 4)
            continue
        table.add_row(r["backend"], r["technique"], f"{r['length']:,}", f"{r['forward_ms']:.1f}",
                      f"{r['forward_backward_ms']:.1f}", f"{r['backward_x_forward']:.2f}",
                      "" if r["x_full"] is None else f"{r['x_full']:.2f}", f"{r['peak_memory_bytes'] / 2**20:.1f}")
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "backward.json"
    path.write_text(json.dumps({"machine": {"platform": platform.platform(), "processor": platform.processor()},
                                "config": config, "rows": rows}, indent=2))
    (out / "backward.md").write_text(backward_markdown(rows))
    console.print(f"wrote {path} and backward.md")
    return path


def report_scaling(rows: list[dict], config: dict, out: Path, console) -> Path:
    """The ``--scaling`` table and ``scaling.json``."""
    from rich.table import Table
    table = Table(title=f"Scaling: {config['title']}; goals: time x{SCALING_TIME} or less for 4x the tokens, "
                        "memory beyond q, k, v and the output the same at both lengths")
    for column in ("backend", "technique", "L", "ms", "4L ms", "x time", "beyond MiB at L", "at 4L", "verdict"):
        table.add_column(column, justify="left" if column in ("backend", "technique", "verdict") else "right")
    for r in rows:
        if r["skipped"]:
            table.add_row(r["backend"], r["technique"], str(r["length"]), f"skipped: {r['skipped']}", *[""] * 5)
            continue
        verdict = ", ".join(["linear time" if r["linear_time"] else "[red]time grows faster than L[/red]",
                             "flat memory" if r["flat_memory"] else "[red]memory grows with L[/red]"])
        table.add_row(r["backend"], r["technique"], f"{r['length']:,}", f"{r['ms']:.0f}", f"{r['ms_4x']:.0f}",
                      f"{r['time_ratio']:.2f}", f"{r['beyond_bytes'] / 2**20:.1f}",
                      f"{r['beyond_4x_bytes'] / 2**20:.1f}", verdict)
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaling.json"
    path.write_text(json.dumps({"machine": {"platform": platform.platform(), "processor": platform.processor()},
                                "config": config, "rows": rows}, indent=2))
    console.print(f"wrote {path}")
    return path


def report(rows: list[dict], config: dict, out: Path, console, ring: list[dict] = (),
           caches: list[dict] = ()) -> Path:
    """The table (ratios against ``full`` at the same backend and length), ``bench.json`` and ``bench.png``."""
    from rich.table import Table
    table = Table(title=f"Task 7: {config['title']} (MLX matmul 2048^3: {config['mlx_matmul_gflops']:.0f} GFLOP/s)")
    for column in ("backend", "technique", "L", "ms", "tokens/s", "peak MiB", "estimate MiB", "useful GFLOP/s",
                   rows[0]["quality_metric"] if rows else "quality", "speed vs full", "memory vs full"):
        table.add_column(column, justify="left" if column in ("backend", "technique") else "right")
    full = {(r["backend"], r["length"]): r for r in rows if r["technique"] == "full" and r["median_ms"]}
    for r in rows:
        f = full.get((r["backend"], r["length"]))
        ran = r["median_ms"] is not None
        table.add_row(r["backend"], r["technique"], str(r["length"]),
                      f"{r['median_ms']:.1f}" if ran else f"skipped: {r['skipped']}",
                      f"{r['tokens_per_second']:,.0f}" if ran else "",
                      f"{r['peak_memory_bytes'] / 2**20:.1f}" if ran else "",
                      f"{r['memory_estimate_bytes'] / 2**20:.1f}",
                      f"{r['gflops']:.1f}" if r["gflops"] else "",
                      f"{r['quality']:.3g}" if ran else "",
                      f"{f['median_ms'] / r['median_ms']:.1f}x" if f and ran else "",
                      f"{f['peak_memory_bytes'] / r['peak_memory_bytes']:.1f}x" if f and ran else "")
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
    path = out / "bench.json"
    path.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "config": config, "rows": rows, "ring": list(ring), "caches": list(caches)}, indent=2))
    plot(rows, out / "bench.png", config["title"])
    console.print(f"wrote {path} and {out / 'bench.png'}")
    return path


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Time and peak memory against length, log-log, one line per (backend, technique)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend, technique in dict.fromkeys((r["backend"], r["technique"]) for r in rows if r["median_ms"]):
        pts = [r for r in rows if (r["backend"], r["technique"]) == (backend, technique) and r["median_ms"]]
        style = "-" if backend == "mlx" else "--"
        label = f"{backend} {technique}"
        ax_t.plot([r["length"] for r in pts], [r["median_ms"] for r in pts], style, marker="o", label=label)
        ax_m.plot([r["length"] for r in pts], [r["peak_memory_bytes"] / 2**20 for r in pts], style, marker="o",
                  label=label)
    ran = any(r["median_ms"] for r in rows)
    for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MiB)")):
        if ran:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "every row was skipped (see the table)", ha="center", transform=ax.transAxes)
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if ran:
        ax_t.legend(fontsize=7)
    fig.suptitle(title)
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


def _mlx_decode_ms(model, caches, steps: int = 16) -> float:
    import mlx.core as mx
    token = mx.array([[1]])
    mx.eval(model(token, cache=caches))  # warm-up (and, for the compressed cache, its compression)
    # The compression is lazy and the step's logits do not depend on it: evaluate it now, or the
    # first timed step pays for it (at 128k tokens that tripled the per-token figure).
    mx.eval([cache.state for cache in caches])
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
