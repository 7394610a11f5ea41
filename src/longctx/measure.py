"""Measuring time and peak memory, the same way everywhere (tests, bench, book).

MLX is lazy: ``mx.eval`` must sit inside the timed region, or the clock stops
before any work is done. CUDA is asynchronous: synchronise before reading the
clock. Peak memory is what a call adds on top of what was alive before it.
"""
from __future__ import annotations

import statistics
import time
import weakref
from typing import Callable


def median_seconds(run: Callable[[], None], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``run()`` (which must block until its work is done)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(*runs: Callable[[], None], rounds: int = 5, warmup: int = 1) -> list[float]:
    """The fastest wall time of each ``run()`` (each must block until its work is done), timed in
    turn ``a, b, a, b, ...``: for comparing speeds on a machine that is never idle. Another
    process slows whichever run it overlaps; taken in turns, each run meets the same load, and
    the minimum is the time the work needs when the machine lets it (a median keeps the load)."""
    for run in runs * warmup:
        run()
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def mlx_seconds(fn: Callable, *, repeats: int = 5, warmup: int = 1) -> float:
    return median_seconds(mlx_blocking(fn), repeats=repeats, warmup=warmup)


def mlx_peak_bytes(fn: Callable) -> int:
    """Bytes MLX's allocator held at the peak of ``fn()``, above what was live before."""
    import mlx.core as mx
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn())
    return max(0, mx.get_peak_memory() - before)


def mlx_blocking(fn: Callable) -> Callable[[], None]:
    """``fn`` evaluated: MLX is lazy, so the work happens inside the call."""
    import mlx.core as mx
    return lambda: mx.eval(fn())


def torch_blocking(fn: Callable) -> Callable[[], None]:
    """``fn`` synchronised: CUDA is asynchronous, so the work is done when the call returns."""
    import torch

    def run():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return run


def torch_seconds(fn: Callable, *, repeats: int = 5, warmup: int = 1) -> float:
    return median_seconds(torch_blocking(fn), repeats=repeats, warmup=warmup)


def torch_peak_bytes(fn: Callable, device="cpu") -> int:
    """Peak bytes of tensors ``fn()`` allocates. CUDA: the caching allocator's
    counter. CPU (which has none): a dispatch mode that adds every new
    storage's size and subtracts it when the storage is freed."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)
    with _live_storage_counter()() as counter:
        fn()
    return counter.peak


def _live_storage_counter():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveStorageBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def _free(self, key: int, nbytes: int) -> None:
            self.live -= nbytes
            self.seen.discard(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if hasattr(t, "untyped_storage")}
            for t in tree_flatten(out)[0]:
                if not hasattr(t, "untyped_storage"):
                    continue
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes == 0 or key in self.seen or key in inputs:
                    continue  # a view: of a storage already counted, or of one made before fn()
                self.seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
            return out

    return LiveStorageBytes

