"""Task 1 in PyTorch: sliding-window attention, the mirror of ``longctx.mlx``.

Same names, arguments and semantics as ``solutions/week3/sliding.py`` (read the
book chapter there); ``torch.Tensor`` in and out, on CPU or CUDA. The queries
go in blocks; each block's ``block + window - 1`` keys (and the global keys)
are one batch entry of torch's fused ``scaled_dot_product_attention`` with the
band as its mask, a step of blocks at a time, written into the output in
place: time grows as ``Lq * window_size`` and memory beyond q, k, v and the
output is one step's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx.checks import check_attention, check_global_tokens, check_positive_int, check_scale
from longctx.techniques import TORCH_TILE as TILE_ELEMENTS  # score elements per step (the memory formula's too)


class SlidingWindowAttention:
    """Causal attention restricted to the last ``window_size`` positions, plus ``global_tokens``
    (positions every later query also sees, counted once)."""

    def __init__(self, window_size: int = 512, scale: float | None = None, global_tokens=()):
        self.window_size = check_positive_int("window_size", window_size)
        self.scale = check_scale(scale)
        self.global_tokens = tuple(int(g) for g in check_global_tokens(global_tokens))

    def create_sliding_mask(self, seq_len: int, offset: int = 0, device=None) -> torch.Tensor:
        """Boolean ``(seq_len, offset + seq_len)``; row ``i`` is the query at ``offset + i``."""
        seq_len = check_positive_int("seq_len", seq_len)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an integer >= 0, got {offset!r}")
        p = torch.arange(offset, offset + seq_len, device=device)[:, None]
        j = torch.arange(offset + seq_len, device=device)[None, :]
        is_global = torch.isin(j, torch.tensor(self.global_tokens, dtype=j.dtype, device=device))
        return (j <= p) & ((j > p - self.window_size) | is_global)

    def sliding_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` -> ``(B, Hq, Lq, D)``, dtype of ``q``."""
        B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
        glob = torch.as_tensor(check_global_tokens(self.global_tokens, Lk), device=q.device)
        if q.device != k.device or q.device != v.device:
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        scale = D ** -0.5 if self.scale is None else self.scale
        window, rep, G, dev = self.window_size, Hq // Hkv, len(glob), q.device
        block = max(16, min(128, 1 << (window.bit_length() - 2))) if window > 4 else 16
        nprev = -(-(window - 1) // block)
        nb = -(-Lq // block)
        ncol = (nprev + 1) * block
        p0 = Lk - Lq  # position of the first query

        r = torch.arange(block, device=dev)[:, None]
        c = torch.arange(ncol, device=dev)[None, :] - nprev * block
        band = (c <= r) & (c > r - window)  # (block, ncol), the same in every block
        if G:  # global keys: beside each tile's keys, seen from their own position on
            kg, vg = k[:, :, glob].float(), v[:, :, glob].float()  # (B, Hkv, G, D)

        out = torch.empty(B, Hkv, rep, Lq, D, dtype=q.dtype, device=dev)
        per_step = max(1, TILE_ELEMENTS // (B * Hq * block * (ncol + G)))
        for b0 in range(0, nb, per_step):
            b1 = min(nb, b0 + per_step)
            n, e = b1 - b0, min(Lq, b1 * block)
            # One SDPA batch entry per (sequence, block); the rep query heads of a kv head are
            # stacked as rows against that kv head's keys, so GQA copies no keys.
            qb = F.pad(q[:, :, b0 * block:e].float(), (0, 0, 0, b1 * block - e))
            qb = qb.view(B, Hkv, rep, n, block, D).permute(0, 3, 1, 2, 4, 5).reshape(B * n, Hkv, rep * block, D)
            k0 = p0 + (b0 - nprev) * block  # position of this step's first key row
            kb = _rows(k, k0, (n + nprev) * block).unfold(2, ncol, block)  # (B, Hkv, n, D, ncol)
            vb = _rows(v, k0, (n + nprev) * block).unfold(2, ncol, block)
            kb = kb.permute(0, 2, 1, 4, 3).reshape(B * n, Hkv, ncol, D)
            vb = vb.permute(0, 2, 1, 4, 3).reshape(B * n, Hkv, ncol, D)
            key_pos = k0 + torch.arange(n, device=dev)[:, None, None] * block + torch.arange(ncol, device=dev)
            visible = band & (key_pos >= 0) & ~torch.isin(key_pos, glob)  # (n, block, ncol)
            if G:
                kb = torch.cat([kb, kg.repeat_interleave(n, dim=0)], dim=2)  # (B n, Hkv, ncol + G, D)
                vb = torch.cat([vb, vg.repeat_interleave(n, dim=0)], dim=2)
                qpos = p0 + b0 * block + torch.arange(n * block, device=dev).view(n, block, 1)
                visible = torch.cat([visible, glob <= qpos], dim=-1)
            mask = visible[:, None].expand(n, rep, block, ncol + G).reshape(n, 1, rep * block, ncol + G)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask.repeat(B, 1, 1, 1), scale=scale)
            o = o.view(B, n, Hkv, rep, block, D).permute(0, 2, 3, 1, 4, 5).reshape(B, Hkv, rep, n * block, D)
            out[:, :, :, b0 * block:e] = o[:, :, :, :e - b0 * block]
        return out.view(B, Hq, Lq, D)

    __call__ = sliding_attention


def _rows(x, first: int, count: int) -> torch.Tensor:
    """Rows ``first .. first + count - 1`` of ``x (B, H, L, D)`` in float32, zeros outside ``0 .. L - 1``."""
    lo, hi = max(0, first), min(x.shape[2], first + count)
    return F.pad(x[:, :, lo:hi].float(), (0, 0, lo - first, first + count - hi))
