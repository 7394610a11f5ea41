"""Task 11: linear attention (book chapter "Task 11: Linear attention").

Katharopoulos et al. 2020, "Transformers are RNNs": replace the softmax
kernel ``exp(q . k)`` by a product of feature maps ``phi(q) . phi(k)`` with
``phi(x) = elu(x) + 1`` (positive, so every weight is). Causal attention then
becomes

    out_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),
    S_i = sum_{j <= i} phi(k_j) v_j^T   (D x Dv),   z_i = sum_{j <= i} phi(k_j)   (D),

and ``(S, z)`` is the whole past: an RNN state of fixed size. Three forms
compute the same numbers:

* quadratic: ``(phi(Q) phi(K)^T masked causal) V``, row-normalised -- the
  teaching form, ``O(L^2)``;
* chunked (prefill): inside a chunk of ``C`` tokens the masked quadratic form,
  plus what the state held before the chunk; the state takes the chunk
  *after* its rows are computed -- ``O(L C D)``, matmul-shaped;
* recurrent (decode): add ``phi(k) v^T`` to ``S`` and ``phi(k)`` to ``z``,
  then read with ``phi(q)`` -- ``O(D Dv)`` per token, whatever came before.

``eps = 1e-6`` is the paper's (``fast_transformers``'s ``LinearAttention``):
it keeps a row whose features underflowed finite. There is no ``1/sqrt(D)``:
the feature map replaces the softmax and its temperature. GQA: the state
belongs to a kv head; its query heads all read it.
"""
from __future__ import annotations

import mlx.core as mx

from longctx.checks import check_attention, check_positive_int
from longctx.techniques.linear import check_linear_state

EPS = 1e-6
SEGMENT_CHUNKS = 64  # chunks per lazy graph: bounds the chunk states alive at once


def feature_map(x: mx.array) -> mx.array:
    """``phi(x) = elu(x) + 1``, element-wise, in the dtype of ``x``. About 1 line."""
    # BEGIN SOLUTION
    return mx.where(x > 0, x + 1, mx.exp(mx.minimum(x, 0)))
    # END SOLUTION


def _grouped(q, k, v):
    """Float32 features, the query heads grouped by kv head: ``fq (B, Hkv, G, Lq, D)``,
    ``fk (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    fq = feature_map(q.astype(mx.float32)).reshape(B, Hkv, Hq // Hkv, Lq, D)
    return fq, feature_map(k.astype(mx.float32)), v.astype(mx.float32)


def empty_state(B: int, Hkv: int, D: int, Dv: int) -> tuple[mx.array, mx.array]:
    """The state before any token: ``S (B, Hkv, D, Dv)`` and ``z (B, Hkv, D)``, float32 zeros."""
    return mx.zeros((B, Hkv, D, Dv), dtype=mx.float32), mx.zeros((B, Hkv, D), dtype=mx.float32)


def linear_attention_quadratic(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """The teaching form. ``q (B, Hq, L, D)``, ``k, v (B, Hkv, L, D)`` (self-attention,
    ``Lq == Lk``, checked) -> ``(B, Hq, L, D)`` in the dtype of ``q``.

    With ``fq, fk, v = _grouped(q, k, v)``: ``A = fq fk^T`` kept where ``j <= i``,
    ``out = A v / (A.sum(-1) + EPS)``, then back to ``(B, Hq, L, D)``. About 6 lines."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    if Lq != Lk:
        raise ValueError(f"linear_attention_quadratic is self-attention: Lq must equal Lk, got {Lq} and {Lk}")
    # BEGIN SOLUTION
    fq, fk, vf = _grouped(q, k, v)
    causal = mx.arange(Lk)[None, :] <= mx.arange(Lq)[:, None]
    a = mx.where(causal, fq @ fk[:, :, None].swapaxes(-1, -2), 0.0)  # (B, Hkv, G, L, L)
    out = (a @ vf[:, :, None]) / (a.sum(axis=-1, keepdims=True) + EPS)
    return out.reshape(B, Hq, Lq, -1).astype(q.dtype)
    # END SOLUTION


def linear_attention_recurrent(q: mx.array, k: mx.array, v: mx.array,
                               state: tuple[mx.array, mx.array]) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """The RNN form, one token at a time. ``q (B, Hq, L, D)``, ``k, v (B, Hkv, L, D)``, ``state
    = (S (B, Hkv, D, Dv), z (B, Hkv, D))`` float32 (all checked) -> ``(out (B, Hq, L, D) in q's
    dtype, new state)``.

    For each token ``t``: first ``S += fk_t^T v_t`` and ``z += fk_t`` (a token sees itself),
    then ``out_t = fq_t S / (fq_t . z + EPS)``. About 11 lines."""
    state = _checked(q, k, v, state)
    # BEGIN SOLUTION
    B, Hq, L, D = q.shape
    fq, fk, vf = _grouped(q, k, v)
    S, z = state
    outs = []
    for t in range(L):
        S = S + fk[:, :, t, :, None] * vf[:, :, t, None, :]  # (B, Hkv, D, Dv)
        z = z + fk[:, :, t]
        qt = fq[:, :, :, t]  # (B, Hkv, G, D)
        outs.append((qt @ S) / ((qt * z[:, :, None]).sum(axis=-1, keepdims=True) + EPS))
    out = mx.stack(outs, axis=3)  # (B, Hkv, G, L, Dv)
    return out.reshape(B, Hq, L, -1).astype(q.dtype), (S, z)
    # END SOLUTION


def linear_attention_chunked(q: mx.array, k: mx.array, v: mx.array, state: tuple[mx.array, mx.array],
                             chunk_size: int) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """The chunk-parallel form (prefill); the same contract as ``linear_attention_recurrent``.

    Cut the ``L`` tokens into ``n = ceil(L / C)`` chunks (zero-pad the *features* ``fq, fk``
    and ``v`` to ``n C``: a padded key with ``fk = 0`` adds nothing). Per chunk: ``kv = fk^T
    v`` and ``kz = fk.sum``; the state *before* chunk ``c`` is ``S0`` plus the exclusive
    cumulative sum of ``kv`` over chunks (``mx.cumsum(..., inclusive=False)``), the same for
    ``z``. Rows: ``num = fq S_before + A v``, ``den = fq . z_before + A.sum(-1)`` with ``A
    = fq fk^T`` inside the chunk, kept where ``j <= i`` (the diagonal too); ``out = num /
    (den + EPS)``. The new state adds every chunk. About 20 lines."""
    state = _checked(q, k, v, state)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    # BEGIN SOLUTION
    B, Hq, L, D = q.shape
    Hkv, Dv, C = k.shape[1], v.shape[-1], chunk_size
    n = -(-L // C)
    fq, fk, vf = _grouped(q, k, v)
    pad = n * C - L
    fq = mx.pad(fq, [(0, 0)] * 3 + [(0, pad), (0, 0)]).reshape(B, Hkv, -1, n, C, D)
    fk = mx.pad(fk, [(0, 0)] * 2 + [(0, pad), (0, 0)]).reshape(B, Hkv, n, C, D)
    vf = mx.pad(vf, [(0, 0)] * 2 + [(0, pad), (0, 0)]).reshape(B, Hkv, n, C, Dv)
    S0, z0 = state
    kv = fk.swapaxes(-1, -2) @ vf  # (B, Hkv, n, D, Dv)
    kz = fk.sum(axis=-2)  # (B, Hkv, n, D)
    S = S0[:, :, None] + mx.cumsum(kv, axis=2, inclusive=False)  # the state before each chunk
    z = z0[:, :, None] + mx.cumsum(kz, axis=2, inclusive=False)
    causal = mx.arange(C)[None, :] <= mx.arange(C)[:, None]
    a = mx.where(causal, fq @ fk[:, :, None].swapaxes(-1, -2), 0.0)  # (B, Hkv, G, n, C, C)
    num = fq @ S[:, :, None] + a @ vf[:, :, None]  # (B, Hkv, G, n, C, Dv)
    den = (fq * z[:, :, None, :, None, :]).sum(axis=-1, keepdims=True) + a.sum(axis=-1, keepdims=True)
    out = (num / (den + EPS)).reshape(B, Hq, n * C, Dv)[:, :, :L]
    return out.astype(q.dtype), (S0 + kv.sum(axis=2), z0 + kz.sum(axis=2))
    # END SOLUTION


def linear_attention(q: mx.array, k: mx.array, v: mx.array, *, state: tuple[mx.array, mx.array] | None = None,
                     chunk_size: int = 64) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """Causal linear attention: ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` -> ``(out (B, Hq,
    Lq, D), state)``, ``state = (S (B, Hkv, D, Dv), z (B, Hkv, D))`` float32.

    ``state`` (None: empty) holds every token before this call; the call's keys come after it.
    The queries are the last ``Lq`` of the ``Lk`` new positions (the keys before them only go
    into the state). Prefill: the chunked form, ``SEGMENT_CHUNKS`` chunks per evaluated segment
    so memory stays ``O(C (C + D) + D Dv)`` beyond the inputs and the output, whatever ``Lq``;
    one token: the recurrent form.
    Given: the checks and the dispatch."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    state = empty_state(B, Hkv, D, D) if state is None else check_linear_state(state, B, Hkv, D)
    if Lq < Lk:  # the keys before the queries only go into the state
        state = _absorb(state, k[:, :, :Lk - Lq], v[:, :, :Lk - Lq])
        k, v = k[:, :, Lk - Lq:], v[:, :, Lk - Lq:]
    if Lq == 1:
        return linear_attention_recurrent(q, k, v, state)
    step = SEGMENT_CHUNKS * chunk_size
    out = mx.zeros(q.shape, dtype=q.dtype)
    for s in range(0, Lq, step):  # written in place (MLX donates out's buffer): no second copy
        out[:, :, s:s + step], state = linear_attention_chunked(q[:, :, s:s + step], k[:, :, s:s + step],
                                                                v[:, :, s:s + step], state, chunk_size)
        mx.eval(out, *state)
    return out, state


def _checked(q, k, v, state):
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    if Lq != Lk:
        raise ValueError(f"q and k must have the same length here (the keys before the queries go into the "
                         f"state first: use linear_attention), got Lq={Lq} and Lk={Lk}")
    return check_linear_state(state, B, Hkv, D)


def _absorb(state, k, v):
    """The state update alone: ``(S, z)`` after the keys ``k, v (B, Hkv, L, D)`` (in float32),
    without computing their rows: every key adds its ``phi(k)^T v`` to ``S`` and its ``phi(k)`` to
    ``z``, all ``L`` at once. About 2 lines."""
    # BEGIN SOLUTION
    fk, (S, z) = feature_map(k.astype(mx.float32)), state
    return S + fk.swapaxes(-1, -2) @ v.astype(mx.float32), z + fk.sum(axis=-2)
    # END SOLUTION


class LinearAttention:
    """``longctx bench``'s wrapper: ``(q, k, v) -> out``, from an empty state."""

    def __init__(self, chunk_size: int = 64):
        self.chunk_size = check_positive_int("chunk_size", chunk_size)

    def __call__(self, q, k, v):
        return linear_attention(q, k, v, chunk_size=self.chunk_size)[0]
