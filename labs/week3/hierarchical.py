# Learner stub for Task 2, generated from solutions/week3/hierarchical.py by `longctx stubs`.
# Replace each `raise NotImplementedError(...)` with your code; grade it with
#     pytest labs/week3 --task 2
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
    raise NotImplementedError("Task 2: dilated_attention -- see the book chapter 'Hierarchical (dilated) attention'")


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
        raise NotImplementedError("Task 2: HierarchicalAttention.mix_levels -- see the book chapter 'Hierarchical (dilated) attention'")

    __call__ = hierarchical_forward
