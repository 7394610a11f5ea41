"""Task 2: hierarchical attention, LongNet's dilated levels (book chapter "Hierarchical (dilated) attention").

One level ``(w, r)`` cuts the sequence into segments of ``w`` positions (segment
``s`` holds ``s*w .. s*w + w - 1``); inside each segment, head ``h`` keeps every
``r``-th position starting at its offset ``h // ceil(Hq / r)`` (torchscale's
``DilatedAttention``), and the kept queries attend to the kept keys of their
own segment. Several levels, from short and dense to long and sparse, are
mixed by their softmax denominators: that equals one softmax over the union,
with multiplicity, of the keys the levels give each query (Ding et al. 2023,
"LongNet: Scaling Transformers to 1,000,000,000 Tokens").

The kept rows are *gathered* into dense ``(segments, m, D)`` blocks with
``m = ceil(w / r)`` before any score is computed, so one level costs
``Hq * (L / w) * m^2`` scores: linear in ``L``, never ``L * L``.
"""
from __future__ import annotations

import math

import mlx.core as mx

from longctx.checks import check_attention, check_scale, self_attention_inputs
from longctx.techniques.hierarchical import check_level, check_levels, hierarchical_span
from longctx.tiles import RowWriter

LOG2E = math.log2(math.e)


def dilated_attention(q: mx.array, k: mx.array, v: mx.array, segment_size: int, dilation: int, *,
                      head_offsets: bool = True, causal: bool = True,
                      scale: float | None = None) -> tuple[mx.array, mx.array]:
    """One level. ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` -> ``(out (B, Hq, Lq, D), lse (B, Hq, Lq))``.

    ``out`` has the dtype of ``q`` and is 0 where the head does not keep the
    query; ``lse`` (float32, natural log of the softmax denominator) is ``-inf`` there.

    Segments start at multiples of ``segment_size`` (absolute positions; the
    queries are the last ``Lq`` of the ``Lk`` keys). Gather each head's kept
    rows of each segment into dense ``(segments, ceil(w / r), D)`` blocks,
    attend inside them (causally: row order is position order), then gather
    the outputs back to the query positions. No ``Lq x Lk`` array. About 35 lines.
    """
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    w, r = check_level(segment_size, dilation)
    scale = D ** -0.5 if check_scale(scale) is None else scale
    # BEGIN SOLUTION
    m = -(-w // r)  # rows a head keeps per segment (the last may fall outside the segment)

    # Only the segments that hold a query matter; their keys start at `first`.
    first = (Lk - Lq) // w * w
    nseg = -(-(Lk - first) // w)
    h = mx.arange(Hq)
    offset = h // -(-Hq // r) if head_offsets else mx.zeros_like(h)  # (Hq,)
    local = offset[:, None, None] + r * mx.arange(m)  # (Hq, 1, m) position inside the segment
    pos = first + w * mx.arange(nseg)[None, :, None] + local  # (Hq, nseg, m) absolute positions
    key_ok = (local < w) & (pos < Lk)  # (Hq, nseg, m)

    # Gather the kept rows head by head: flat index (kv head, position) into (B, Hkv * Lk, D).
    kv_row = (h // (Hq // Hkv))[:, None, None] * Lk + mx.minimum(pos, Lk - 1)
    kg = mx.take(k.reshape(B, Hkv * Lk, D), kv_row.flatten(), axis=1).reshape(B, Hq, nseg, m, D)
    vg = mx.take(v.reshape(B, Hkv * Lk, D), kv_row.flatten(), axis=1).reshape(B, Hq, nseg, m, D)
    q_row = h[:, None, None] * Lq + mx.clip(pos - (Lk - Lq), 0, Lq - 1)
    qg = mx.take(q.reshape(B, Hq * Lq, D), q_row.flatten(), axis=1).reshape(B, Hq, nseg, m, D)

    # Dense attention inside each gathered segment; same offset and stride, so
    # row order is position order and "causal" is a lower triangle.
    s = (qg.astype(mx.float32) * (scale * LOG2E)) @ kg.astype(mx.float32).swapaxes(-1, -2)  # (B, Hq, nseg, m, m)
    visible = key_ok[:, :, None, :]
    if causal:
        visible = visible & (mx.arange(m)[None, :] <= mx.arange(m)[:, None])
    s = mx.where(visible, s, -mx.inf)
    s_max = mx.max(s, axis=-1, keepdims=True)
    s_max = mx.where(s_max == -mx.inf, 0.0, s_max)  # padding rows see nothing
    p = mx.power(2.0, s - s_max)
    denom = mx.sum(p, axis=-1, keepdims=True)
    seen = mx.where(denom > 0, denom, 1.0)  # padding rows: 0 / 1, and no 0 / 0 in their gradient
    og = (p @ vg.astype(mx.float32)) / seen  # (B, Hq, nseg, m, D)
    lse_g = mx.where(denom > 0, (s_max + mx.log2(seen)) / LOG2E, -mx.inf)[..., 0]  # (B, Hq, nseg, m)

    # Back to the query positions: gather again (no scatter), zero where not kept.
    qpos = mx.arange(Lk - Lq, Lk) - first  # (Lq,) position relative to the first segment
    within = qpos % w - offset[:, None]  # (Hq, Lq)
    kept = (within >= 0) & (within % r == 0)
    back = h[:, None] * (nseg * m) + (qpos // w) * m + mx.maximum(within, 0) // r  # (Hq, Lq)
    out = mx.take(og.reshape(B, Hq * nseg * m, D), back.flatten(), axis=1).reshape(B, Hq, Lq, D)
    lse = mx.take(lse_g.reshape(B, Hq * nseg * m), back.flatten(), axis=1).reshape(B, Hq, Lq)
    out = mx.where(kept[..., None], out, 0.0)
    lse = mx.where(kept, lse, -mx.inf)
    return out.astype(q.dtype), lse
    # END SOLUTION


class HierarchicalAttention:
    """LongNet's multi-scale attention: dilated levels mixed by their softmax denominators."""

    def __init__(self, levels: list[int] = [64, 512, 4096], dilations: list[int] | None = None,  # noqa: B006
                 causal: bool = True, scale: float | None = None):
        self.levels, self.dilations = check_levels(levels, dilations)  # dilations default to w // levels[0]
        self.causal = bool(causal)
        self.scale = check_scale(scale)

    def hierarchical_forward(self, q: mx.array, k: mx.array | None = None, v: mx.array | None = None) -> mx.array:
        """``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` -> ``(B, Hq, Lq, D)``, dtype of ``q``.

        ``hierarchical_forward(x)`` is self-attention of ``x`` with itself (``q = k = v = x``).
        Given: the checks and the tiling. Every segment size divides ``span``, so a span's
        queries see only the keys of that span: ``mix_levels`` runs span by span and its rows
        are written into the output in place, so memory beyond the inputs and the output
        depends on the levels, never on ``L``."""
        k, v = self_attention_inputs(q, k, v)
        B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
        span = self.span(B * Hq)
        if span >= Lk:
            return self.mix_levels(q, k, v)
        p0 = Lk - Lq  # position of the first query
        out = RowWriter(q.shape, q.dtype, axis=2)
        for a in range(p0 // span * span, Lk, span):
            b = min(a + span, Lk)
            out.put(max(a, p0) - p0, self.mix_levels(q[:, :, max(a, p0) - p0:b - p0], k[:, :, a:b], v[:, :, a:b]))
        return out.result()

    def span(self, rows: int) -> int:
        """Positions per tile of ``hierarchical_forward`` for ``rows = B * Hq`` query heads: a
        multiple of every segment size, about ``HIERARCHICAL_TILE`` scores per level."""
        return hierarchical_span(self.levels, self.dilations, rows)

    def mix_levels(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """The levels, mixed: shapes as in ``hierarchical_forward``. Run ``dilated_attention`` per
        level and mix the levels by their softmax denominators:
        ``sum_i exp(lse_i - logsumexp_i lse_i) * out_i``. About 8 lines."""
        # BEGIN SOLUTION
        outs, lses = [], []
        for w, r in zip(self.levels, self.dilations):
            o, lse = dilated_attention(q, k, v, w, r, causal=self.causal, scale=self.scale)
            outs.append(o.astype(mx.float32))
            lses.append(lse)
        lse = mx.stack(lses)  # (levels, B, Hq, Lq); level 0 keeps every query: finite total
        weight = mx.exp(lse - mx.logsumexp(lse, axis=0, keepdims=True))  # 0 where a level skips
        out = sum(wi[..., None] * o for wi, o in zip(weight, outs))
        return out.astype(q.dtype)
        # END SOLUTION

    __call__ = hierarchical_forward
