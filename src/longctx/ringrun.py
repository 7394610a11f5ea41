"""One rank of a real ring: run it under a launcher, one process per rank.

    mlx.launch --backend ring -n 4 -- python -m longctx.ringrun --length 4096 --out runs/
    torchrun --standalone --nproc-per-node 4 -m longctx.ringrun --backend torch --out runs/

(``launch_command`` builds these command lines; ``longctx bench --ring`` runs them.) Every rank makes the same
seeded full ``q, k, v``, keeps its shard, calls ``ring_attention_distributed``
and writes ``rank<r>.json``: its error against the float64 oracle on its own
positions (``--check``), its peak memory, its time per ring step and its
causal work (the (query, key) pairs it scores). ``--backward`` also takes the
gradient of a seeded weighted sum of the output (the backward ring passes dK, dV
on) and, with ``--check``, its error against float64 autograd on the rank's rows. ``--module`` grades a
learner's ``ring.py`` instead of the reference; ``--fault`` makes one rank die
or go silent, to show that the others raise instead of hanging.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx import exact


def load_ring(backend: str, module: str | None):
    if module:
        spec = importlib.util.spec_from_file_location("longctx_graded_ring", module)
        ring = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ring)
        return ring
    if backend == "mlx":
        from longctx.mlx import ring
    else:
        from longctx.torch import ring
    return ring


def shard_positions(rank: int, size: int, length: int, layout: str) -> np.ndarray:
    """The absolute positions rank ``rank`` holds (independent of the code under test)."""
    if layout == "contiguous":
        n = length // size
        return np.arange(rank * n, (rank + 1) * n)
    n = length // (2 * size)
    other = 2 * size - 1 - rank
    return np.concatenate([np.arange(rank * n, (rank + 1) * n), np.arange(other * n, (other + 1) * n)])


def causal_work(rank: int, size: int, length: int, layout: str, causal: bool) -> int:
    """(query, key) pairs this rank's queries may see: the work a perfect rank cannot skip."""
    p = shard_positions(rank, size, length, layout)
    return int((p + 1).sum()) if causal else len(p) * length


def free_ports(count: int) -> int:
    """A port ``p`` with ``p .. p + count - 1`` all free (MLX's ring backend listens on each)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        try:
            for port in range(start, start + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports found on 127.0.0.1")


def launch_command(backend: str, processes: int, args: list[str]) -> list[str]:
    """The launcher command line that runs this module on ``processes`` local ranks."""
    if backend == "mlx":
        launcher = Path(sys.executable).parent / "mlx.launch"
        launcher = str(launcher) if launcher.exists() else shutil.which("mlx.launch")
        if launcher is None:
            raise RuntimeError("mlx.launch is not installed (it comes with the mlx package)")
        # The ring backend listens on port, port + 1, ...: start on a free one.
        return [launcher, "--backend", "ring", "-n", str(processes), "-p", str(free_ports(processes)), "--",
                sys.executable, "-m", "longctx.ringrun", "--backend", "mlx", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "longctx.ringrun", "--backend", "torch", *args]


def run_ring(backend: str, processes: int, *args: str, timeout: float = 300) -> tuple[list[dict], str]:
    """Launch ``processes`` ranks on this host; return every rank's report and the launcher's output.

    Ranks that the launcher killed before they reported are missing from the list.
    """
    for attempt in range(3):  # a port taken between choosing and binding it: launch again
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run(launch_command(backend, processes, [*args, "--out", out]),
                                  capture_output=True, text=True, timeout=timeout)
            reports = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
        if reports or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    return sorted(reports, key=lambda r: r["rank"]), proc.stdout + proc.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longctx.ringrun", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["mlx", "torch"], default="mlx")
    parser.add_argument("--module", default=None, help="a ring.py to run instead of the reference")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--layout", choices=["contiguous", "zigzag"], default="contiguous")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--check", action="store_true", help="compare with the float64 oracle")
    parser.add_argument("--backward", action="store_true", help="also the gradients of q, k, v (timed; checked)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--fault", choices=["die", "silent"], default=None)
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--out", required=True, help="folder for rank<r>.json")
    args = parser.parse_args(argv)

    ring = load_ring(args.backend, args.module)
    if args.backend == "mlx":
        import mlx.core as mx
        group = mx.distributed.init()
        rank, size = group.rank(), group.size()
        to_array, to_numpy = mx.array, lambda x: np.array(x.astype(mx.float32))
    else:
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo")
        group, rank, size = None, dist.get_rank(), dist.get_world_size()
        to_array, to_numpy = torch.from_numpy, lambda x: x.float().numpy()

    rng = np.random.default_rng(0)
    L = args.length
    q = rng.standard_normal((1, args.heads, L, args.dim)).astype(np.float32)
    k, v = (rng.standard_normal((1, args.kv_heads, L, args.dim)).astype(np.float32) for _ in range(2))
    pos = shard_positions(rank, size, L, args.layout)
    record = {"rank": rank, "size": size, "layout": args.layout, "causal": args.causal, "length": L,
              "work_pairs": causal_work(rank, size, L, args.layout, args.causal)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.fault and rank == args.fault_rank:
        if args.fault == "die":
            os._exit(0)  # abruptly, but with status 0: launchers kill the job on a non-zero one
        time.sleep(args.timeout * 3)  # silent: alive, never sends
        os._exit(0)
    try:
        local = [to_array(np.ascontiguousarray(x[:, :, pos])) for x in (q, k, v)]
        if args.backend == "mlx":
            mx.eval(local)
            mx.reset_peak_memory()
            base = mx.get_active_memory()
        start = time.perf_counter()
        out = ring.ring_attention_distributed(*local, group, causal=args.causal, layout=args.layout,
                                              block_size=args.block_size, timeout=args.timeout)
        if args.backend == "mlx":
            mx.eval(out)
            record["peak_bytes"] = mx.get_peak_memory() - base
        record["seconds"] = time.perf_counter() - start
        record["seconds_per_step"] = record["seconds"] / size
        if args.check:
            mask = exact.causal_mask(L, L)[pos] if args.causal else None
            want = exact.attention(q[:, :, pos], k, v, mask)
            got = to_numpy(out)
            record["shape_ok"] = got.shape == want.shape
            record["max_error"] = float(np.abs(got - want).max()) if got.shape == want.shape else None
        if args.backward:
            w = rng.standard_normal(q.shape).astype(np.float32)  # the loss: sum(out * w) over the whole sequence
            start = time.perf_counter()
            grads = _ring_grads(ring, args, local, to_array(np.ascontiguousarray(w[:, :, pos])), group)
            record["backward_seconds"] = time.perf_counter() - start
            if args.check:
                counts = exact.causal_mask(L, L) if args.causal else np.ones((L, L))
                want = [g[:, :, pos] for g in exact.reference_grads(exact.weighted(counts), q, k, v, w)]
                scale = max(float(np.abs(g).max()) for g in want)
                record["grad_errors"] = [float(np.abs(to_numpy(g) - x).max()) / scale for g, x in zip(grads, want)]
    except Exception as error:  # noqa: BLE001 -- the report is the point
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    # A peer that died leaves the transport in a state its destructors may wait on: leave now. Status 0
    # even after an error (it is in the report): launchers kill every rank when one exits non-zero, and
    # the neighbours of a dead rank must live to report it.
    os._exit(0)


def _ring_grads(ring, args, local, w, group):
    """This rank's ``dq, dk, dv`` of ``sum(out * w)``: every rank's loss term, summed by the ring."""
    options = dict(causal=args.causal, layout=args.layout, block_size=args.block_size, timeout=args.timeout)
    if args.backend == "mlx":
        import mlx.core as mx
        grads = mx.vjp(lambda q, k, v: ring.ring_attention_distributed(q, k, v, group, **options), local, [w])[1]
        mx.eval(grads)
        return grads
    local = [x.clone().requires_grad_(True) for x in local]
    ring.ring_attention_distributed(*local, group, **options).backward(w)
    return [x.grad for x in local]


if __name__ == "__main__":
    main()
