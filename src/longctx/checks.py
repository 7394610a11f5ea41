"""Argument checks shared by every technique and backend (they only read ``.shape``).

A technique's own checks live in its module of ``longctx.techniques``.

Each raises ``ValueError`` naming the argument and the value received:
nothing is silently broadcast or clipped.
"""
from __future__ import annotations

import numbers


def check_positive_int(name: str, value) -> int:
    """``value`` must be an int >= 1 (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_scale(scale) -> float | None:
    """``scale`` is None (meaning ``D ** -0.5``) or a finite positive number."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    return float(scale)


def check_attention(q, k, v, *, queries_last: bool = True) -> tuple[int, int, int, int, int, int]:
    """Validate ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)``; return ``B, Hq, Hkv, Lq, Lk, D``.

    Queries are the last ``Lq`` positions of the ``Lk`` keys, so ``Lq <= Lk``
    (``queries_last=False``, for a ring step between two shards, drops that rule).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, L, D), got shape {tuple(x.shape)}")
        if 0 in tuple(x.shape):
            raise ValueError(f"{name} must not have an empty axis, got shape {tuple(x.shape)}")
    B, Hq, Lq, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k batch must equal q batch {B}, got k shape {tuple(k.shape)}")
    if Dk != D:
        raise ValueError(f"k head dim must equal q head dim {D}, got k shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads must be a multiple of kv heads, got Hq={Hq} and Hkv={Hkv}")
    if queries_last and Lq > Lk:
        raise ValueError(f"q length must be <= k length (queries are the last Lq positions), "
                         f"got Lq={Lq} and Lk={Lk}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, Hq, Hkv, Lq, Lk, D


def self_attention_inputs(q, k, v) -> tuple:
    """``(k, v)``: both given, or neither (then ``k = v = q``, self-attention of one sequence)."""
    if k is None and v is None:
        return q, q
    if k is None or v is None:
        raise ValueError(f"k and v must both be given, or neither (self-attention of q), got "
                         f"k={'None' if k is None else tuple(k.shape)} and v={'None' if v is None else tuple(v.shape)}")
    return k, v


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_tokens(tokens, vocab_size: int) -> list[int]:
    """Token ids in ``[0, vocab_size)``: a non-empty 1-D sequence, or a batch of one ``(1, L)`` as
    mlx-lm and transformers pass them (a list, or an array's ``tolist()``)."""
    ids = tokens.tolist() if hasattr(tokens, "tolist") else tokens
    if isinstance(ids, (list, tuple)) and len(ids) == 1 and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    if (not isinstance(ids, (list, tuple)) or not ids
            or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab_size
                       for t in ids)):
        raise ValueError(f"tokens must be a non-empty 1-D sequence of ids in [0, {vocab_size}) (or one row of "
                         f"them, (1, L)), got {tokens!r:.80}")
    return [int(t) for t in ids]


def prefill_chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each prefill chunk; the last is never a lone token
    (Task 4's cache reads a one-token update as the first decode step)."""
    starts = list(range(0, n, chunk_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], n]))
