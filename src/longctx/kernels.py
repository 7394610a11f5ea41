"""Fused kernels that check themselves on the hardware they meet.

The fused sliding-window kernels (Metal and CUDA through MLX, Triton through
torch) run on GPUs the project's CI never has. So each checks itself: the
first time a process uses a configuration (dtype, head dim, window class) that
has not been verified on this machine, the kernel and its ops-path twin run on
a small input and are compared. Agreement is recorded (in memory, and on disk
under the cache folder, keyed by the kernel's source, the library's version
and the device), so later processes skip the check. A mismatch, or a compile
or launch error, gives one warning naming the kernel and the error, and the
ops path serves the rest of the process. ``longctx doctor`` prints each
kernel's state.

Backend-free: the callers hand over zero-argument functions that return numpy
arrays, so this file imports neither MLX nor torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from longctx.native import cache_dir

# What each kernel is, for messages and `longctx doctor`.
KERNELS = {
    "metal": "Task 1's fused sliding window on an Apple GPU (mx.fast.metal_kernel)",
    "cuda": "Task 1's fused sliding window on MLX's CUDA backend (mx.fast.cuda_kernel)",
    "triton": "Task 1's Triton sliding window in the torch mirror (CUDA)",
}
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}  # against the ops path, absolute and relative

_verified: dict[str, set] = {}  # kernel -> configurations checked in this process
_failed: dict[str, str] = {}  # kernel -> why the ops path answers for the rest of the process


def window_class(window: int) -> str:
    """Windows that take the same paths through a kernel: one key, a few tiles, many tiles."""
    return "1" if window == 1 else ("<=64" if window <= 64 else ">64")


def _record_path() -> Path:
    return cache_dir().parent / "kernels.json"  # beside the compiled CPU kernels: ~/.cache/longctx or $LONGCTX_CACHE


def _key(kernel: str, config: tuple, fingerprint: str) -> str:
    return hashlib.sha256(json.dumps([kernel, [str(c) for c in config], fingerprint]).encode()).hexdigest()[:24]


def _recorded() -> dict:
    try:
        return json.loads(_record_path().read_text())
    except (OSError, ValueError):
        return {}


def _record(key: str, text: str) -> None:
    """Add one verified configuration to the machine's record (atomically: a reader never sees half)."""
    try:
        path = _record_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {**_recorded(), key: text}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(record, f, indent=1)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only home: the check simply runs again in the next process


def usable(kernel: str) -> bool:
    """False once the kernel has failed in this process."""
    return kernel not in _failed


def check(kernel: str, config: tuple, fingerprint: Callable[[], str],
          run: Callable[[], tuple[np.ndarray, np.ndarray]], dtype: str) -> bool:
    """Whether ``kernel`` may serve ``config``: verified before (in this process, or on this
    machine for this ``fingerprint()``: the kernel's source, library version, device), or now,
    by ``run()``: the kernel's and the ops path's outputs on one small input, as numpy arrays.
    On a mismatch or an exception: one warning, and False for this and every later
    configuration of this kernel in the process. Cheap once verified: nothing is called."""
    if kernel in _failed:
        return False
    done = _verified.setdefault(kernel, set())
    if config in done:
        return True
    key = _key(kernel, config, fingerprint())
    if key in _recorded():
        done.add(config)
        return True
    try:
        got, want = (np.asarray(x, dtype=np.float64) for x in run())
        tol = TOLERANCE.get(dtype, 1e-4)
        if got.shape != want.shape or not np.allclose(got, want, rtol=tol, atol=tol):
            error = (f"shape {got.shape} vs {want.shape}" if got.shape != want.shape else
                     f"max abs error {np.nanmax(np.abs(got - want)):.3g} > {tol:g}")
            raise ArithmeticError(f"disagrees with the ops path on a check input: {error}")
    except NotImplementedError:
        raise  # a kernel not written yet (the stretch exercise): the caller takes the ops path quietly
    except Exception as error:  # noqa: BLE001 -- any failure (compile, launch, wrong numbers): the ops path
        fail(kernel, config, error)
        return False
    done.add(config)
    _record(key, f"{kernel}: {', '.join(map(str, config))}")
    return True


def fail(kernel: str, config: tuple, error: BaseException) -> None:
    """The kernel failed (its check, or a later compile or launch): warn once; the ops path from now on."""
    _failed[kernel] = f"{type(error).__name__}: {error}".splitlines()[0]
    warnings.warn(f"longctx: the {kernel} kernel ({KERNELS.get(kernel, kernel)}; {', '.join(map(str, config))}) "
                  f"failed ({_failed[kernel]}); using the ops path for the rest of this process", RuntimeWarning,
                  stacklevel=4)


def status(kernel: str, available: str | None) -> str:
    """One line for ``longctx doctor``: ``available`` is None when the kernel can run here, else why not."""
    if available is not None:
        return f"not available: {available}"
    if kernel in _failed:
        return f"fell back to the ops path: {_failed[kernel]}"
    done = sorted(", ".join(map(str, c)) for c in _verified.get(kernel, ()))
    return "verified here: " + "; ".join(done) if done else "available, not checked yet in this process"
