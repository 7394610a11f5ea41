"""longctx.mlx: the MLX reference (this folder, solutions/week3, installed as longctx.mlx).

Names load on first use (PEP 562), so ``longctx.mlx.adaptive``, which is text
code with no arrays, imports without MLX: the torch mirror reuses it. Which
module defines a name is the registry's (``Task.exports`` in
``longctx.techniques``).
"""
import importlib
import sys

from longctx.techniques import public_names

__all__ = sorted(public_names())  # (a lab registered later is in dir() and loads, though not in __all__)


def lazy_names(package: str):
    """``__getattr__`` and ``__dir__`` for a package whose public names are the registry's
    (``public_names()``: each lab's ``Task.exports``), each loaded from the package's module of
    that name on first use (``longctx.torch`` too)."""
    def __getattr__(name: str):
        where = public_names()
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value
    return __getattr__, lambda: sorted(public_names())


__getattr__, __dir__ = lazy_names(__name__)
