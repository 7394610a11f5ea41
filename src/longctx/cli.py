"""The ``longctx`` command: ``bench`` (the main job), ``doctor``, ``stubs``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import longctx  # noqa: F401  (fast BLAS before mlx.core)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from longctx import bench
    console = Console(width=None if sys.stdout.isatty() else 130)
    if not longctx.blas.has_fast_blas():
        console.print(f"[yellow]slow reference BLAS in use (see `longctx doctor`); fix: {longctx.blas.FIX}")
    backends = ("mlx", "torch") if args.backend == "all" else (args.backend,)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(backends) * len(args.lengths) * 5 + 1 + args.ring)
        matmul = bench.mlx_matmul_gflops()
        progress.advance(task)
        rows = bench.run(args.lengths, args.window, args.heads, args.dim, backends, args.repeats,
                         progress=lambda: progress.advance(task))
        ring = []
        if args.ring:
            progress.update(task, description=f"ring: {args.ring_processes} processes, L={args.ring_length}")
            ring = bench.ring_rows(backends[0], args.ring_processes, args.ring_length)
            progress.advance(task)
        progress.update(task, description=f"caches: stream {args.stream_tokens}, decode at {args.decode_context}")
        caches = bench.cache_rows(args.stream_tokens, args.decode_context)
    bench.report(rows, matmul, args.window, args.heads, args.dim, Path(args.out), console, ring, caches)
    return 0


def cmd_make_model(args) -> int:
    from longctx.models import make_checkpoint
    try:
        path = make_checkpoint(args.path, seed=args.seed, layers=args.layers, vocab_size=args.vocab_size,
                               tie_word_embeddings=not args.untied)
    except ValueError as error:
        print(f"longctx make-model: {error}", file=sys.stderr)
        return 2
    print(f"wrote a tiny Qwen3 to {path}: load it with mlx_lm.load({str(path)!r}) or "
          f"AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return 0


SLOW_GFLOPS = 30  # the bundled reference BLAS gives ~5, OpenBLAS on 2 cores ~200


def cmd_doctor(args) -> int:
    import platform

    import mlx.core as mx
    from rich.console import Console

    from longctx import blas
    from longctx.bench import mlx_matmul_gflops
    console = Console()
    gflops = mlx_matmul_gflops()
    console.print(f"python {platform.python_version()} on {platform.platform()}")
    console.print(f"mlx {mx.__version__}: metal={mx.metal.is_available()} cuda={mx.cuda.is_available()}")
    console.print(f"BLAS mapped: {', '.join(blas.loaded_blas()) or 'none found'}")
    console.print(f"MLX float32 2048^3 matmul on the CPU: {gflops:.0f} GFLOP/s")
    if blas.has_fast_blas() and gflops >= SLOW_GFLOPS:
        console.print("[green]ok: an optimised BLAS is in use")
        return 0
    console.print(f"[red]slow: MLX is using its bundled reference BLAS. Fix: {blas.FIX}")
    return 1 if args.strict else 0


def cmd_stubs(args) -> int:
    from longctx.stubs import sync
    stale = sync(Path(args.root), check=args.check)
    if args.check and stale:
        print("stubs out of date (run `longctx stubs`): " + ", ".join(stale))
        return 1
    print(("stubs up to date" if args.check else "wrote " + (", ".join(stale) or "nothing (all up to date)")))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longctx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="benchmark the techniques against their baselines")
    p.add_argument("--lengths", type=_positive_ints, default=[1024, 2048, 4096], help="e.g. 2048,8192")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--backend", choices=["all", "mlx", "torch"], default="all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    p.add_argument("--ring", action="store_true",
                   help="also run Task 3 across real processes (mlx.launch / torchrun on this host)")
    p.add_argument("--ring-length", type=int, default=65536)
    p.add_argument("--ring-processes", type=int, default=4)
    p.add_argument("--stream-tokens", type=_positive_ints, default=[16384],
                   help="Task 5: tokens to stream through the tiny Qwen3, e.g. 65536,1048576")
    p.add_argument("--decode-context", type=int, default=16384,
                   help="Task 4: cached tokens for the compressed-vs-full decode rows (e.g. 131072)")
    p.set_defaults(run=cmd_bench)
    p = sub.add_parser("make-model", help="write a tiny seeded Qwen3 checkpoint (Hugging Face layout) to PATH")
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--untied", action="store_true", help="a separate lm_head instead of tied embeddings")
    p.set_defaults(run=cmd_make_model)
    p = sub.add_parser("doctor", help="check the set-up (BLAS speed, devices)")
    p.add_argument("--strict", action="store_true", help="exit 1 when MLX uses the slow BLAS")
    p.set_defaults(run=cmd_doctor)
    p = sub.add_parser("stubs", help="generate labs/ stubs from solutions/ (--check: verify only)")
    p.add_argument("--check", action="store_true")
    p.add_argument("--root", default=".", help="the repository root")
    p.set_defaults(run=cmd_stubs)
    args = parser.parse_args(argv)
    for name in ("window", "heads", "dim", "repeats", "ring_length", "ring_processes", "decode_context"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
