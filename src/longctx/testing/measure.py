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


def mlx_seconds(fn: Callable, *, repeats: int = 5, warmup: int = 1) -> float:
    import mlx.core as mx
    return median_seconds(lambda: mx.eval(fn()), repeats=repeats, warmup=warmup)


def mlx_peak_bytes(fn: Callable) -> int:
    """Bytes MLX's allocator held at the peak of ``fn()``, above what was live before."""
    import mlx.core as mx
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn())
    return max(0, mx.get_peak_memory() - before)


def torch_seconds(fn: Callable, *, repeats: int = 5, warmup: int = 1) -> float:
    import torch

    def run():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return median_seconds(run, repeats=repeats, warmup=warmup)


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

