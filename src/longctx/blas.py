"""Make MLX's CPU matmuls fast on Linux, from pip alone.

The ``mlx[cpu]`` wheel links a bundled reference (netlib) BLAS: 3-7 GFLOP/s
for a float32 2048^3 matmul on a 2-core x86 machine. Loading an optimised
BLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported puts its
``cblas_*`` symbols first in the global lookup scope, so MLX's calls resolve
to it: the effect of ``LD_PRELOAD``, from inside the process. ``import
longctx`` does this with the first of:

1. Debian's OpenBLAS (``apt-get install libopenblas0-pthread``), the fastest
   measured (200-290 GFLOP/s on 2 cores);
2. Intel's MKL runtime from the ``mkl`` wheel, a dependency of longctx on
   Linux x86-64, so a plain ``pip install`` is fast (80-135 GFLOP/s measured
   on 2 cores; it exports unprefixed ``cblas_sgemm``).

numpy's and torch's own BLAS cannot serve: their symbols are renamed
(``scipy_cblas_sgemm``) or hidden. ``LONGCTX_BLAS=bundled|openblas|mkl``
chooses (``bundled`` turns the preload off); ``longctx doctor`` reports which
BLAS MLX uses and its GFLOP/s.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)
CHOICES = ("openblas", "mkl", "bundled")
FIX = ("`pip install mkl` (Linux x86-64; longctx depends on it there) or, faster, "
       "`apt-get install libopenblas0-pthread`; then `import longctx` before mlx")
FAST_MARKERS = ("openblas", "mkl", "blis", "accelerate")

LOADED: str | None = None  # the library preload_fast_blas loaded, if any


def mkl_candidates() -> list[str]:
    """``libmkl_rt.so.*`` from the installed ``mkl`` wheel (it lands in ``<prefix>/lib``)."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(str(f.locate().resolve()) for f in files if f.name.startswith("libmkl_rt.so"))


def candidates(choice: str | None = None) -> list[str]:
    """Existing libraries to try, fastest first, for ``LONGCTX_BLAS=choice`` (None: any)."""
    if choice is not None and choice not in CHOICES:
        raise ValueError(f"LONGCTX_BLAS must be one of {', '.join(CHOICES)}, got {choice!r}")
    found = {"openblas": [p for p in OPENBLAS_CANDIDATES if os.path.exists(p)], "mkl": mkl_candidates(),
             "bundled": []}
    return found[choice] if choice else found["openblas"] + found["mkl"]


def preload_fast_blas() -> str | None:
    """Load the fastest BLAS found globally before MLX is imported; returns its path or None.

    Does nothing off Linux (macOS MLX uses Accelerate), when ``LONGCTX_BLAS=bundled``,
    or once ``mlx.core`` is already imported (too late to take effect).
    """
    global LOADED
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules or LOADED:
        return LOADED
    for path in candidates(os.environ.get("LONGCTX_BLAS") or None):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue  # a broken install: try the next, doctor reports the speed
        LOADED = path
        return path
    return None


def share_with_torch() -> None:
    """Make a preloaded OpenBLAS safe for torch in the same process: one thread.

    The preload puts OpenBLAS's Fortran symbols (``sgemm_``...) first in the
    global scope, so torch binds its own BLAS calls to them too (``LD_DEBUG=bindings``
    shows it). torch calls them from inside its OpenMP parallel regions, and a
    multi-threaded OpenBLAS there fights torch's threads for the cores: measured
    on 2 cores, the torch sliding mirror at 1k tokens took 527 ms instead of 19
    and causal SDPA 40 ms instead of 16. With one OpenBLAS thread both are back
    (20 and 17 ms); a float32 2048^3 matmul then runs at 78-85 GFLOP/s in MLX and
    torch instead of 128-144 (MKL, which torch's own builds use, cooperates with
    OpenMP; ``LONGCTX_BLAS=mkl`` chooses it). ``longctx.torch`` calls this on import.
    """
    if LOADED is None or "mkl" in LOADED.lower():
        return
    try:
        ctypes.CDLL(LOADED).openblas_set_num_threads(1)
    except (OSError, AttributeError):  # not an OpenBLAS after all: nothing to share
        pass


def loaded_blas() -> list[str]:
    """Shared libraries named like a BLAS mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            names = {line.split()[-1] for line in maps if "blas" in line.lower() or "mkl_rt" in line.lower()}
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("/"))


def kind() -> str:
    """The BLAS MLX's CPU matmuls resolve to, in a word: Accelerate, OpenBLAS, MKL or bundled."""
    if sys.platform == "darwin":
        return "Accelerate"
    if LOADED is None:
        return "bundled"
    return "MKL" if "mkl" in LOADED.lower() else "OpenBLAS"


def describe() -> str:
    """One line: which BLAS MLX's CPU matmuls resolve to."""
    return {"Accelerate": "Accelerate (macOS)",
            "bundled": "MLX's bundled reference BLAS (nothing faster found or LONGCTX_BLAS=bundled)",
            "MKL": f"MKL (pip wheel `mkl`): {LOADED}", "OpenBLAS": f"OpenBLAS (system): {LOADED}"}[kind()]


def has_fast_blas() -> bool:
    """True on macOS (Accelerate) or when a known optimised BLAS is mapped."""
    if sys.platform == "darwin":
        return True
    # numpy's wheel maps its own scipy_openblas with prefixed symbols: MLX cannot use it.
    return any(m in path.lower() for path in loaded_blas() if "scipy_openblas" not in path
               for m in FAST_MARKERS)
