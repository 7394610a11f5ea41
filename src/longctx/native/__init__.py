"""Compiled CPU kernels for the MLX references, built on first use against the installed MLX.

``sliding_window`` is Task 1's sliding-window attention as an MLX primitive
(``sliding.cpp``): the ops version in ``solutions/week3/sliding.py`` is the book's
code and the fallback; this is the same loop, fused and vectorised in C++.

Why built here and not by ``pip install``: an MLX extension links ``libmlx`` and
shares nanobind's type registry with ``mlx.core``, so it must be compiled against
the very MLX it runs with. A wheel built at install time (in pip's isolated
build environment, with whatever MLX PyPI has that day) breaks silently on the
next ``pip install -U mlx``; a build keyed by the installed MLX's version, the
nanobind version, the source and the CPU is rebuilt exactly when one of them
changes (as ``torch.utils.cpp_extension.load`` does). It takes 10-20 s on
2 cores, once, and needs a C++20 compiler (``c++``, or ``$CXX``).

If anything fails (no compiler, an MLX built with another nanobind ABI, a GPU
stream), callers get ``None`` and use the ops path; the reason is in
``status()`` and ``longctx doctor``, and one warning says so.
``LONGCTX_NATIVE=0`` turns the kernels off (the graded labs' planted-bug checks
use it to judge the ops code).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("sliding.cpp")
_REASON: list[str] = []  # why the kernels are not available, once known


def cache_dir() -> Path:
    base = os.environ.get("LONGCTX_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                           "longctx")
    return Path(base) / "native"


def _cpu_tag() -> str:
    """The instruction sets the build may use (it compiles with ``-march=native``)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


def _build_key() -> str:
    import mlx.core as mx
    import nanobind
    parts = [SOURCE.read_bytes(), mx.__version__.encode(), nanobind.__version__.encode(),
             sysconfig.get_config_var("EXT_SUFFIX").encode(), _cpu_tag().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _compile(target: Path) -> None:
    """Compile ``sliding.cpp`` and nanobind's runtime into ``target`` (what ``nanobind_add_module``
    with ``NB_STATIC`` and ``NB_DOMAIN mlx`` does in CMake: same domain as ``mlx.core``)."""
    import mlx
    import nanobind
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ / Xcode's command-line tools)")
    mlx_dir = Path(mlx.__path__[0])
    nb_dir = Path(nanobind.include_dir()).parent
    flags = ["-std=c++20", "-O3", "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native",
             "-fPIC", "-fvisibility=hidden", "-DNDEBUG", "-DNB_COMPACT_ASSERTIONS", "-DNB_DOMAIN=mlx",
             f"-I{nb_dir / 'include'}", f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}",
             f"-I{sysconfig.get_paths()['include']}", f"-I{mlx_dir / 'include'}"]
    with tempfile.TemporaryDirectory() as tmp:
        objects, jobs = [], []
        for src in (SOURCE, nb_dir / "src" / "nb_combined.cpp"):  # two compilers, in parallel
            obj = Path(tmp) / (src.stem + ".o")
            objects.append(str(obj))
            jobs.append(subprocess.Popen([cxx, *flags, "-c", str(src), "-o", str(obj)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for job in jobs:
            out = job.communicate()[0]
            if job.returncode:
                raise RuntimeError(f"{' '.join(job.args[:1] + job.args[-3:])} failed:\n{out[-3000:]}")
        link = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
        partial = Path(tmp) / target.name
        run = subprocess.run([cxx, "-shared", *objects, "-o", str(partial), f"-L{mlx_dir / 'lib'}", "-lmlx",
                              f"-Wl,-rpath,{mlx_dir / 'lib'}", *link], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"linking failed:\n{run.stderr[-3000:]}")
        os.replace(partial, target)  # atomic: another process never loads half a file


@functools.cache
def _module():
    """The compiled module, building it if needed; None (with the reason in ``status()``) if it
    cannot be had."""
    if os.environ.get("LONGCTX_NATIVE", "1") == "0":
        _REASON.append("turned off by LONGCTX_NATIVE=0")
        return None
    try:
        import fcntl  # POSIX; elsewhere the ops path
        folder = cache_dir() / _build_key()
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"_sliding{sysconfig.get_config_var('EXT_SUFFIX')}"
        with open(folder / "lock", "w") as lock:  # one build, however many processes ask at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                _compile(target)
        spec = importlib.util.spec_from_file_location("longctx.native._sliding", target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _smoke_test(module)
        return module
    except Exception as error:  # noqa: BLE001 -- any failure means: the ops path
        _REASON.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"longctx: the compiled CPU kernels are unavailable ({_REASON[-1].splitlines()[0]}); "
                      "using the ops path. `longctx doctor` says more.", RuntimeWarning, stacklevel=3)
        return None


def _smoke_test(module) -> None:
    """One tiny call, checked against the definition: a module built against another MLX or
    nanobind ABI would reject ``mx.array`` or return garbage."""
    import mlx.core as mx
    import numpy as np

    from longctx.exact import sliding_window_attention
    q = np.linspace(-1, 1, 2 * 3 * 5, dtype=np.float32).reshape(1, 2, 3, 5)
    out = np.array(module.sliding_window(*[mx.array(q)] * 3, 2, 1.0))
    if not np.allclose(out, sliding_window_attention(q, q, q, 2, scale=1.0), rtol=1e-5, atol=1e-6):
        raise RuntimeError("the compiled kernel disagrees with the definition on a 3-token check")


def sliding_window(q, k, v, window: int, scale: float):
    """Sliding-window attention on MLX's CPU stream (checked arguments: ``q (B, Hq, Lq, D)``,
    ``k, v (B, Hkv, Lk, D)``, one float dtype), or None where the compiled kernel is not
    available: the caller then runs the ops version."""
    import mlx.core as mx
    if mx.default_device() != mx.cpu or not (q.dtype == k.dtype == v.dtype):
        return None
    if q.dtype not in (mx.float32, mx.float16, mx.bfloat16):  # the kernel's dtypes; float64: the ops path
        return None
    module = _module()
    return None if module is None else module.sliding_window(q, k, v, int(window), float(scale))


def available() -> bool:
    """Whether the compiled kernels run here (building them on the first call)."""
    return _module() is not None


def status() -> str:
    """One line for ``longctx doctor``: built (and where), or why not."""
    module = _module()
    return f"built: {module.__file__}" if module is not None else f"not available: {_REASON[-1]}"
