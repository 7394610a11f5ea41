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

import functools
import hashlib
import inspect
import os

import torch
import torch.nn.functional as F

from longctx import kernels
from longctx.checks import check_attention, check_positive_int, check_scale
from longctx.techniques.longformer import check_global_tokens

LOG2E = 1.4426950408889634
TILE_ELEMENTS = 1 << 20  # score elements per step of SDPA tiles (the registry's memory formula reads it)


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
        if not len(glob) and _triton_wanted(q):  # differentiable: its backward kernels are below
            out = _triton_checked(q, k, v, self.window_size, scale)
            if out is not None:
                return out
        return _tiles(q, k, v, self.window_size, scale, glob)

    __call__ = sliding_attention


def _tiles(q, k, v, window: int, scale: float, glob: torch.Tensor) -> torch.Tensor:
    """The ops path (checked arguments): band tiles through torch's SDPA, a step of blocks at a time."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rep, G, dev = Hq // Hkv, len(glob), q.device
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


def _rows(x, first: int, count: int) -> torch.Tensor:
    """Rows ``first .. first + count - 1`` of ``x (B, H, L, D)`` in float32, zeros outside ``0 .. L - 1``."""
    lo, hi = max(0, first), min(x.shape[2], first + count)
    return F.pad(x[:, :, lo:hi].float(), (0, 0, lo - first, first + count - hi))


# ---------------------------------------------------------------- the Triton kernel (CUDA)
# FlashAttention's loop restricted to the band: a program owns BLOCK_M query rows of one
# head and visits only the key tiles that hold some key of their windows, with an online
# softmax in float32 (exp2, log2(e) folded into the scale); it also stores each row's
# log-sum-exp. The backward is FlashAttention-2's, band-limited, in two kernels that need no
# atomics: one program per key tile of a kv head accumulates dK and dV over the query rows of
# every query head that sees it (GQA), one per query tile accumulates dQ; both recompute
# P = exp2(S - lse) and dS = P (dO V^T - rowsum(dO O)). Inputs in any float dtype
# (fp16/bf16 use the tensor cores through tl.dot); GQA by the kv head index; the queries
# are the last Lq of the Lk positions. CI has no GPU: tests/test_triton.py runs it with
# TRITON_INTERPRET=1 on the CPU against the float64 oracle. The interpreter's tl.dot gives
# garbage for bfloat16 (Triton 3.9), so there the bf16 tiles are multiplied in float32
# (DOT_F32); on a GPU they go to the tensor cores as they are.

_CHECKED: set[tuple] = set()  # (dtype, D, window) instantiations that have run once


def _triton_wanted(q) -> bool:
    """CUDA tensors take the Triton kernel unless it has failed in this process."""
    return q.is_cuda and kernels.usable("triton")


@functools.cache
def _triton_kernel():
    """The forward kernel and the two backward kernels, defined on first use (Triton reads
    TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sliding_fwd(Q, K, V, O, LSE, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l,
                    Hq, Hkv, Lq, Lk, scale, W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // Hq, pid_bh % Hq
        kvh = h // (Hq // Hkv)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
        pos = Lk - Lq + rows  # their positions
        d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + d[None, :],
                    mask=(rows[:, None] < Lq) & (d[None, :] < D), other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a tile a row cannot see adds exp2(-inf) = 0
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        first = Lk - Lq + pid_m * BLOCK_M - W + 1  # the first key any row here sees
        lo = tl.maximum(first, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(Lk - Lq + (pid_m + 1) * BLOCK_M, Lk)
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            kv_mask = (j[:, None] < Lk) & (d[None, :] < D)
            k = tl.load(K + b * sk_b + kvh * sk_h + j[:, None] * sk_l + d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_M, BLOCK_N), log2 units
            visible = (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - W) & (j[None, :] < Lk)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            v = tl.load(V + b * sv_b + kvh * sv_h + j[:, None] * sv_l + d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows past Lq (not stored) may see nothing
        tl.store(O + b * so_b + h * so_h + rows[:, None] * so_l + d[None, :], out.to(O.dtype.element_ty),
                 mask=(rows[:, None] < Lq) & (d[None, :] < D))
        tl.store(LSE + pid_bh * Lq + rows, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), mask=rows < Lq)

    @triton.jit
    def sliding_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                         Hq, Hkv, Lq, Lk, scale, sm_scale, W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
        # One key tile of kv head (b, kvh); q and dO share q's strides, dK and dV k's and v's.
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        b, kvh = pid_bh // Hkv, pid_bh % Hkv
        rep = Hq // Hkv
        j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions of this program
        d = tl.arange(0, BLOCK_D)
        kv_mask = (j[:, None] < Lk) & (d[None, :] < D)
        k = tl.load(K + b * sk_b + kvh * sk_h + j[:, None] * sk_l + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * sv_b + kvh * sv_h + j[:, None] * sv_l + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        p0 = Lk - Lq  # the first query's position
        # Query rows that see a key of the tile: positions pid_n * BLOCK_N .. + BLOCK_N - 1 + W - 1.
        lo = tl.maximum(pid_n * BLOCK_N - p0, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(pid_n * BLOCK_N + BLOCK_N - 1 + W - p0, Lq)
        for hh in range(0, rep):
            h = kvh * rep + hh
            for start in range(lo, hi, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                pos = p0 + rows
                q_mask = (rows[:, None] < Lq) & (d[None, :] < D)
                q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + d[None, :], mask=q_mask, other=0.0)
                do = tl.load(DO + b * sq_b + h * sq_h + rows[:, None] * sq_l + d[None, :], mask=q_mask, other=0.0)
                if DOT_F32:
                    q, do = q.to(tl.float32), do.to(tl.float32)
                lse = tl.load(LSE + (b * Hq + h) * Lq + rows, mask=rows < Lq, other=0.0)
                delta = tl.load(DELTA + (b * Hq + h) * Lq + rows, mask=rows < Lq, other=0.0)
                s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_M, BLOCK_N), log2 units
                visible = ((j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - W) & (j[None, :] < Lk)
                           & (rows[:, None] < Lq))
                p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        tl.store(DK + b * sk_b + kvh * sk_h + j[:, None] * sk_l + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(DV + b * sv_b + kvh * sv_h + j[:, None] * sv_l + d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def sliding_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                       Hq, Hkv, Lq, Lk, scale, sm_scale, W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
        # One query tile of head (b, h), walking the key tiles of its band as the forward does.
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // Hq, pid_bh % Hq
        kvh = h // (Hq // Hkv)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pos = Lk - Lq + rows
        d = tl.arange(0, BLOCK_D)
        q_mask = (rows[:, None] < Lq) & (d[None, :] < D)
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b * sq_b + h * sq_h + rows[:, None] * sq_l + d[None, :], mask=q_mask, other=0.0)
        if DOT_F32:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse = tl.load(LSE + pid_bh * Lq + rows, mask=rows < Lq, other=0.0)
        delta = tl.load(DELTA + pid_bh * Lq + rows, mask=rows < Lq, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        first = Lk - Lq + pid_m * BLOCK_M - W + 1
        lo = tl.maximum(first, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(Lk - Lq + (pid_m + 1) * BLOCK_M, Lk)
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            kv_mask = (j[:, None] < Lk) & (d[None, :] < D)
            k = tl.load(K + b * sk_b + kvh * sk_h + j[:, None] * sk_l + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + b * sv_b + kvh * sv_h + j[:, None] * sv_l + d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            visible = ((j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - W) & (j[None, :] < Lk)
                       & (rows[:, None] < Lq))
            p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + b * sq_b + h * sq_h + rows[:, None] * sq_l + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=q_mask)

    return sliding_fwd, sliding_bwd_dkdv, sliding_bwd_dq


def _triton(q, k, v, window: int, scale: float, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """The Triton kernel, differentiable: one program per (BLOCK_M query rows, batch x head)."""
    return _TritonSliding.apply(q, k, v, window, scale, block_m, block_n)


class _TritonSliding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale, block_m, block_n):
        import triton
        B, Hq, Lq, D = q.shape
        q, k, v = (x.contiguous() for x in (q, k, v))  # dO and dQ then share q's strides
        out = torch.empty_like(q)
        lse = torch.empty(B * Hq, Lq, dtype=torch.float32, device=q.device)
        ctx.meta = _meta(q, window, scale, block_m, block_n)
        _triton_kernel()[0][(triton.cdiv(Lq, block_m), B * Hq)](
            q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            Hq, k.shape[1], Lq, k.shape[2], scale * LOG2E, **ctx.meta)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        import triton
        q, k, v, out, lse = ctx.saved_tensors
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        d_out = d_out.to(q.dtype).contiguous()
        delta = (d_out.float() * out.float()).sum(-1).reshape(B * Hq, Lq)  # rowsum(dO * O)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        sizes = (Hq, Hkv, Lq, Lk, ctx.scale * LOG2E, ctx.scale)
        _, dkdv, dq_kernel = _triton_kernel()
        dkdv[(triton.cdiv(Lk, ctx.meta["BLOCK_N"]), B * Hkv)](q, k, v, d_out, lse, delta, dk, dv, *strides, *sizes,
                                                              **ctx.meta)
        dq_kernel[(triton.cdiv(Lq, ctx.meta["BLOCK_M"]), B * Hq)](q, k, v, d_out, lse, delta, dq, *strides, *sizes,
                                                                  **ctx.meta)
        return dq, dk, dv, None, None, None, None



def _meta(q, window: int, scale: float, block_m: int, block_n: int) -> dict:
    """The kernels' compile-time constants."""
    import triton
    return dict(W=window, D=q.shape[-1], BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])), BLOCK_M=block_m,
                BLOCK_N=block_n, DOT_F32=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _triton_checked(q, k, v, window: int, scale: float) -> torch.Tensor | None:
    """``_triton`` where it has been checked on this machine (``longctx.kernels``): the first use
    of a dtype, head dim and window class compares it with ``_tiles`` on a small input; a missing
    Triton, a compile or launch error or a mismatch warns once and returns None (the SDPA tiles
    answer from then on). Each instantiation is synchronised the first time it runs, so a launch
    error surfaces here."""
    dtype, D = str(q.dtype).removeprefix("torch."), q.shape[-1]
    config = (dtype, f"D={D}", f"window {kernels.window_class(window)}")
    try:
        if not kernels.check("triton", config, lambda: _fingerprint(q.device), lambda: _check_run(q, D, window), dtype):
            return None
        key = (q.dtype, D, window)
        if key in _CHECKED:
            return _triton(q, k, v, window, scale)
        out = _triton(q, k, v, window, scale)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
    except Exception as error:  # noqa: BLE001 -- a missing triton, a compile or launch failure: the SDPA path
        kernels.fail("triton", config, error)
        return None
    _CHECKED.add(key)
    return out


def _check_run(q, D: int, window: int):
    """The Triton kernels and the SDPA tiles on one small seeded input like ``q`` (GQA, a decode
    offset, a window that slides): the output and the gradients of q, k, v, flattened together."""
    Lk = min(window, 200) + 37
    g = torch.Generator().manual_seed(window)
    shapes = ((1, 4, Lk - 5, D), (1, 2, Lk, D), (1, 2, Lk, D))
    small = [torch.randn(s, generator=g).to(device=q.device, dtype=q.dtype) for s in shapes]
    d_out = torch.randn(shapes[0], generator=g).to(device=q.device, dtype=q.dtype)
    no_globals = torch.zeros(0, dtype=torch.long, device=q.device)

    def run(f):
        x = [t.clone().requires_grad_(True) for t in small]
        with torch.enable_grad():  # the first call may come from inference under torch.no_grad
            out = f(*x, window, D ** -0.5)
            out.backward(d_out)
        return torch.cat([t.float().flatten() for t in (out, *(t.grad for t in x))]).detach().cpu().numpy()
    return run(_triton), run(lambda q, k, v, w, s: _tiles(q, k, v, w, s, no_globals))


def _fingerprint(device) -> str:
    """What a verification holds for: the kernel's source, Triton's version, the device."""
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return hashlib.sha256(f"{inspect.getsource(_triton_kernel)} {triton.__version__} {name}".encode()).hexdigest()
