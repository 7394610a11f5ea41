"""Exact inner-product search with faiss (``pip install 'longctx[memory]'``), for Task 10's
``retrieve(..., index="faiss")`` in both backends: NumPy in, NumPy out."""
from __future__ import annotations

import numpy as np

from longctx.checks import check_choice

INDEXES = ("exact", "faiss")


def check_index(index) -> str:
    check_choice("index", index, INDEXES)
    if index == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError as e:
            raise ValueError("index='faiss' needs faiss-cpu: pip install 'longctx[memory]'") from e
    return index


def faiss_search(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """``queries (B, H, N, D)``, ``keys (B, H, M, D)`` float32 -> int32 ``(B, H, N, k)``: for each
    (batch, head) a ``faiss.IndexFlatIP`` over its keys, searched with its queries (best first)."""
    import faiss
    B, H, N, D = queries.shape
    out = np.empty((B, H, N, k), dtype=np.int32)
    for b in range(B):
        for h in range(H):
            index = faiss.IndexFlatIP(D)
            index.add(np.ascontiguousarray(keys[b, h], dtype=np.float32))
            out[b, h] = index.search(np.ascontiguousarray(queries[b, h], dtype=np.float32), k)[1]
    return out
