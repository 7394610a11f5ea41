"""Task 12, Longformer (a window plus global tokens): what is not array code."""
from __future__ import annotations

import numpy as np

from longctx.checks import check_positive_int
from longctx.techniques.base import BYTES, Technique, constant
from longctx.techniques.sliding import window_pairs


def check_global_tokens(global_tokens, length: int | None = None):
    """Sorted, de-duplicated global positions as an int numpy array: integers ``>= 0`` and, when
    ``length`` is given, ``< length``."""
    if isinstance(global_tokens, (str, bytes)) or not hasattr(global_tokens, "__iter__"):
        raise ValueError(f"global_tokens must be a sequence of positions, got {global_tokens!r}")
    values = [int(g) if isinstance(g, (int, np.integer)) and not isinstance(g, bool) else g for g in global_tokens]
    limit = "" if length is None else f" and < the length {length}"
    bad = [g for g in values if not isinstance(g, int) or g < 0 or (length is not None and g >= length)]
    if bad:
        raise ValueError(f"global_tokens must be integer positions >= 0{limit}, got {bad[0]!r}")
    return np.unique(np.array(values, dtype=np.int64))


def check_longformer(window, global_tokens, causal, Lq: int, Lk: int, global_qkv, qkv):
    """``longformer_attention``'s arguments: returns the global positions (see ``check_global_tokens``)."""
    window = check_positive_int("window", window)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if not causal and window % 2:
        raise ValueError(f"window must be even for bidirectional Longformer (window / 2 keys each side), got {window}")
    if not causal and Lq != Lk:
        raise ValueError(f"bidirectional Longformer is self-attention: Lq must equal Lk, got {Lq} and {Lk}")
    if global_qkv is not None:
        if not isinstance(global_qkv, (tuple, list)) or len(global_qkv) != 3 or any(
                tuple(g.shape) != tuple(x.shape) or g.dtype != x.dtype for g, x in zip(global_qkv, qkv)):
            raise ValueError("global_qkv must be (q, k, v) with the shapes and dtype of q, k, v")
    return check_global_tokens(global_tokens, Lk)


def memory(L, H, D, o, backend):
    ncol = constant(backend, "sparse", "BLOCK") + o["window"]  # a query block's band keys
    return 8 * min(constant(backend, "sparse", "TILE"), H * L * ncol) * BYTES  # tiles of scores, weights, band keys; the output in place


def pairs(L: int, o: dict) -> float:
    """Visible (query, key) pairs of causal Longformer: a local row its window plus the global
    keys before it, a global row its whole past."""
    w = o["window"]
    glob = sorted({g for g in o["global_tokens"] if g < L})
    total = window_pairs(L, {"window_size": w})
    for g in glob:
        total += (g + 1) - min(g + 1, w)  # g's own row: the whole past
        total += max(0, L - g - w) - sum(1 for h in glob if h >= g + w)  # local rows p >= g + w see g too
    return total


TECHNIQUE = Technique(
    "longformer", 12, "Longformer: a causal window plus global tokens every query sees",
    {"window": 512, "global_tokens": (0,), "causal": True}, memory, lambda L, H, D, o: 4.0 * H * D * pairs(L, o),
    attention="LongformerAttention", from_window=lambda w: {"window": w})
