"""Task 3 in PyTorch: ring attention, the mirror of ``longctx.mlx``.

Same names, arguments and semantics as ``solutions/week3/ring.py`` (read the
book chapter there). ``ring_attention_distributed`` passes kv shards with
``torch.distributed`` point-to-point ops (gloo on CPU, NCCL on GPU), launched
with ``torchrun --nproc-per-node P``; each transfer is posted before the
current shard's compute and waited for after it, with a deadline.
"""
from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from longctx.checks import check_attention, check_choice, check_nonnegative_int, check_positive_int, check_scale
from longctx.techniques.ring import RING_LAYOUTS, ring_shard_rows



class RingState(NamedTuple):
    out: torch.Tensor  # (B, Hq, Lq, D) float32, normalised by the running denominator
    lse: torch.Tensor  # (B, Hq, Lq) float32, log of the running denominator


def merge_states(a: RingState, b: RingState) -> RingState:
    """The log-sum-exp merge of two partials over disjoint keys (associative, commutative)."""
    lse = torch.logaddexp(a.lse, b.lse)
    safe = torch.where(lse.isinf(), 0.0, lse)
    return RingState(a.out * torch.exp(a.lse - safe)[..., None] + b.out * torch.exp(b.lse - safe)[..., None], lse)


def empty_state(q_block: torch.Tensor) -> RingState:
    B, H, n, D = q_block.shape
    return RingState(torch.zeros(B, H, n, D, device=q_block.device),
                     torch.full((B, H, n), float("-inf"), device=q_block.device))


def ring_shard(x: torch.Tensor, rank: int, size: int, layout: str = "contiguous") -> torch.Tensor:
    """The part of a full ``(B, H, L, D)`` sequence that rank ``rank`` of ``size`` holds."""
    return torch.cat([x[:, :, a:b] for a, b in ring_shard_rows(x.shape[2], rank, size, layout)], dim=2)


class RingAttention:
    """Exact attention over a sequence split into ``ring_size`` shards."""

    def __init__(self, ring_size: int, block_size: int = 1024, causal: bool = True,
                 scale: float | None = None):
        self.ring_size = check_positive_int("ring_size", ring_size)
        self.block_size = check_positive_int("block_size", block_size)
        self.causal = bool(causal)
        self.scale = check_scale(scale)

    def ring_attention_step(self, q_block, k_block, v_block, ring_position: int,
                            state: RingState | None = None, *, query_position: int = 0) -> RingState:
        """Fold kv shard ``ring_position`` into the partial of query shard ``query_position``."""
        B, Hq, Hkv, nq, nk, D = check_attention(q_block, k_block, v_block, queries_last=False)
        ring_position = check_nonnegative_int("ring_position", ring_position)
        query_position = check_nonnegative_int("query_position", query_position)
        if state is None:
            state = empty_state(q_block)
        elif tuple(state.out.shape) != (B, Hq, nq, D) or tuple(state.lse.shape) != (B, Hq, nq):
            raise ValueError(f"state must hold out {(B, Hq, nq, D)} and lse {(B, Hq, nq)}, got "
                             f"out {tuple(state.out.shape)} and lse {tuple(state.lse.shape)}")
        diagonal = self.causal and ring_position == query_position
        if diagonal and nq != nk:
            raise ValueError(f"the diagonal step needs equal q and kv shards, got {nq} and {nk}")
        if self.causal and ring_position > query_position:
            return state
        scale = D ** -0.5 if self.scale is None else self.scale
        qf = q_block.float().reshape(B, Hkv, Hq // Hkv, nq, D) * scale
        rows = torch.arange(nq, device=q_block.device)[:, None]
        for k0 in range(0, nk, self.block_size):
            k1 = min(nk, k0 + self.block_size)
            s = qf @ k_block[:, :, None, k0:k1].float().transpose(-1, -2)  # (B, Hkv, rep, nq, bk)
            if diagonal:
                s = s.masked_fill(torch.arange(k0, k1, device=s.device)[None, :] > rows, float("-inf"))
            lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - torch.where(lse.isinf(), 0.0, lse)[..., None])
            out = (p @ v_block[:, :, None, k0:k1].float()).reshape(B, Hq, nq, D)
            state = merge_states(state, RingState(out, lse.reshape(B, Hq, nq)))
        return state

    def finalize(self, state: RingState, dtype=None) -> torch.Tensor:
        return state.out if dtype is None else state.out.to(dtype)

    def __call__(self, q, k, v) -> torch.Tensor:
        """Simulate the ring in one process: ``q, k, v`` over the whole sequence (``Lq == Lk``)."""
        B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
        if Lq != Lk:
            raise ValueError(f"ring attention splits one sequence: q length must equal k length, "
                             f"got Lq={Lq} and Lk={Lk}")
        P = self.ring_size
        n = -(-Lq // P)
        outs = []
        for rank in range(P):
            q_block = q[:, :, rank * n:(rank + 1) * n]
            if q_block.shape[2] == 0:
                break
            state = None
            for step in range(P):
                src = (rank - step) % P
                if src * n >= Lk:
                    continue
                state = self.ring_attention_step(q_block, k[:, :, src * n:(src + 1) * n],
                                                 v[:, :, src * n:(src + 1) * n], src, state, query_position=rank)
            outs.append(self.finalize(state, q.dtype))
        return torch.cat(outs, dim=2)


def ring_attention_distributed(q, k, v, group=None, *, causal: bool = True, layout: str = "contiguous",
                               block_size: int = 1024, scale: float | None = None,
                               timeout: float = 60.0) -> torch.Tensor:
    """Ring attention across the processes of ``group`` (default: the default process group;
    one process when ``torch.distributed`` is not initialised). Each rank passes its own
    shard (``ring_shard``) and gets its shard of the output. Differentiable: the backward
    passes dK, dV around the ring too."""
    B, Hq, Hkv, n, Lk, D = check_attention(q, k, v)
    check_choice("layout", layout, RING_LAYOUTS)
    if n != Lk:
        raise ValueError(f"each rank holds one shard of one sequence: q length must equal k length, "
                         f"got Lq={n} and Lk={Lk}")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout 'zigzag' holds two equal chunks per rank: the shard length must be even, got {n}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    size = dist.get_world_size(group) if distributed else 1
    ring = RingAttention(size if layout == "contiguous" else 2 * size, block_size, causal, scale)
    prv, nxt = (rank - 1) % size, (rank + 1) % size
    suspect = f"rank {prv} (recv) or rank {nxt} (send)"

    def failed(error, what):  # the error, naming the two ranks this one talks to
        if "timed out" in str(error).lower():
            return TimeoutError(f"rank {rank}, {what}: nothing from {suspect} within {timeout} s "
                                f"(did it die, or stop calling ring_attention_distributed?)")
        return RuntimeError(f"rank {rank}, {what}: failed talking to {suspect}: {error}")

    def post(x, what):  # send x on to rank + 1, receive the predecessor's: returns (requests, buffer, what)
        buffer = torch.empty_like(x)
        peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        ops = [dist.P2POp(dist.isend, x, peer(nxt), group), dist.P2POp(dist.irecv, buffer, peer(prv), group)]
        try:  # a peer that already closed its connection fails the posting itself
            return dist.batch_isend_irecv(ops), buffer, what
        except RuntimeError as error:
            raise failed(error, what) from error

    def wait(pending):
        requests, buffer, what = pending
        try:
            for request in requests:
                request.wait(timeout=timedelta(seconds=timeout))
        except RuntimeError as error:
            raise failed(error, what) from error
        return buffer

    mine = torch.tensor([B, Hq, Hkv, n, D], device=q.device)
    if size > 1:
        theirs = wait(post(mine, "handshake")).tolist()
        if theirs != mine.tolist():
            raise ValueError(f"every rank must hold a shard of one shape (B, Hq, Hkv, n, D): rank {rank} has "
                             f"{mine.tolist()} but rank {prv} has {theirs}")

    def chunks(x, owner):
        if layout == "contiguous":
            return [(owner, x)]
        h = x.shape[2] // 2
        return [(owner, x[:, :, :h]), (2 * size - 1 - owner, x[:, :, h:])]

    def forward(q, k, v):
        queries = chunks(q, rank)
        states = [None] * len(queries)
        kv = torch.stack([k, v]).contiguous()
        for step in range(size):
            owner = (rank - step) % size
            pending = post(kv, f"ring step {step + 1} of {size - 1}") if step < size - 1 else None  # overlaps compute
            for i, (qpos, q_chunk) in enumerate(queries):
                for (kpos, k_chunk), (_, v_chunk) in zip(chunks(kv[0], owner), chunks(kv[1], owner)):
                    states[i] = ring.ring_attention_step(q_chunk, k_chunk, v_chunk, kpos, states[i],
                                                         query_position=qpos)
            if pending is not None:
                kv = wait(pending)
        return (torch.cat([ring.finalize(s, q.dtype) for s in states], dim=2),
                torch.cat([s.lse for s in states], dim=2))

    def backward(q, k, v, out, lse, d_out):
        """The ring backward: each kv shard travels around once more with its dK, dV
        accumulators, and one last hop brings them home (see the MLX reference)."""
        d_out = d_out.float()
        delta = (d_out * out.float()).sum(-1)  # rowsum(dO * O)
        h = q.shape[2] // 2
        rows = [slice(None)] if layout == "contiguous" else [slice(0, h), slice(h, None)]
        queries = [(pos, x, r) for (pos, x), r in zip(chunks(q, rank), rows)]
        dq = [torch.zeros(x.shape, device=x.device) for _, x, _ in queries]
        message = torch.stack([k.float(), v.float(), torch.zeros_like(k, dtype=torch.float32),
                               torch.zeros_like(v, dtype=torch.float32)]).contiguous()
        for step in range(size):
            owner = (rank - step) % size
            parts = [chunks(message[j], owner) for j in range(4)]
            dk, dv = [x.clone() for _, x in parts[2]], [x.clone() for _, x in parts[3]]
            for i, (qpos, q_chunk, r) in enumerate(queries):
                for c, ((kpos, k_chunk), (_, v_chunk)) in enumerate(zip(parts[0], parts[1])):
                    if ring.causal and kpos > qpos:
                        continue
                    inputs = [x.detach().requires_grad_(True) for x in (q_chunk, k_chunk, v_chunk)]
                    with torch.enable_grad():
                        state = ring.ring_attention_step(*inputs, kpos, None, query_position=qpos)
                        w = torch.exp(state.lse - lse[:, :, r])
                        surrogate = (w[..., None] * state.out * d_out[:, :, r]).sum() - (w * delta[:, :, r]).sum()
                        g_q, g_k, g_v = torch.autograd.grad(surrogate, inputs, allow_unused=True)
                    dq[i] += 0 if g_q is None else g_q
                    dk[c] += 0 if g_k is None else g_k
                    dv[c] += 0 if g_v is None else g_v
            message = torch.stack([message[0], message[1], torch.cat(dk, dim=2), torch.cat(dv, dim=2)]).contiguous()
            if size > 1:
                message = wait(post(message, f"backward ring step {step + 1} of {size}"))
        return torch.cat(dq, dim=2).to(q.dtype), message[2].to(k.dtype), message[3].to(v.dtype)

    class Ring(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = forward(q, k, v)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, d_out):
            return backward(*ctx.saved_tensors, d_out)

    return Ring.apply(q, k, v)
