"""Make MLX's CPU matmuls fast on Linux.

The ``mlx[cpu]`` wheel links a bundled reference (netlib) BLAS: about 5 GFLOP/s
for a float32 2048^3 matmul on a 2-core x86 machine, against ~290 with
OpenBLAS. Loading OpenBLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is
imported puts its ``cblas_*`` symbols first in the global lookup scope, so
MLX's calls resolve to it: the same effect as ``LD_PRELOAD``, from inside the
process. ``import longctx`` does this when it can; ``longctx doctor`` reports
what was loaded and the one-line fix when nothing fast is.
"""
from __future__ import annotations

import ctypes
import os
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)
FIX = ("apt-get install libopenblas0-pthread  "
       "(then `import longctx` before mlx, or export LD_PRELOAD=<that libblas.so.3>)")
FAST_MARKERS = ("openblas", "mkl", "blis", "accelerate")


def preload_fast_blas() -> str | None:
    """Load OpenBLAS globally before MLX is imported; returns its path or None.

    Does nothing off Linux (macOS MLX uses Accelerate), when ``LONGCTX_BLAS=bundled``,
    or once ``mlx.core`` is already imported (too late to take effect).
    """
    if not sys.platform.startswith("linux") or os.environ.get("LONGCTX_BLAS") == "bundled":
        return None
    if "mlx.core" in sys.modules:
        return None
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
    return None


def loaded_blas() -> list[str]:
    """Shared libraries named like a BLAS mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            names = {line.split()[-1] for line in maps if "blas" in line.lower()}
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("/"))


def has_fast_blas() -> bool:
    """True on macOS (Accelerate) or when a known optimised BLAS is mapped."""
    if sys.platform == "darwin":
        return True
    # numpy's wheel maps its own scipy_openblas with prefixed symbols: MLX cannot use it.
    return any(m in path.lower() for path in loaded_blas() if "scipy_openblas" not in path
               for m in FAST_MARKERS)
