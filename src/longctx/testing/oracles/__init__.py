"""Float64 numpy oracles: slow and obviously right. The book quotes them.

One module per technique (``sliding.py``, ``memory.py``, ...), as
``longctx.techniques`` keeps one per technique; this package gathers their
public functions so tests write ``oracles.memory_attention(...)``. The exact
attention every oracle builds on is ``longctx.exact``'s.

Every attention oracle follows the contract: ``q (B, Hq, Lq, D)``, ``k, v (B,
Hkv, Lk, D)``, query ``i`` at absolute position ``Lk - Lq + i``, query head
``h`` reads kv head ``h // (Hq // Hkv)``, a row with no visible key is zeros.
"""
from __future__ import annotations

import importlib
import pkgutil

from longctx.exact import (attention, causal_mask, causal_rows, query_positions, relative_error,  # noqa: F401
                           sliding_mask, sliding_window_attention)


def _gather() -> list[str]:
    """Each module's own public functions, as names of this package (a name defined twice fails)."""
    names = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, value in vars(module).items():
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__:
                if name in names:
                    raise ImportError(f"oracle {name!r} is defined in {info.name} and elsewhere")
                globals()[name] = value
                names.append(name)
    return names


__all__ = _gather()
