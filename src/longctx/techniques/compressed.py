"""Task 4, a KV cache compressed by importance: what is not array code."""
from __future__ import annotations

import numbers

from longctx.techniques.base import BYTES, Technique

COMPRESSION_METHODS = ("h2o", "snapkv", "knorm", "streaming")
NEEDS_ATTENTION = ("h2o", "snapkv")  # the methods whose scores need the queries' attention


def n_kept(length: int, compression_ratio: float) -> int:
    """How many of ``length`` entries survive (kvpress's ``compute_n_kept``)."""
    return max(1, int(length * (1 - compression_ratio)))


def check_ratio(compression_ratio) -> float:
    """A compression ratio (the fraction removed, as in kvpress): a number in ``[0, 1)``."""
    if (isinstance(compression_ratio, bool) or not isinstance(compression_ratio, numbers.Real)
            or not 0 <= compression_ratio < 1):
        raise ValueError(f"compression_ratio must be a number in [0, 1), got {compression_ratio!r}")
    return float(compression_ratio)


def check_strategy(o: dict) -> None:
    if o["chunk_size"] < 2:
        raise ValueError(f"chunk_size must be >= 2 for 'compressed' (a lone token is a decode step), "
                         f"got {o['chunk_size']}")


def memory(L, H, D, o, backend):
    w = min(o["observation_window"], L)
    return (3 * H * w * L + 3 * H * L) * BYTES  # the window's scores, then the per-key scores


TECHNIQUE = Technique(
    "compressed", 4, "a KV cache compressed by importance (SnapKV, H2O, key norm, StreamingLLM)",
    {"compression_ratio": 0.9, "method": "snapkv", "observation_window": 32}, memory,
    strategy={"compression_ratio": 0.5, "method": "snapkv", "sink_tokens": 4, "recent_tokens": 32,
              "observation_window": 32, "pool_kernel": 5}, cache="QueryRecordingCache",
    validate=check_strategy, compress_after_prefill=True,
    evaluate=lambda w: {"compression_ratio": 0.75, "method": "snapkv"})
