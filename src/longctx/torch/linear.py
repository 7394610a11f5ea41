"""Task 11 in PyTorch: linear attention, the mirror of ``longctx.mlx.linear`` (read the chapter there).

Same names and semantics: ``phi(x) = elu(x) + 1``, the quadratic, chunked and
recurrent forms, ``state = (S (B, Hkv, D, D), z (B, Hkv, D))`` float32 carried
across calls. The project tests compare it with flash-linear-attention's
pure-torch references (``fla.ops.linear_attn.naive``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx.checks import check_attention, check_positive_int
from longctx.techniques.linear import check_linear_state

EPS = 1e-6
SEGMENT_CHUNKS = 64


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = elu(x) + 1``."""
    return F.elu(x) + 1


def _grouped(q, k, v):
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    fq = feature_map(q.float()).view(B, Hkv, Hq // Hkv, Lq, D)
    return fq, feature_map(k.float()), v.float()


def empty_state(B: int, Hkv: int, D: int, Dv: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(B, Hkv, D, Dv, dtype=torch.float32, device=device),
            torch.zeros(B, Hkv, D, dtype=torch.float32, device=device))


def _checked(q, k, v, state):
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    if Lq != Lk:
        raise ValueError(f"q and k must have the same length here (the keys before the queries go into the "
                         f"state first: use linear_attention), got Lq={Lq} and Lk={Lk}")
    return check_linear_state(state, B, Hkv, D)


def linear_attention_quadratic(q, k, v) -> torch.Tensor:
    """The teaching form: ``(phi(Q) phi(K)^T, causal) V``, row-normalised."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    if Lq != Lk:
        raise ValueError(f"linear_attention_quadratic is self-attention: Lq must equal Lk, got {Lq} and {Lk}")
    fq, fk, vf = _grouped(q, k, v)
    causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    a = (fq @ fk[:, :, None].transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, Hkv, G, L, L)
    out = (a @ vf[:, :, None]) / (a.sum(-1, keepdim=True) + EPS)
    return out.reshape(B, Hq, Lq, -1).to(q.dtype)


def linear_attention_recurrent(q, k, v, state):
    """The RNN form, one token at a time: add, then read."""
    S, z = _checked(q, k, v, state)
    B, Hq, L, D = q.shape
    fq, fk, vf = _grouped(q, k, v)
    outs = []
    for t in range(L):
        S = S + fk[:, :, t, :, None] * vf[:, :, t, None, :]
        z = z + fk[:, :, t]
        qt = fq[:, :, :, t]  # (B, Hkv, G, D)
        outs.append((qt @ S) / ((qt * z[:, :, None]).sum(-1, keepdim=True) + EPS))
    return torch.stack(outs, dim=3).reshape(B, Hq, L, -1).to(q.dtype), (S, z)


def linear_attention_chunked(q, k, v, state, chunk_size: int):
    """The chunk-parallel form: masked products inside a chunk, the state from before it."""
    S0, z0 = _checked(q, k, v, state)
    C = check_positive_int("chunk_size", chunk_size)
    B, Hq, L, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    n = -(-L // C)
    fq, fk, vf = _grouped(q, k, v)
    pad = n * C - L
    fq = F.pad(fq, (0, 0, 0, pad)).view(B, Hkv, -1, n, C, D)
    fk = F.pad(fk, (0, 0, 0, pad)).view(B, Hkv, n, C, D)
    vf = F.pad(vf, (0, 0, 0, pad)).view(B, Hkv, n, C, Dv)
    kv = fk.transpose(-1, -2) @ vf  # (B, Hkv, n, D, Dv)
    kz = fk.sum(-2)  # (B, Hkv, n, D)
    S = S0[:, :, None] + F.pad(kv.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :n]  # the state before each chunk
    z = z0[:, :, None] + F.pad(kz.cumsum(2), (0, 0, 1, 0))[:, :, :n]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    a = (fq @ fk[:, :, None].transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, Hkv, G, n, C, C)
    num = fq @ S[:, :, None] + a @ vf[:, :, None]
    den = (fq * z[:, :, None, :, None, :]).sum(-1, keepdim=True) + a.sum(-1, keepdim=True)
    out = (num / (den + EPS)).reshape(B, Hq, n * C, Dv)[:, :, :L]
    return out.to(q.dtype), (S0 + kv.sum(2), z0 + kz.sum(2))


def _absorb(state, k, v):
    fk, (S, z) = feature_map(k.float()), state
    return S + fk.transpose(-1, -2) @ v.float(), z + fk.sum(-2)


def linear_attention(q, k, v, *, state=None, chunk_size: int = 64):
    """Causal linear attention -> ``(out, state)``; see ``longctx.mlx.linear.linear_attention``."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    state = empty_state(B, Hkv, D, D, q.device) if state is None else check_linear_state(state, B, Hkv, D)
    if Lq < Lk:
        state = _absorb(state, k[:, :, :Lk - Lq], v[:, :, :Lk - Lq])
        k, v = k[:, :, Lk - Lq:], v[:, :, Lk - Lq:]
    if Lq == 1:
        return linear_attention_recurrent(q, k, v, state)
    step = SEGMENT_CHUNKS * chunk_size
    out = torch.empty_like(q)
    for s in range(0, Lq, step):
        out[:, :, s:s + step], state = linear_attention_chunked(q[:, :, s:s + step], k[:, :, s:s + step],
                                                                v[:, :, s:s + step], state, chunk_size)
    return out, state


class LinearAttention:
    """``longctx bench``'s wrapper: ``(q, k, v) -> out``, from an empty state."""

    def __init__(self, chunk_size: int = 64):
        self.chunk_size = check_positive_int("chunk_size", chunk_size)

    def __call__(self, q, k, v):
        return linear_attention(q, k, v, chunk_size=self.chunk_size)[0]
