# Learner stub for Task 3, generated from solutions/week3/ring.py by `longctx stubs`.
# Replace each `raise NotImplementedError(...)` with your code; grade it with
#     pytest labs/week3 --task 3
"""Task 3: ring attention (book chapter "Ring attention").

The sequence is cut into ``ring_size`` shards (shard ``s`` holds positions
``s*n .. s*n + n - 1``), one per device. Each device keeps its query shard and
passes key/value shards around the ring; after ``ring_size`` steps every query
shard has met every kv shard (Liu et al. 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context"). A step's partial result is the pair
``(out, lse)``: ``out`` normalised by its own softmax denominator, ``lse`` the
log of that denominator. Two partials over disjoint key sets merge exactly::

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

which is associative and commutative, so steps may arrive in any order.

``RingAttention.__call__`` simulates the ring in one process; scores are
computed in tiles of ``block_size`` keys, so peak memory is
``(L / ring_size) * block_size`` scores. ``ring_attention_distributed`` runs
the same steps across real processes with ``mx.distributed.send/recv``
(``mlx.launch --backend ring -n P -- python script.py``).
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from longctx.checks import check_attention, check_choice, check_nonnegative_int, check_positive_int, check_scale
from longctx.techniques.ring import RING_LAYOUTS, ring_shard_rows

LOG2E = math.log2(math.e)


class RingState(NamedTuple):
    out: mx.array  # (B, Hq, Lq, D) float32, normalised by the running denominator
    lse: mx.array  # (B, Hq, Lq) float32, log of the running denominator


def merge_states(a: RingState, b: RingState) -> RingState:
    """The log-sum-exp merge of two partials over disjoint keys (associative, commutative).

    ``out (B, H, n, D)`` float32, normalised; ``lse (B, H, n)``. Two empty partials
    (``lse = -inf``) merge to an empty one: zeros, never NaN. About 5 lines."""
    raise NotImplementedError("Task 3: merge_states -- see the book chapter 'Ring attention'")


def empty_state(q_block: mx.array) -> RingState:
    """The partial of no keys at all: ``out = 0``, ``lse = -inf``."""
    B, H, n, D = q_block.shape
    return RingState(mx.zeros((B, H, n, D), dtype=mx.float32), mx.full((B, H, n), -mx.inf, dtype=mx.float32))


def ring_shard(x: mx.array, rank: int, size: int, layout: str = "contiguous") -> mx.array:
    """The part of a full ``(B, H, L, D)`` sequence that rank ``rank`` of ``size`` holds.

    contiguous: chunk ``rank`` of ``size``. zigzag: chunks ``rank`` and
    ``2 * size - 1 - rank`` of ``2 * size``, so causal work is balanced.
    """
    return mx.concatenate([x[:, :, a:b] for a, b in ring_shard_rows(x.shape[2], rank, size, layout)], axis=2)


class RingAttention:
    """Exact attention over a sequence split into ``ring_size`` shards."""

    def __init__(self, ring_size: int, block_size: int = 1024, causal: bool = True,
                 scale: float | None = None):
        self.ring_size = check_positive_int("ring_size", ring_size)
        self.block_size = check_positive_int("block_size", block_size)
        self.causal = bool(causal)
        self.scale = check_scale(scale)

    def ring_attention_step(self, q_block: mx.array, k_block: mx.array, v_block: mx.array,
                            ring_position: int, state: RingState | None = None, *,
                            query_position: int = 0) -> RingState:
        """Fold kv shard ``ring_position`` into the partial of query shard ``query_position``.

        ``q_block (B, Hq, n, D)``, ``k_block, v_block (B, Hkv, n_k, D)``. With
        ``causal``: a later shard changes nothing, the diagonal is causal inside
        the block, an earlier shard is fully visible.

        Given: the checks and an empty ``state`` to start from. Yours: skip a
        later shard, then scores in tiles of at most ``block_size`` keys, each
        tile's ``(out, lse)`` merged into the state (``merge_states``). About 20 lines.
        """
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
        raise NotImplementedError("Task 3: RingAttention.ring_attention_step -- see the book chapter 'Ring attention'")

    def finalize(self, state: RingState, dtype=None) -> mx.array:
        """The attention output: the merged ``out`` (already normalised), cast to ``dtype``."""
        return state.out if dtype is None else state.out.astype(dtype)

    def __call__(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """Simulate the ring in one process: ``q, k, v`` over the whole sequence (``Lq == Lk``).

        Shards of ``ceil(L / ring_size)`` rows (the last ones shorter or empty); rank
        ``r`` at step ``t`` holds the kv shard that started on rank ``r - t``. Returns
        ``(B, Hq, L, D)`` in the dtype of ``q``. About 17 lines."""
        B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
        if Lq != Lk:
            raise ValueError(f"ring attention splits one sequence: q length must equal k length, "
                             f"got Lq={Lq} and Lk={Lk}")
        raise NotImplementedError("Task 3: RingAttention.__call__ -- see the book chapter 'Ring attention'")


def ring_attention_distributed(q: mx.array, k: mx.array, v: mx.array, group=None, *, causal: bool = True,
                               layout: str = "contiguous", block_size: int = 1024,
                               scale: float | None = None, timeout: float = 60.0) -> mx.array:
    """Ring attention across the processes of ``group`` (default: ``mx.distributed.init()``).

    Each rank passes its own shard (``ring_shard(x, rank, size, layout)`` of the
    full ``q, k, v``) and gets its shard of the output. kv shards travel to
    rank ``r + 1``; each transfer overlaps with the current shard's compute. A
    rank that dies or stops sending makes the others raise within ``timeout``
    seconds, naming it. Given (the handshake and the transport); it runs your
    ``ring_attention_step`` on every (query chunk, kv chunk) pair it meets.
    """
    B, Hq, Hkv, n, Lk, D = check_attention(q, k, v)
    check_choice("layout", layout, RING_LAYOUTS)
    if n != Lk:
        raise ValueError(f"each rank holds one shard of one sequence: q length must equal k length, "
                         f"got Lq={n} and Lk={Lk}")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout 'zigzag' holds two equal chunks per rank: the shard length must be even, got {n}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    group = mx.distributed.init() if group is None else group
    rank, size = group.rank(), group.size()
    ring = RingAttention(size if layout == "contiguous" else 2 * size, block_size, causal, scale)

    # A handshake around the ring: each rank checks that its predecessor holds
    # a shard of its own shape (recv would misread any other), and a dead or
    # silent neighbour shows up here, named, before any work is done.
    prv, nxt = (rank - 1) % size, (rank + 1) % size
    suspect = f"rank {prv} (recv) or rank {nxt} (send)"
    mine = [B, Hq, Hkv, n, D]
    if size > 1:
        theirs = _Background(lambda: _exchange(mx.array(mine), group, rank, size)).wait(
            timeout, f"rank {rank}, handshake", suspect).tolist()
        if theirs != mine:
            raise ValueError(f"every rank must hold a shard of one shape (B, Hq, Hkv, n, D): rank {rank} has "
                             f"{mine} but rank {prv} has {theirs}")

    def chunks(x, owner):  # (shard index in the ring's numbering, rows) pairs a rank holds
        if layout == "contiguous":
            return [(owner, x)]
        h = x.shape[2] // 2
        return [(owner, x[:, :, :h]), (2 * size - 1 - owner, x[:, :, h:])]

    def pass_on(x, what):
        """Send ``x`` to rank + 1 and return what rank - 1 sent, within the deadline. Called inside
        MLX's backward pass, where an array made on another thread breaks the transformation's
        bookkeeping: the helper thread gets and gives back host copies (numpy), never a graph."""
        host = np.array(x)
        got = _Background(lambda: _exchange(mx.array(host), group, rank, size)).wait(timeout, f"rank {rank}, {what}",
                                                                                    suspect)
        return mx.array(np.array(got))

    @mx.custom_function
    def attend(q, k, v):
        queries = chunks(q, rank)
        states = [None] * len(queries)
        kv = mx.stack([k, v])  # (2, B, Hkv, n, D): one message per step
        mx.eval(kv)
        for step in range(size):
            owner = (rank - step) % size  # the rank this kv shard started on
            # Start passing this shard on while it is being used: transfer and compute overlap.
            transfer = _Background(lambda kv=kv: _exchange(kv, group, rank, size)) if step < size - 1 else None
            for i, (qpos, q_chunk) in enumerate(queries):
                for (kpos, k_chunk), (_, v_chunk) in zip(chunks(kv[0], owner), chunks(kv[1], owner)):
                    states[i] = ring.ring_attention_step(q_chunk, k_chunk, v_chunk, kpos, states[i],
                                                         query_position=qpos)
            if transfer is not None:
                kv = transfer.wait(timeout, f"rank {rank}, ring step {step + 1} of {size - 1}", suspect)
        return (mx.concatenate([ring.finalize(s, q.dtype) for s in states], axis=2),
                mx.concatenate([s.lse for s in states], axis=2))

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        """The ring backward (Liu et al.): each kv shard travels once more around the ring, now
        with its dK, dV accumulators; every rank adds its queries' share and passes both on,
        and one last hop brings each shard's gradient home. A pair's share is the gradient of
        ``sum(exp(lse_pair - lse) * (out_pair . dO - rowsum(dO * O)))`` with the final ``lse``
        held constant: exactly FlashAttention's ``dS = P (dP - rowsum(dO * O))`` for that pair,
        computed through your ``ring_attention_step``."""
        q, k, v = primals
        out, lse = outputs
        d_out = cotangents[0].astype(mx.float32)
        delta = mx.sum(d_out * out.astype(mx.float32), axis=-1)  # rowsum(dO * O)

        def share(q_chunk, k_chunk, v_chunk, kpos, qpos, rows):
            def surrogate(q_chunk, k_chunk, v_chunk):
                state = ring.ring_attention_step(q_chunk, k_chunk, v_chunk, kpos, None, query_position=qpos)
                w = mx.exp(state.lse - lse[:, :, rows])
                return mx.sum(w[..., None] * state.out * d_out[:, :, rows]) - mx.sum(w * delta[:, :, rows])
            return mx.grad(surrogate, argnums=(0, 1, 2))(q_chunk, k_chunk, v_chunk)

        h = q.shape[2] // 2
        queries = [(pos, x, slice(0, None) if layout == "contiguous" else (slice(0, h) if i == 0 else slice(h, None)))
                   for i, (pos, x) in enumerate(chunks(q, rank))]
        dq = [mx.zeros(x.shape, dtype=mx.float32) for _, x, _ in queries]
        message = mx.stack([k.astype(mx.float32), v.astype(mx.float32), mx.zeros(k.shape), mx.zeros(v.shape)])
        for step in range(size):
            owner = (rank - step) % size
            parts = [chunks(message[j], owner) for j in range(4)]  # k, v, dk, dv chunks
            dk, dv = [x for _, x in parts[2]], [x for _, x in parts[3]]
            for i, (qpos, q_chunk, rows) in enumerate(queries):
                for c, ((kpos, k_chunk), (_, v_chunk)) in enumerate(zip(parts[0], parts[1])):
                    if ring.causal and kpos > qpos:
                        continue  # a later shard: no share
                    g_q, g_k, g_v = share(q_chunk, k_chunk, v_chunk, kpos, qpos, rows)
                    dq[i], dk[c], dv[c] = dq[i] + g_q, dk[c] + g_k, dv[c] + g_v
            message = mx.stack([message[0], message[1], mx.concatenate(dk, axis=2), mx.concatenate(dv, axis=2)])
            mx.eval(message, dq)
            if size > 1:  # after the last step: the hop that brings each shard's gradient home
                message = pass_on(message, f"backward ring step {step + 1} of {size}")
        return (mx.concatenate(dq, axis=2).astype(q.dtype), message[2].astype(k.dtype), message[3].astype(v.dtype))

    return attend(q, k, v)[0]


class _Background:
    """Evaluate ``fn()`` on a helper thread; ``wait`` turns a hang into a ``TimeoutError``.

    MLX runs a blocked ``recv`` inside ``mx.eval`` where Python cannot
    interrupt it, so the wait happens here, with a deadline. The thread is a
    daemon: a peer that never sends must not keep this process alive.
    """

    def __init__(self, fn):
        self.result = {}
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            with mx.stream(mx.new_stream(mx.cpu)):  # MLX streams belong to one thread
                out = fn()
                mx.eval(out)
            self.result["out"] = out
        except Exception as error:  # noqa: BLE001 -- re-raised on the caller's thread by wait()
            self.result["error"] = error

    def wait(self, timeout: float, what: str, suspect: str):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"{what}: nothing from {suspect} within {timeout} s "
                               f"(did it die, or stop calling ring_attention_distributed?)")
        if "error" in self.result:
            raise RuntimeError(f"{what}: failed talking to {suspect}: {self.result['error']}") from self.result["error"]
        return self.result["out"]


def _exchange(kv, group, rank: int, size: int):
    """Send ``kv`` to ``rank + 1`` and receive the next shard from ``rank - 1``.

    Even ranks send first and odd ranks receive first: if every rank blocked
    in ``send`` at the same moment, the ring would deadlock."""
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    if rank % 2 == 0:
        mx.eval(mx.distributed.send(kv, nxt, group=group))
        return mx.distributed.recv_like(kv, prv, group=group)
    received = mx.distributed.recv_like(kv, prv, group=group)
    mx.eval(received)
    mx.eval(mx.distributed.send(kv, nxt, group=group))
    return received
