"""Task 2, LongNet's dilated (hierarchical) attention: what is not array code."""
from __future__ import annotations

import math

from longctx.checks import check_positive_int
from longctx.techniques.base import BYTES, Technique

HIERARCHICAL_TILE = 1 << 24  # scores per level and span, both backends (``hierarchical_span``)


def check_level(segment_size, dilation) -> tuple[int, int]:
    """One LongNet level: ``1 <= dilation <= segment_size``."""
    w = check_positive_int("segment_size", segment_size)
    r = check_positive_int("dilation", dilation)
    if r > w:
        raise ValueError(f"dilation must be <= segment_size ({w}), got {r}")
    return w, r


def check_levels(levels, dilations) -> tuple[list[int], list[int]]:
    """LongNet's levels; ``dilations`` default to ``w // levels[0]`` and must start at 1."""
    if not isinstance(levels, (list, tuple)) or not levels:
        raise ValueError(f"levels must be a non-empty list of segment sizes, got {levels!r}")
    levels = [check_positive_int("levels", w) for w in levels]
    if dilations is None:
        dilations = [max(1, w // levels[0]) for w in levels]
    if not isinstance(dilations, (list, tuple)) or len(dilations) != len(levels):
        raise ValueError(f"dilations must be a list with one entry per level ({len(levels)}), got {dilations!r}")
    dilations = [check_positive_int("dilations", r) for r in dilations]
    if dilations[0] != 1:
        raise ValueError(f"dilations[0] must be 1 so that every query is kept, got {dilations[0]}")
    for w, r in zip(levels, dilations):
        if r > w:
            raise ValueError(f"dilations must be <= their segment size, got dilation {r} for segment {w}")
    return levels, dilations


def geometric_levels(segment_size, dilation_rate, num_levels: int = 3) -> tuple[list[int], list[int]]:
    """LongNet's ``DilatedAttention(segment_size, dilation_rate)`` as levels: the paper's geometric
    sequence ``w_i = segment_size * dilation_rate ** i``, ``r_i = dilation_rate ** i`` for ``i <
    num_levels`` (level 0 dense, as every query must be kept), or the two lists as given
    (torchscale's ``segment_length`` and ``dilated_ratio``)."""
    if isinstance(segment_size, (list, tuple)) or isinstance(dilation_rate, (list, tuple)):
        return check_levels(list(segment_size), list(dilation_rate))
    w, r = check_positive_int("segment_size", segment_size), check_positive_int("dilation_rate", dilation_rate)
    n = check_positive_int("num_levels", num_levels) if r > 1 else 1
    return check_levels([w * r ** i for i in range(n)], [r ** i for i in range(n)])


def hierarchical_span(levels, dilations, rows: int) -> int:
    """Positions per tile of ``HierarchicalAttention`` (both backends): a multiple of every
    segment size, with about ``HIERARCHICAL_TILE`` scores per level for ``rows = B * Hq`` query heads. A
    span's queries see only that span's keys, so spans run one at a time."""
    lcm = math.lcm(*levels)
    m = max(-(-w // r) for w, r in zip(levels, dilations))  # keys per kept row
    return lcm * max(1, HIERARCHICAL_TILE // (rows * lcm * m))


def hierarchical_pairs(L: int, levels, heads: int, dilations=None) -> int:
    """Causal (query, key) pairs the LongNet levels keep, over all heads: a segment whose head
    keeps ``c`` positions has ``c (c + 1) / 2`` of them."""
    levels, dilations = check_levels(levels, dilations)
    total = 0
    for w, r in zip(levels, dilations):
        for h in range(heads):
            offset = h // -(-heads // r)
            for s0 in range(0, L, w):
                c = len(range(offset, min(w, L - s0), r))
                total += c * (c + 1) // 2
    return total


def memory(L, H, D, o, backend):
    w0 = min(o["levels"][0], L)
    if backend == "torch":
        return len(o["levels"]) * 2 * H * L * (w0 + D) * BYTES  # per level: scores, weights, output, lse
    levels, dilations = check_levels(o["levels"], o.get("dilations"))
    m = max(-(-w // r) for w, r in zip(levels, dilations))  # keys per kept row
    # per level, one span at a time: scores, weights, output, lse; the output written in place
    return len(levels) * 2 * H * min(hierarchical_span(levels, dilations, H), L) * (m + D) * BYTES


TECHNIQUE = Technique(
    "hierarchical", 2, "LongNet's dilated levels mixed by their softmax denominators",
    {"levels": [1024, 4096, 16384], "dilations": None}, memory,
    lambda L, H, D, o: 4.0 * D * hierarchical_pairs(L, o["levels"], H, o.get("dilations")),
    attention="HierarchicalAttention", strategy={"levels": [2048, 8192, 32768], "dilations": None},
    cache="HierarchicalKVCache", aliases=("dilated",), from_window=lambda w: {"levels": [w, 4 * w, 16 * w]},
    validate=lambda o: check_levels(o["levels"], o.get("dilations")),
    evaluate=lambda w: {"levels": [w, 4 * w], "dilations": [1, 4]})
