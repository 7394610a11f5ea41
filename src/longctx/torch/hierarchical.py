"""Task 2 in PyTorch: LongNet's dilated levels, the mirror of ``longctx.mlx``.

Same names, arguments and semantics as ``solutions/week3/hierarchical.py``
(read the book chapter there); ``torch.Tensor`` in and out, on CPU or CUDA.
The kept rows are gathered into dense ``(segments, ceil(w / r), D)`` blocks,
so one level costs ``Hq * (L / w) * ceil(w / r)^2`` scores.
"""
from __future__ import annotations

import torch

from longctx.checks import check_attention, check_scale, self_attention_inputs
from longctx.techniques.hierarchical import check_level, check_levels, hierarchical_span


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_size: int, dilation: int, *,
                      head_offsets: bool = True, causal: bool = True,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One level -> ``(out (B, Hq, Lq, D), lse (B, Hq, Lq) float32)``; ``lse = -inf`` where not kept."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    w, r = check_level(segment_size, dilation)
    scale = D ** -0.5 if check_scale(scale) is None else scale
    dev = q.device
    m = -(-w // r)
    first = (Lk - Lq) // w * w
    nseg = -(-(Lk - first) // w)
    h = torch.arange(Hq, device=dev)
    offset = h // -(-Hq // r) if head_offsets else torch.zeros_like(h)
    local = offset[:, None, None] + r * torch.arange(m, device=dev)  # (Hq, 1, m)
    pos = first + w * torch.arange(nseg, device=dev)[None, :, None] + local  # (Hq, nseg, m)
    key_ok = (local < w) & (pos < Lk)

    kv_row = ((h // (Hq // Hkv))[:, None, None] * Lk + pos.clamp(max=Lk - 1)).flatten()
    kg = k.reshape(B, Hkv * Lk, D)[:, kv_row].reshape(B, Hq, nseg, m, D).float()
    vg = v.reshape(B, Hkv * Lk, D)[:, kv_row].reshape(B, Hq, nseg, m, D).float()
    q_row = (h[:, None, None] * Lq + (pos - (Lk - Lq)).clamp(0, Lq - 1)).flatten()
    qg = q.reshape(B, Hq * Lq, D)[:, q_row].reshape(B, Hq, nseg, m, D).float()

    training = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    og, lse_g = _block_attention(qg, kg, vg, key_ok, causal, scale,  # (B, Hq, nseg, m, D), (B, Hq, nseg, m)
                                 fused=causal and dev.type == "cpu" and not training)

    qpos = torch.arange(Lk - Lq, Lk, device=dev) - first
    within = qpos % w - offset[:, None]  # (Hq, Lq)
    kept = (within >= 0) & (within % r == 0)
    back = (h[:, None] * (nseg * m) + (qpos // w) * m + within.clamp(min=0) // r).flatten()
    out = og.reshape(B, Hq * nseg * m, D)[:, back].reshape(B, Hq, Lq, D)
    lse = lse_g.reshape(B, Hq * nseg * m)[:, back].reshape(B, Hq, Lq)
    out = out.masked_fill(~kept[..., None], 0.0)
    lse = lse.masked_fill(~kept, float("-inf"))
    return out.to(q.dtype), lse


def _block_attention(qg, kg, vg, key_ok, causal: bool, scale: float, fused: bool):
    """Attention inside each gathered block, ``(B, Hq, nseg, m, D)`` float32, keys masked by
    ``key_ok (Hq, nseg, m)`` (and causally): ``(out, lse)``, lse ``-inf`` on rows that see nothing.

    ``fused`` (causal, on the CPU): torch's own flash kernel, which returns the lse beside the
    output and never writes the ``m x m`` scores; the causal mask implies ``key_ok`` on every row
    that is kept (its earlier keys are all valid). Otherwise the scores are explicit. Training
    takes the explicit path: the levels are mixed through the lse, and the flash kernel's lse
    carries no gradient (autograd would silently drop that part of dq and dk)."""
    B, Hq, nseg, m, D = qg.shape
    if fused:
        flat = [x.reshape(B, Hq * nseg, m, D) for x in (qg, kg, vg)]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*flat, 0.0, True, scale=scale)
        return out.reshape(B, Hq, nseg, m, D), lse.reshape(B, Hq, nseg, m)
    s = (qg * scale) @ kg.transpose(-1, -2)  # (B, Hq, nseg, m, m)
    visible = key_ok[:, :, None, :]
    if causal:
        visible = visible & torch.ones(m, m, dtype=torch.bool, device=qg.device).tril()
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hq, nseg, m); -inf on padding rows
    p = torch.exp(s - torch.where(lse.isinf(), 0.0, lse)[..., None])
    return p @ vg, lse  # rows already normalised: p = exp(s - lse)


class HierarchicalAttention:
    """LongNet's multi-scale attention: dilated levels mixed by their softmax denominators."""

    def __init__(self, levels: list[int] = [64, 512, 4096], dilations: list[int] | None = None,  # noqa: B006
                 causal: bool = True, scale: float | None = None):
        self.levels, self.dilations = check_levels(levels, dilations)
        self.causal = bool(causal)
        self.scale = check_scale(scale)

    def hierarchical_forward(self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` -> ``(B, Hq, Lq, D)``, dtype of ``q``.

        ``hierarchical_forward(x)`` is self-attention of ``x`` with itself (``q = k = v = x``).
        Span by span (every segment size divides a span), written into the output in place."""
        k, v = self_attention_inputs(q, k, v)
        B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
        span = self.span(B * Hq)
        if span >= Lk:
            return self.mix_levels(q, k, v)
        p0 = Lk - Lq
        out = torch.empty_like(q)
        for a in range(p0 // span * span, Lk, span):
            b = min(a + span, Lk)
            out[:, :, max(a, p0) - p0:b - p0] = self.mix_levels(q[:, :, max(a, p0) - p0:b - p0], k[:, :, a:b],
                                                                 v[:, :, a:b])
        return out

    def span(self, rows: int) -> int:
        return hierarchical_span(self.levels, self.dilations, rows)

    def mix_levels(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The levels mixed by their softmax denominators."""
        parts = [dilated_attention(q, k, v, w, r, causal=self.causal, scale=self.scale)
                 for w, r in zip(self.levels, self.dilations)]
        lse = torch.stack([lse for _, lse in parts])  # (levels, B, Hq, Lq)
        weight = torch.exp(lse - torch.logsumexp(lse, dim=0, keepdim=True))
        out = sum(wi[..., None] * o.float() for wi, (o, _) in zip(weight, parts))
        return out.to(q.dtype)

    __call__ = hierarchical_forward
