"""Task 1 in PyTorch: sliding-window attention, the mirror of ``longctx.mlx``.

Same names, arguments and semantics as ``solutions/week3/sliding.py`` (read the
book chapter there); ``torch.Tensor`` in and out, on CPU or CUDA. The band is
computed in query blocks whose scores are ``(block, block + window - 1)``
tiles, so time and memory grow as ``Lq * window_size``.
"""
from __future__ import annotations

import torch

from longctx.checks import check_attention, check_global_tokens, check_positive_int, check_scale

# Score-tile elements per step: bounds the peak memory of one call.
TILE_ELEMENTS = 1 << 22


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
        window, rep = self.window_size, Hq // Hkv
        block = max(16, min(128, 1 << (window.bit_length() - 2))) if window > 4 else 16
        nprev = -(-(window - 1) // block)
        nb = -(-Lq // block)
        ncol = (nprev + 1) * block

        qf = torch.nn.functional.pad(q.float() * scale, (0, 0, 0, nb * block - Lq))
        qf = qf.view(B, Hkv, rep, nb, block, D).transpose(2, 3)  # (B, Hkv, nb, rep, block, D)
        start = (Lk - Lq) - nprev * block
        lo, hi = max(0, start), min(Lk, start + (nprev + nb) * block)
        pad = (0, 0, lo - start, start + (nprev + nb) * block - hi)
        kp = torch.nn.functional.pad(k[:, :, lo:hi].float(), pad)  # (B, Hkv, (nprev+nb)*block, D)
        vp = torch.nn.functional.pad(v[:, :, lo:hi].float(), pad)
        # Overlapping windows of ncol rows every block rows: a view, no copy.
        kw = kp.unfold(2, ncol, block).transpose(-1, -2)  # (B, Hkv, nb, ncol, D)
        vw = vp.unfold(2, ncol, block).transpose(-1, -2)

        r = torch.arange(block, device=q.device)[:, None]
        c = torch.arange(ncol, device=q.device)[None, :] - nprev * block
        band = (c <= r) & (c > r - window)  # (block, ncol)
        key_pos = start + torch.arange(nb, device=q.device)[:, None, None] * block + c + nprev * block
        visible = (band & (key_pos >= 0) & ~torch.isin(key_pos, glob))[:, None]  # (nb, 1, block, ncol)
        if len(glob):  # global keys: scored beside each tile, seen from their own position on
            qpos = (Lk - Lq) + torch.arange(nb * block, device=q.device).view(nb, 1, block, 1)
            seen = glob <= qpos  # (nb, 1, block, G)
            kg, vg = k[:, :, glob].float()[:, :, None], v[:, :, glob].float()[:, :, None]  # (B, Hkv, 1, G, D)

        out = torch.empty(B, Hkv, nb, rep, block, D, device=q.device)
        per_step = max(1, TILE_ELEMENTS // (B * Hq * block * ncol))
        for b0 in range(0, nb, per_step):
            b1 = min(nb, b0 + per_step)
            s = qf[:, :, b0:b1] @ kw[:, :, b0:b1, None].transpose(-1, -2)  # (B, Hkv, n, rep, block, ncol)
            s = s.masked_fill(~visible[b0:b1], float("-inf"))
            if not len(glob):
                out[:, :, b0:b1] = torch.softmax(s, dim=-1) @ vw[:, :, b0:b1, None]
                continue
            sg = (qf[:, :, b0:b1] @ kg[:, :, None].transpose(-1, -2)).masked_fill(~seen[b0:b1], float("-inf"))
            p = torch.softmax(torch.cat([s, sg], dim=-1), dim=-1)
            out[:, :, b0:b1] = p[..., :ncol] @ vw[:, :, b0:b1, None] + p[..., ncol:] @ vg[:, :, None]
        out = out.transpose(2, 3).reshape(B, Hq, nb * block, D)
        return out[:, :, :Lq].to(q.dtype)

    __call__ = sliding_attention
