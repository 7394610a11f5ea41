"""Task 2's float64 oracle: LongNet's dilated levels."""
from __future__ import annotations

import numpy as np

from longctx.exact import attention, query_positions


def head_offset(h: int, hq: int, dilation: int, head_offsets: bool = True) -> int:
    """The offset head ``h`` keeps inside each segment: heads split into ``dilation`` groups."""
    return h // -(-hq // dilation) if head_offsets else 0


# ANCHOR: dilated_pairs
def dilated_pairs(hq: int, lq: int, lk: int, segment_size: int, dilation: int, *,
                  head_offsets: bool = True, causal: bool = True) -> np.ndarray:
    """``(hq, lq, lk)`` bool: one level pairs query ``i`` (position ``lk - lq + i``) with key ``j``."""
    pairs = np.zeros((hq, lq, lk), dtype=bool)
    t = np.arange(lk)
    segment = t // segment_size
    for h in range(hq):
        offset = head_offset(h, hq, dilation, head_offsets)
        kept = (t - segment * segment_size) % dilation == offset
        for i, p in enumerate(query_positions(lq, lk)):
            if kept[p]:
                pairs[h, i] = kept & (segment == segment[p]) & ((t <= p) if causal else True)
    return pairs
# ANCHOR_END: dilated_pairs


def dilated_attention(q, k, v, segment_size: int, dilation: int, *, head_offsets: bool = True,
                      causal: bool = True, scale=None) -> tuple[np.ndarray, np.ndarray]:
    """One LongNet level: ``(out, lse)``; ``lse`` is ``-inf`` (and ``out`` 0) where no key is paired."""
    hq, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    pairs = dilated_pairs(hq, lq, lk, segment_size, dilation, head_offsets=head_offsets, causal=causal)
    return attention(q, k, v, pairs[None], scale=scale), attention_lse(q, k, pairs[None], scale=scale)


def attention_lse(q, k, mask, *, scale=None) -> np.ndarray:
    """``(B, Hq, Lq)`` float64: log of each row's softmax denominator (``-inf`` for an empty row)."""
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.where(mask, np.einsum("bhid,bhjd->bhij", q, k) * scale, -np.inf)
    m = s.max(axis=-1)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(s - m_safe[..., None]).sum(axis=-1)) + m_safe


def default_dilations(levels) -> list[int]:
    """``w // levels[0]`` per level: every segment keeps about ``levels[0]`` positions."""
    return [max(1, w // levels[0]) for w in levels]


# ANCHOR: hierarchical
def hierarchical_attention(q, k, v, levels, dilations=None, *, causal: bool = True, scale=None,
                           head_offsets: bool = True) -> np.ndarray:
    """LongNet's mix as one softmax over the union, with multiplicity, of every level's keys:
    ``softmax(scores + log c) @ v`` where ``c`` counts the levels that pair query and key."""
    dilations = default_dilations(levels) if dilations is None else dilations
    hq, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    count = sum(dilated_pairs(hq, lq, lk, w, r, head_offsets=head_offsets, causal=causal).astype(np.float64)
                for w, r in zip(levels, dilations))
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    k, v = (np.repeat(x, hq // x.shape[1], axis=1) for x in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with np.errstate(divide="ignore"):
        s = np.einsum("bhid,bhjd->bhij", q, k) * scale + np.log(count)[None]  # log 0 = -inf: unseen
    e = np.exp(s - s.max(axis=-1, keepdims=True))  # level 0 keeps every query: no empty row
    return np.einsum("bhij,bhjd->bhid", e / e.sum(axis=-1, keepdims=True), v)
# ANCHOR_END: hierarchical


def hierarchical_mistakes(q, k, v, levels, dilations=None, *, causal: bool = True, scale=None):
    """What the classic Task 2 mistakes would output, for :func:`assert_close`'s diagnosis."""
    dilations = default_dilations(levels) if dilations is None else dilations
    parts = [dilated_attention(q, k, v, w, r, causal=causal, scale=scale) for w, r in zip(levels, dilations)]
    kept = [np.isfinite(lse)[..., None] for _, lse in parts]
    out = {
        "levels averaged instead of mixed by their softmax denominators (LSE)":
            sum(o for o, _ in parts) / sum(kept),
        "dilation offset not per head (every head keeps offset 0)":
            hierarchical_attention(q, k, v, levels, dilations, causal=causal, scale=scale, head_offsets=False),
        "missing the 1/sqrt(D) scale":
            hierarchical_attention(q, k, v, levels, dilations, causal=causal, scale=1.0),
    }
    if causal:
        out["future positions leak: segments are not causal"] = hierarchical_attention(
            q, k, v, levels, dilations, causal=False, scale=scale)
    return out


def hierarchical_counts(hq: int, lq: int, lk: int, levels, dilations=None, *, causal: bool = True) -> np.ndarray:
    """``(hq, lq, lk)``: in how many levels query ``i`` sees key ``j``. Mixing the levels by their
    softmax denominators is one softmax in which a key counts once per level that keeps the pair
    (what the gradient tests differentiate, ``longctx.testing.gradients.weighted``)."""
    dilations = default_dilations(levels) if dilations is None else dilations
    return sum(dilated_pairs(hq, lq, lk, w, r, causal=causal).astype(np.float64) for w, r in zip(levels, dilations))
