"""The ``longctx`` command: ``bench`` (the main job), ``eval``, ``train-tiny``, ``extend``, ``train-memory``,
``serve``, ``serve-key``, ``make-model``, ``doctor``, ``stubs``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx.techniques.rope import ROPE_METHODS


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def _layer_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _names(text: str) -> list[str]:
    from longctx.techniques import TECHNIQUES
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in TECHNIQUES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"techniques must be among {', '.join(TECHNIQUES)}, got {text!r}")
    return names


def _model_path(text: str) -> Path:
    from longctx.models import TRAINED
    path = TRAINED if text == "shipped" else Path(text)
    if not (path / "config.json").exists():
        raise argparse.ArgumentTypeError(f"no config.json in {text!r}: give a Hugging Face model folder or 'shipped'")
    return path


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from longctx import bench
    from longctx.models import load_trained
    from longctx.techniques import STRATEGIES, TECHNIQUES
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not longctx.blas.has_fast_blas():
        console.print(f"[yellow]slow reference BLAS in use (see `longctx doctor`); fix: {longctx.blas.FIX}")
    backends = ("mlx", "torch") if args.backend == "all" else (args.backend,)
    names = args.techniques or [t for t in TECHNIQUES if not args.model or t in STRATEGIES]
    if args.model and set(names) - set(STRATEGIES):
        print(f"longctx bench: {', '.join(sorted(set(names) - set(STRATEGIES)))} has no model strategy; "
              "drop it from --techniques with --model", file=sys.stderr)
        return 2
    if args.scaling:
        return _scaling(args, console, backends)
    if args.backward:
        return _backward(args, console, backends)
    args.lengths = args.lengths or [1024, 2048, 4096]
    techniques = bench.techniques_for(names, args.window)
    shape = {} if args.model else {"heads": args.heads, "head_dim": args.dim}
    title = (f"passkey prompts through LongContextQwen3 in {args.model}" if args.model else
             f"random attention inputs, H={args.heads}, D={args.dim}, float32") + f", window {args.window}"
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(backends) * len(names) * len(args.lengths) + 2 + args.ring)
        matmul = bench.mlx_matmul_gflops()
        progress.advance(task)
        for backend in backends:
            model = load_trained(backend, args.model) if args.model else None
            kw = {"device": args.device} if backend == "torch" else {}
            if model and backend == "torch" and args.device:
                model = (model[0].to(args.device), model[1])
            rows += bench.run(backend, techniques, args.lengths, model=model, repeats=args.repeats, **shape, **kw,
                              progress=lambda r: progress.update(task, advance=1, description=f"{r.technique} "
                                                                                              f"L={r.length}"))
        ring = []
        if args.ring:
            progress.update(task, description=f"ring: {args.ring_processes} processes, L={args.ring_length}")
            ring = bench.ring_rows(backends[0], args.ring_processes, args.ring_length)
            progress.advance(task)
        progress.update(task, description=f"caches: stream {args.stream_tokens}, decode at {args.decode_context}")
        caches = [] if args.model else bench.cache_rows(args.stream_tokens, args.decode_context)
    config = {"title": title, "mlx_matmul_gflops": matmul, "lengths": args.lengths, "techniques": techniques,
              "model": str(args.model) if args.model else None, "repeats": args.repeats, **shape}
    path = bench.report(rows, config, Path(args.out), console, ring, caches)
    if args.log:
        from longctx import tracking
        run = tracking.log_run(args.log, "bench", config, tracking.bench_metrics(rows),
                               [path, path.with_suffix(".png")], Path(args.out))
        console.print(f"logged to {args.log}: {run}")
    return 0


def _backward(args, console, backends) -> int:
    """``longctx bench --backward``: forward and forward+backward per technique, both backends."""
    from rich.progress import Progress

    from longctx import bench
    if args.model:
        print("longctx bench: --backward times attention on random inputs; drop --model", file=sys.stderr)
        return 2
    lengths = args.lengths or [4096, 16384]
    from longctx.techniques import TECHNIQUES
    trainable = [n for n, t in TECHNIQUES.items() if t.attention or n == "full"]
    techniques = bench.techniques_for([n for n in args.techniques or trainable if n in trainable], args.window)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("backward", total=len(backends) * len(lengths) * len(techniques))
        for backend in backends:
            rows += bench.backward_rows(backend, techniques, lengths, heads=args.heads, head_dim=args.dim,
                                        repeats=args.repeats, device=args.device if backend == "torch" else None,
                                        progress=lambda r: progress.update(task, advance=1, description=(
                                            f"{r['technique']} L={r['length']}")))
    config = {"title": f"random attention inputs, H={args.heads}, D={args.dim}, float32, window {args.window}",
              "lengths": lengths, "techniques": techniques, "repeats": args.repeats}
    bench.report_backward(rows, config, Path(args.out), console)
    return 0


def _scaling(args, console, backends) -> int:
    """``longctx bench --scaling``: every sub-quadratic technique at L and 4L; exit 1 if one misses a goal."""
    from rich.progress import Progress

    from longctx import bench
    from longctx.techniques import SUBQUADRATIC
    if args.model:
        print("longctx bench: --scaling times attention on random inputs; drop --model", file=sys.stderr)
        return 2
    length = (args.lengths or [50_000])[0]
    techniques = bench.techniques_for(args.techniques or SUBQUADRATIC, args.window)
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("scaling", total=len(backends) * len(techniques) * 2)
        for backend in backends:
            kw = {"device": args.device} if backend == "torch" else {}
            rows += bench.scaling_rows(backend, techniques, length, heads=args.heads, head_dim=args.dim,
                                       repeats=args.repeats, **kw,
                                       progress=lambda r: progress.update(task, advance=1, description=(
                                           f"{r.technique} L={r.length}")))
    config = {"title": f"random attention inputs, H={args.heads}, D={args.dim}, float32, window {args.window}",
              "length": length, "techniques": techniques, "repeats": args.repeats}
    bench.report_scaling(rows, config, Path(args.out), console)
    return 0 if all(r["linear_time"] and r["flat_memory"] for r in rows if not r["skipped"]) else 1


def cmd_eval(args) -> int:
    from rich.console import Console

    from longctx import eval as suite
    console = Console(width=None if sys.stdout.isatty() else 160)
    out = Path(args.out)
    results = suite.run_suite(args.model, out, console, backend=args.backend, quick=args.quick,
                              compare=args.compare, memory_model=args.memory_model)
    if args.log:
        from longctx import tracking
        params = {"model": str(args.model), "backend": args.backend, "quick": args.quick,
                  "training_length": results["training_length"], "window": results["window"],
                  "trials": results["trials"]}
        run = tracking.log_run(args.log, "eval", params, tracking.eval_metrics(results),
                               [out / "eval.json", *sorted(out.glob("eval-*.png"))], out)
        console.print(f"logged to {args.log}: {run}")
    return 0


def cmd_train_tiny(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from longctx.models.train import copy_verdict, finetune, train, train_with_attention
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}  copy loss {task.fields[copy]:.3f}"), TimeElapsedColumn(),
               TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=None, loss=float("nan"), copy=float("nan"))

        def on_step(step, total, loss, copy):
            progress.update(task, completed=step, total=total, loss=loss, copy=copy)
        try:
            if args.option and not args.attention:
                raise ValueError("-o sets options of --attention: name the technique")
            if args.max_seconds is not None and not args.from_model:
                raise ValueError("--max-seconds stops a run continued with --from (equal-time comparisons)")
            if args.from_model and args.attention:  # long-context training of a model with a technique (Task 13)
                if args.rope_scaling:
                    raise ValueError("--from with --attention keeps the model's RoPE; drop --rope-scaling")
                path = train_with_attention(args.from_model, args.path, args.attention, dict(args.option),
                                            seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size,
                                            seed=args.seed, max_seconds=args.max_seconds,
                                            log=progress.console.print, on_step=on_step)
                from longctx.eval import technique_passkey
                technique_passkey(path, seed=args.seed, log=progress.console.print)
                record = json.loads((path / "finetune.json").read_text())
                console.print(f"wrote {path}: {record['steps']} steps in {record['seconds']} s "
                              f"({record['tokens_per_second']} tokens/s, peak {record['peak_memory_mb']} MB); "
                              "passkey " + ", ".join(f"{v:.0%} at {k}" for k, v in record["passkey"].items()))
                return 0
            if args.from_model:  # continue training at a new length with a scaled RoPE (Task 9)
                if not args.rope_scaling:
                    raise ValueError("--from needs --rope-scaling (a JSON rope_scaling dict); `longctx extend "
                                     "--finetune-steps N` writes the whole model folder")
                path = finetune(args.from_model, args.path, json.loads(args.rope_scaling), seq_len=args.seq_len,
                                steps=args.steps, batch_size=args.batch_size, seed=args.seed, log=progress.console.print,
                                max_seconds=args.max_seconds)
                console.print(f"wrote the weights to {path}")
                return 0
            path = train(args.path, steps=args.steps, short_steps=args.short_steps, batch_size=args.batch_size,
                         seq_len=args.seq_len, seed=args.seed, log=progress.console.print, on_step=on_step,
                         attention=args.attention, attention_options=dict(args.option))
        except ValueError as error:
            print(f"longctx train-tiny: {error}", file=sys.stderr)
            return 2
    if args.attention:  # the card scores with full attention (mlx_lm.load): it would not be this model's
        console.print(f"trained with {args.attention} attention (config.json: longctx_attention); no model card")
    else:
        from longctx.eval import model_card
        model_card(path)
    ok, verdict = copy_verdict(json.loads((path / "train.json").read_text())["copy_losses"][-1][1])
    console.print(("[green]" if ok else "[red]") + verdict)
    if args.attention:
        console.print(f"wrote {path}; run it under `longctx.mlx.nn.technique_attention(model, {args.attention!r}, "
                      "**options)` (config.json's longctx_attention)")
    else:
        console.print(f"wrote {path}; score it with `longctx eval --model {path}`")
    return 0 if ok else 1


def cmd_extend(args) -> int:
    from longctx.extend import extend
    try:
        path = extend(args.model, args.out, method=args.method, factor=args.factor, search=args.search,
                      finetune_steps=args.finetune_steps, backend=args.backend, population=args.population,
                      generations=args.generations, seed=args.seed)
    except ValueError as error:
        print(f"longctx extend: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}: mlx_lm.load({str(path)!r}) and AutoModelForCausalLM.from_pretrained({str(path)!r}) "
          f"read it; score it with `longctx eval --model {path}`")
    return 0


def cmd_train_memory(args) -> int:
    from longctx.models.train_memory import train_memory
    try:
        path = train_memory(args.base, args.out, memory_layers=args.memory_layers, steps=args.steps, docs=args.docs,
                            windows=args.windows, extra_contexts=args.extra_contexts,
                            context_length=args.context_length, last_context_length=args.last_context_length,
                            lr=args.lr, seed=args.seed, progress=sys.stdout.isatty())
    except ValueError as error:
        print(f"longctx train-memory: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} (its memory options in memory.json); score it with "
          f"`longctx eval --memory-model {path}`")
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


def _option(text: str) -> tuple[str, object]:
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. window_size=4096), got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a string, e.g. method=snapkv


def cmd_serve(args) -> int:
    try:
        from longctx.serve import serve
        from longctx.serve.app import Limits
    except ImportError as e:
        print(f"longctx serve needs the serve extra (pip install 'longctx[serve]'): {e}", file=sys.stderr)
        return 2
    limits = Limits(args.max_body_mb << 20, args.max_document_tokens, args.max_new_tokens, args.context_budget)
    if args.api_keys is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"longctx serve: refusing to listen on {args.host} without --api-keys (anyone could use it)",
              file=sys.stderr)
        return 2
    try:
        serve(args.model, strategy=args.strategy, options=dict(args.option), backend=args.backend, host=args.host,
              port=args.port, api_keys=args.api_keys, data=args.data, rate=args.rate, burst=args.burst,
              limits=limits)
    except ValueError as error:
        print(f"longctx serve: {error}", file=sys.stderr)
        return 2
    return 0


def cmd_serve_key(args) -> int:
    from longctx.serve.security import new_key
    key = new_key(args.file, args.name)
    print(f"added a key{' for ' + args.name if args.name else ''} to {args.file} (only its hash is stored); "
          f"send it as Authorization: Bearer KEY:\n{key}")
    return 0


SLOW_GFLOPS = 50  # 2 cores: the bundled reference BLAS gives 3-7, MKL's wheel 80-135, OpenBLAS 200-290


def kernel_states() -> list[tuple[str, str]]:
    """Each fused GPU kernel's state (``longctx.kernels``), after one small call where it can run
    (a check, unless this machine verified that configuration before)."""
    import mlx.core as mx
    import numpy as np

    from longctx import kernels
    from longctx.mlx import SlidingWindowAttention
    x = np.random.default_rng(0).standard_normal((1, 2, 100, 64)).astype(np.float32)
    states = []
    for backend, here in (("metal", mx.metal.is_available()), ("cuda", mx.cuda.is_available())):
        why = None if here else f"MLX has no {'Apple GPU (Metal)' if backend == 'metal' else 'CUDA backend'} here"
        if why is None:  # MLX's default device is then that GPU
            mx.eval(SlidingWindowAttention(32)(*[mx.array(x)] * 3))
        states.append((f"fused kernel {backend} ({kernels.KERNELS[backend]})", kernels.status(backend, why)))
    import torch
    why = None if torch.cuda.is_available() else "torch sees no CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        why = "triton is not installed"
    if why is None:
        from longctx.torch import SlidingWindowAttention as TorchSliding
        TorchSliding(32)(*[torch.from_numpy(x).cuda()] * 3)
    states.append((f"fused kernel triton ({kernels.KERNELS['triton']})", kernels.status("triton", why)))
    return states


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
    console.print(f"BLAS for MLX: {blas.describe()}")
    console.print(f"BLAS mapped: {', '.join(blas.loaded_blas()) or 'none found'}")
    console.print(f"MLX float32 2048^3 matmul on the CPU: {gflops:.0f} GFLOP/s")
    from longctx import native
    console.print(f"compiled CPU kernels (longctx.native): {native.status()}")
    for name, state in kernel_states():
        console.print(f"{name}: {state}")
    if blas.has_fast_blas() and gflops >= SLOW_GFLOPS:
        console.print("[green]ok: an optimised BLAS is in use")
        return 0
    console.print(f"[red]slow ({gflops:.0f} GFLOP/s < {SLOW_GFLOPS}): MLX is using its bundled reference BLAS. "
                  f"Fix: {blas.FIX}")
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
    from longctx.techniques import TECHNIQUES
    parser = argparse.ArgumentParser(prog="longctx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="Task 7: every technique against full attention, as a table, PNG and JSON")
    p.add_argument("--lengths", type=_positive_ints, default=None,
                   help="e.g. 50000,100000,200000 (default 1024,2048,4096; with --scaling, L for L and 4L: 50000)")
    p.add_argument("--techniques", type=_names, default=None,
                   help=f"comma-separated names from longctx.techniques: {','.join(TECHNIQUES)} (default: all)")
    p.add_argument("--window", type=int, default=256,
                   help="sliding window, streaming window, first LongNet segment (levels w, 4w, 16w)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--backend", choices=["all", "mlx", "torch"], default="all")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--model", type=_model_path, default=None,
                   help="a Hugging Face Qwen3 folder (or 'shipped'): time LongContextQwen3 strategies on passkey "
                        "prompts and score them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    p.add_argument("--log", choices=["mlflow", "tensorboard"], default=None,
                   help="also log the rows there (optional extras longctx[mlflow] / longctx[tensorboard])")
    p.add_argument("--scaling", action="store_true",
                   help="every sub-quadratic technique at L and 4L: time ratio (goal <= 4.4) and memory beyond "
                        "q, k, v and the output (goal: flat); exit 1 if one misses")
    p.add_argument("--backward", action="store_true",
                   help="training cost: forward and forward+backward time and peak memory per technique against "
                        "full attention's (default lengths 4096,16384)")
    p.add_argument("--ring", action="store_true",
                   help="also run Task 3 across real processes (mlx.launch / torchrun on this host)")
    p.add_argument("--ring-length", type=int, default=65536)
    p.add_argument("--ring-processes", type=int, default=4)
    p.add_argument("--stream-tokens", type=_positive_ints, default=[16384],
                   help="Task 5: tokens to stream through the tiny Qwen3, e.g. 65536,1048576")
    p.add_argument("--decode-context", type=int, default=16384,
                   help="Task 4: cached tokens for the compressed-vs-full decode rows (e.g. 131072)")
    p.set_defaults(run=cmd_bench)
    p = sub.add_parser("eval", help="the evaluation suite (passkey, needle grid, perplexity by position, copy, "
                                    "lost in the middle) for every strategy, with plots")
    p.add_argument("--model", type=_model_path, default="shipped", help="a Hugging Face Qwen3 folder or 'shipped'")
    p.add_argument("--backend", choices=["mlx", "torch"], default="mlx")
    p.add_argument("--out", default="eval-out", help="folder for eval.json and the plots")
    p.add_argument("--quick", action="store_true", help="fewer trials and lengths (a smoke run)")
    p.add_argument("--compare", type=_model_path, nargs="*", default=[],
                   help="more `longctx extend` folders for the position-extension table")
    p.add_argument("--memory-model", type=_model_path, default=None,
                   help="a `longctx train-memory` folder: its rows in the memory-layer table (Task 10)")
    p.add_argument("--log", choices=["mlflow", "tensorboard"], default=None,
                   help="also log a run there (optional extras longctx[mlflow] / longctx[tensorboard])")
    p.set_defaults(run=cmd_eval)
    p = sub.add_parser("train-tiny", help="train the small Qwen3 that ships with longctx (MLX, CPU)")
    p.add_argument("path")
    p.add_argument("--steps", type=int, default=1400, help="steps at --seq-len (the last stage)")
    p.add_argument("--short-steps", type=int, default=1800,
                   help="steps on the shorter rows of the curriculum (64 and 256 tokens), where the induction head forms")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from", dest="from_model", type=_model_path, default=None,
                   help="continue from this model folder ('shipped' too) at --seq-len, --steps steps: with "
                        "--rope-scaling (Task 9's short fine-tune) or with --attention (long-context training "
                        "with a technique; then passkey retrieval at --seq-len and twice it)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="with --from: stop at this wall time (to compare techniques at equal time)")
    p.add_argument("--rope-scaling", default=None, help='e.g. \'{"rope_type": "yarn", "factor": 4, '
                                                      '"original_max_position_embeddings": 512}\'')
    p.add_argument("--attention", default=None, metavar="TECHNIQUE",
                   help="train with this technique in place of full attention in every layer (e.g. sliding, "
                        "linear, longformer, bigbird; options with -o)")
    p.add_argument("-o", "--option", type=_option, action="append", default=[],
                   help="an option of --attention, NAME=VALUE (e.g. -o window_size=128); repeatable")
    p.set_defaults(run=cmd_train_tiny)
    p = sub.add_parser("extend", help="Task 9: a model folder with a scaled RoPE (PI, NTK, YaRN, Llama 3, LongRoPE), "
                                      "optionally searched and fine-tuned")
    p.add_argument("model", type=_model_path, help="a Hugging Face Qwen3 folder or 'shipped'")
    p.add_argument("out")
    p.add_argument("--method", choices=ROPE_METHODS, required=True)
    p.add_argument("--factor", type=float, required=True, help="the new length over the training length, e.g. 4")
    p.add_argument("--search", action="store_true", help="LongRoPE's evolutionary search (with --method longrope)")
    p.add_argument("--finetune-steps", type=int, default=0, help="then this many fine-tuning steps at the new length")
    p.add_argument("--backend", choices=["mlx", "torch"], default=None,
                   help="for the search (default: mlx on an Apple GPU, else torch)")
    p.add_argument("--population", type=int, default=32)
    p.add_argument("--generations", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_extend)
    p = sub.add_parser("train-memory", help="Task 10: Focused Transformer's crossbatch fine-tune of memory layers "
                                            "(MLX, CPU; resumable: run it again to continue)")
    p.add_argument("base", type=_model_path, help="a Hugging Face Qwen3 folder or 'shipped'")
    p.add_argument("out")
    p.add_argument("--memory-layers", type=_layer_ints, default=None, help="e.g. 1 or 0,1 (default: the last layer)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--docs", type=int, default=2, help="documents per batch")
    p.add_argument("--windows", type=int, default=4, help="windows of --context-length per document")
    p.add_argument("--extra-contexts", type=int, default=3, help="crossbatch: earlier batch entries each one sees")
    p.add_argument("--context-length", type=int, default=None, help="the local window (default: the model's)")
    p.add_argument("--last-context-length", type=int, default=256, help="a prompt's last tokens kept local")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_train_memory)
    p = sub.add_parser("serve", help="a long-document question-answering server (documents API, OpenAI chat) over "
                                     "LongContextQwen3: needs longctx[serve]")
    p.add_argument("model", nargs="?", type=_model_path, default="shipped",
                   help="a Hugging Face Qwen3 folder (default: 'shipped', the model longctx ships)")
    p.add_argument("--strategy", default="full", help="a LongContextQwen3 strategy (longctx.techniques)")
    p.add_argument("-o", "--option", type=_option, action="append", default=[],
                   help="a strategy option, NAME=VALUE (repeatable), e.g. -o window_size=4096")
    p.add_argument("--backend", choices=["mlx", "torch"], default="mlx")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", type=Path, default=None,
                   help="a file of keys, one a line (`longctx serve-key FILE` adds one); without it, no keys")
    p.add_argument("--data", type=Path, default=None, help="where documents and their caches persist (default: "
                                                          "memory only)")
    p.add_argument("--rate", type=float, default=60.0, help="requests a minute per key (token bucket)")
    p.add_argument("--burst", type=int, default=20, help="requests at once per key")
    p.add_argument("--max-body-mb", type=int, default=8)
    p.add_argument("--max-document-tokens", type=int, default=131072)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--context-budget", type=int, default=None,
                   help="chat: prompt + reply tokens (default: the model's max_position_embeddings)")
    p.set_defaults(run=cmd_serve)
    p = sub.add_parser("serve-key", help="add a new API key to a keys file (its hash), and print the key once")
    p.add_argument("file", type=Path)
    p.add_argument("--name", default="", help="a label for the key")
    p.set_defaults(run=cmd_serve_key)
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
    for name in ("window", "heads", "dim", "repeats", "ring_length", "ring_processes", "decode_context", "steps",
                 "short_steps", "batch_size", "seq_len", "port", "burst", "max_body_mb", "max_document_tokens",
                 "max_new_tokens", "context_budget"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
