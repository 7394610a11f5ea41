"""Task 12 in PyTorch: Longformer and BigBird, the mirror of ``longctx.mlx.sparse`` (read the chapter there).

Same names and semantics. The project tests compare both with Hugging Face's
``LongformerSelfAttention`` and ``BigBirdBlockSparseAttention`` on random
weights (bidirectional), and the causal variants with the float64 oracles.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from longctx.checks import check_attention, check_nonnegative_int, check_positive_int, check_scale
from longctx.techniques.bigbird import check_bigbird
from longctx.techniques.longformer import check_longformer

BLOCK = 64
TILE = 1 << 22  # score elements per step
HIDDEN = torch.finfo(torch.float32).min  # a masked score (see longformer_attention)


def global_rows(q, k, v, rows: np.ndarray, first_key: int, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``q (B, Hq, R, D)`` at absolute positions ``rows`` against the keys at
    ``first_key ..``: ``(out, lse)`` float32; a row that sees none has ``out = 0``, ``lse = -inf``."""
    B, Hq, R, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qr = q.float().reshape(B, Hkv, Hq // Hkv, R, D)
    s = (qr * scale) @ k.float()[:, :, None].transpose(-1, -2)  # (B, Hkv, G, R, S)
    if causal:
        r = torch.as_tensor(rows, device=q.device)
        s = s.masked_fill(first_key + torch.arange(S, device=q.device)[None, :] > r[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where a row sees nothing
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return (p @ v.float()[:, :, None]).reshape(B, Hq, R, D), lse.reshape(B, Hq, R)


def _put_global_rows(out, q, k, v, rows: np.ndarray, causal: bool, scale: float):
    """``out[:, :, rows - P0]`` = the global rows, from runs of keys merged by ``lse``."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    index = torch.as_tensor(rows - (Lk - Lq), device=q.device)
    qr = q[:, :, index]
    run = max(1, TILE // (B * Hq * len(rows)))
    acc = lse = None
    for a in range(0, int(rows.max()) + 1 if causal else Lk, run):
        o, l = global_rows(qr, k[:, :, a:a + run], v[:, :, a:a + run], rows, a, causal, scale)
        if acc is None:
            acc, lse = o, l
        else:
            new = torch.logaddexp(lse, l)
            acc = acc * torch.exp(lse - new)[..., None] + o * torch.exp(l - new)[..., None]
            lse = new
    out[:, :, index] = acc.to(out.dtype)
    return out


def _band_keys(x, lo: int, nb: int, block: int, ncol: int) -> torch.Tensor:
    """For query block ``b``, rows of ``x`` at positions ``lo + b * block + c``: ``(B, H, nb, ncol, D)``."""
    L = x.shape[2]
    total = (nb - 1) * block + ncol
    a, b = max(lo, 0), min(L, lo + total)
    xp = F.pad(x[:, :, a:b], (0, 0, a - lo, lo + total - b))
    return xp.unfold(2, ncol, block).transpose(-1, -2)  # a view: overlapping windows


def longformer_attention(q, k, v, window: int, global_tokens=(), causal: bool = False, *, global_qkv=None,
                         scale: float | None = None) -> torch.Tensor:
    """Longformer (see ``longctx.mlx.sparse.longformer_attention``)."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    glob = check_longformer(window, global_tokens, causal, Lq, Lk, global_qkv, (q, k, v))
    scale = D ** -0.5 if check_scale(scale) is None else scale
    left, right = (window - 1, 0) if causal else (window // 2, window // 2)
    P0, rep, dev = Lk - Lq, Hq // Hkv, q.device
    nb = -(-Lq // BLOCK)
    ncol = BLOCK + left + right
    rel = torch.arange(ncol, device=dev)[None, :] - left - torch.arange(BLOCK, device=dev)[:, None]
    g = torch.as_tensor(glob, device=dev)
    kg, vg = k[:, :, g].float()[:, :, None, None], v[:, :, g].float()[:, :, None, None]  # (B, Hkv, 1, 1, G, D)
    out = torch.empty(B, Hkv, rep, Lq, D, dtype=q.dtype, device=dev)  # filled tile by tile
    step = max(1, TILE // (B * Hq * BLOCK * ncol))
    for b0 in range(0, nb, step):  # a tile of query blocks at a time: q, keys and masks of the tile only
        b1 = min(nb, b0 + step)
        n, e, lo = b1 - b0, min(Lq, b1 * BLOCK), P0 - left + b0 * BLOCK
        qf = F.pad(q[:, :, b0 * BLOCK:e].float() * scale, (0, 0, 0, b1 * BLOCK - e)).view(B, Hkv, rep, n, BLOCK, D)
        kb = _band_keys(k.float(), lo, n, BLOCK, ncol)[:, :, None]  # (B, Hkv, 1, n, ncol, D)
        vb = _band_keys(v.float(), lo, n, BLOCK, ncol)[:, :, None]
        key_pos = lo + torch.arange(n, device=dev)[:, None] * BLOCK + torch.arange(ncol, device=dev)[None, :]
        local = (key_pos >= 0) & (key_pos < Lk) & ~torch.isin(key_pos, g)
        keep = (rel >= -left) & (rel <= right) & local[:, None, :]  # (n, BLOCK, ncol)
        qpos = P0 + torch.arange(b0 * BLOCK, b1 * BLOCK, device=dev).view(n, BLOCK, 1)
        seen = g <= qpos if causal else torch.ones(n, BLOCK, len(glob), dtype=torch.bool, device=dev)
        # Hidden: the lowest finite score, not -inf. A padding row past Lq sees no key, and a softmax
        # of -inf only is NaN, whose gradient would reach k and v through the tile's matmuls (its
        # output is dropped, its gradient is not); every real row sees its own position.
        s = (qf @ kb.transpose(-1, -2)).masked_fill(~keep, HIDDEN)
        sg = (qf @ kg.transpose(-1, -2)).masked_fill(~seen, HIDDEN)
        p = torch.softmax(torch.cat([s, sg], dim=-1), dim=-1)
        o = (p[..., :ncol] @ vb + p[..., ncol:] @ vg).reshape(B, Hkv, rep, n * BLOCK, D)
        out[:, :, :, b0 * BLOCK:e] = o[:, :, :, :e - b0 * BLOCK]
    out = out.view(B, Hq, Lq, D)
    rows = glob[glob >= P0]
    if len(rows):
        gq, gk, gv = (q, k, v) if global_qkv is None else global_qkv
        out = _put_global_rows(out, gq, gk, gv, rows, causal, scale)
    return out


def bigbird_random_blocks(num_blocks: int, num_random_blocks: int, seed: int, *, heads: int = 1,
                          causal: bool = False) -> np.ndarray:
    """BigBird's random key blocks ``(heads, n, r)``, ``-1`` for none (see the MLX reference)."""
    n = check_positive_int("num_blocks", num_blocks)
    r = check_nonnegative_int("num_random_blocks", num_random_blocks)
    heads = check_positive_int("heads", heads)
    rng = np.random.default_rng(seed)
    out = np.full((heads, n, r), -1, dtype=np.int64)
    for h in range(heads):
        for i in range(1, n - 1):
            pool = np.arange(1, i - 2) if causal else np.setdiff1d(np.arange(1, n - 1), [i - 1, i, i + 1])
            chosen = rng.choice(pool, size=min(r, len(pool)), replace=False)
            out[h, i, :len(chosen)] = chosen
    return out


def _gather_blocks(x, idx: np.ndarray, block_size: int) -> torch.Tensor:
    """Blocks ``idx (heads, m, K)`` each query head reads from ``x (B, Hkv, L, D)`` (GQA: head ``h``
    reads kv head ``h // (heads // Hkv)``) -> ``(B, heads, m, K b, D)`` float32."""
    B, Hkv, L, D = x.shape
    heads, m, K = idx.shape
    n = L // block_size
    kv = np.arange(heads) // (heads // Hkv)
    flat = torch.as_tensor((kv[:, None, None] * n + np.clip(idx, 0, n - 1)).reshape(-1), device=x.device)
    return x.reshape(B, Hkv * n, block_size, D)[:, flat].float().view(B, heads, m, K * block_size, D)


def bigbird_attention(q, k, v, block_size: int, num_random_blocks: int, seed: int = 0, causal: bool = False, *,
                      random_blocks=None, scale: float | None = None) -> torch.Tensor:
    """BigBird, ITC (see ``longctx.mlx.sparse.bigbird_attention``)."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    n, rand = check_bigbird(block_size, num_random_blocks, Lq, Lk, Hq, random_blocks)
    if rand is None:
        rand = bigbird_random_blocks(n, num_random_blocks, seed, heads=Hq, causal=causal)
    scale = D ** -0.5 if check_scale(scale) is None else scale
    b, i = block_size, np.arange(n)
    window = [i - 2, i - 1, i] if causal else [i - 1, i, i + 1]
    globals_ = [np.zeros(n, int)] if causal or n == 1 else [np.zeros(n, int), np.full(n, n - 1)]
    fixed = np.stack(globals_ + window, axis=-1)
    keep_fixed = np.ones(fixed.shape, bool)
    for c in range(len(globals_), fixed.shape[1]):
        keep_fixed[:, c] = (fixed[:, c] >= 0) & (fixed[:, c] < n) & ~np.isin(fixed[:, c], [0, n - 1][:len(globals_)])
    idx = np.concatenate([np.broadcast_to(fixed, (Hq, *fixed.shape)), rand], axis=-1)
    keep = np.concatenate([np.broadcast_to(keep_fixed, (Hq, *fixed.shape)), rand >= 0], axis=-1)
    K = idx.shape[-1]
    out = torch.empty(B, Hq, n, b, D, dtype=q.dtype, device=q.device)
    step = max(1, TILE // (B * Hq * b * K * b))
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        mask = np.repeat(keep[:, i0:i1], b, axis=-1)[:, :, None, :]
        if causal:
            key_pos = (np.clip(idx[:, i0:i1], 0, None)[..., None] * b + np.arange(b)).reshape(Hq, i1 - i0, 1, K * b)
            mask = mask & (key_pos <= (np.arange(i0, i1)[:, None] * b + np.arange(b))[None, :, :, None])
        kb, vb = _gather_blocks(k, idx[:, i0:i1], b), _gather_blocks(v, idx[:, i0:i1], b)
        qb = q[:, :, i0 * b:i1 * b].float().view(B, Hq, i1 - i0, b, D) * scale
        s = (qb @ kb.transpose(-1, -2)).masked_fill(~torch.as_tensor(mask, device=q.device),
                                                                float("-inf"))
        out[:, :, i0:i1] = torch.softmax(s, dim=-1) @ vb
    out = out.view(B, Hq, Lq, D)
    rows = np.concatenate([np.arange(b), np.arange(Lq - b, Lq)]) if n > 1 else np.arange(b)
    return _put_global_rows(out, q, k, v, rows, causal, scale)


class LongformerAttention:
    """``longctx bench``'s wrapper: causal Longformer with ``global_tokens`` (default: the first)."""

    def __init__(self, window: int = 512, global_tokens=(0,), causal: bool = True):
        self.window, self.global_tokens, self.causal = window, tuple(global_tokens), causal

    def __call__(self, q, k, v):
        return longformer_attention(q, k, v, self.window, self.global_tokens, self.causal)


class BigBirdAttention:
    """``longctx bench``'s wrapper: causal BigBird, seeded random blocks. A length that is not a
    multiple of ``block_size`` is padded at the end: keys after the last query are invisible to
    every query of a causal pattern, so the real rows are exact."""

    def __init__(self, block_size: int = 64, num_random_blocks: int = 3, seed: int = 0, causal: bool = True):
        self.block_size, self.num_random_blocks, self.seed, self.causal = block_size, num_random_blocks, seed, causal

    def __call__(self, q, k, v):
        L, pad = q.shape[2], -q.shape[2] % self.block_size
        if pad and self.causal:
            q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        return bigbird_attention(q, k, v, self.block_size, self.num_random_blocks, self.seed, self.causal)[:, :, :L]
