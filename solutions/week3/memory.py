"""Task 10: memory layers, FoT / LongLLaMA and the Memorizing Transformer (book chapter "Task 10: Memory layers").

Focused Transformer (Tworkowski et al. 2023, the LongLLaMA models) gives a few
layers a *memory*: the keys and values of earlier context windows. In such a
layer each query attends, in **one softmax**, to its causal local keys and to
the memory:

    scores = [q k_local^T  |  q k_mem^T] * scale   (local causal, memory masked per document)
    out    = softmax(scores) @ [v_local ; v_mem]

RoPE: local queries and keys are rotated at their positions *inside the local
window*; memory keys are stored **un-rotated** (LongLLaMA's
``rotate_as_if_first``: position 0, the identity), so a memory entry has no
distance to decay with.

Retrieval: the paper (and the Memorizing Transformer, Wu et al. 2022) keeps
each query's ``top_k`` memory entries by inner product (kNN); LongLLaMA's
released code attends to the whole memory (dense), which is ``top_k >= M``.
The Memorizing Transformer instead attends to memory and local context in two
softmaxes and mixes them with a learned per-head gate:
``g * memory_out + (1 - g) * local_out``, ``g = sigmoid(gate)``.

Crossbatch training (FoT's contribution): in a memory layer, batch entry ``i``
(a window of a document) also attends to the windows at entries ``i - 1 ..
i - extra_contexts``: the previous window of the same document (positive) and
windows of other documents (negatives). It learns to *focus*: to tell the
relevant memory keys from the distracting ones. Entries never see a later one.

``MemoryKVCache`` is LongLLaMA's windowing in mlx-lm's cache protocol: a
window's keys leave the local context for the memory after its forward (or,
while generating, when the local context is full and another token comes).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models import base
from mlx_lm.models.cache import create_attention_mask

from longctx.cachebase import LongCache
from longctx.checks import check_nonnegative_int, check_positive_int, check_scale
from longctx.techniques.memory import check_cache_options, check_memory

from .streaming import unrotate


def top_k_mask(scores: mx.array, top_k: int | None) -> mx.array:
    """``scores (..., M)`` -> bool ``(..., M)``: True where the entry is among its row's ``top_k``
    highest (every entry when ``top_k`` is None or ``>= M``). Ties at the k-th score are all kept.

    Compare each score with the row's k-th largest (``mx.partition``). About 4 lines."""
    # BEGIN SOLUTION
    M = scores.shape[-1]
    if top_k is None or top_k >= M:
        return mx.ones(scores.shape, dtype=mx.bool_)
    kth = mx.partition(scores, M - top_k, axis=-1)[..., M - top_k:M - top_k + 1]
    return scores >= kth
    # END SOLUTION


def _grouped(q, k, v, memory_keys, memory_values, memory_mask, scale):
    """Float32 scaled scores of the queries grouped by kv head (GQA; query heads ``kv * G .. kv * G
    + G - 1`` share kv head ``kv``, so ``q`` reshapes to ``(B, Hkv, G * Lq, D)``): ``local (B, Hkv,
    G * Lq, Lk)`` against the window's own keys, causal (the queries are the last ``Lq`` of the
    keys, so a query at row ``i`` sits at key position ``Lk - Lq + i``); ``memory (B, Hkv, G * Lq,
    M)`` against the memory's keys, with ``memory_mask (B, M)`` applied (False: -inf, another
    document's entry). ``scale`` defaults to ``D ** -0.5``. Set ``local`` and ``memory``. About 8 lines."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, M = k.shape[1], k.shape[2], memory_keys.shape[2]
    G = Hq // Hkv
    # BEGIN SOLUTION
    scale = D ** -0.5 if scale is None else scale
    qg = q.astype(mx.float32).reshape(B, Hkv, G * Lq, D) * scale  # query heads kv*G .. kv*G + G-1 share kv head kv
    local = qg @ k.astype(mx.float32).swapaxes(-1, -2)  # (B, Hkv, G*Lq, Lk)
    row = mx.tile(mx.arange(Lq), G)[:, None] + (Lk - Lq)  # each query's position among the keys
    local = mx.where(mx.arange(Lk)[None] <= row, local, -mx.inf)
    memory = qg @ memory_keys.astype(mx.float32).swapaxes(-1, -2)  # (B, Hkv, G*Lq, M)
    if memory_mask is not None:
        memory = mx.where(memory_mask[:, None, None, :], memory, -mx.inf)
    # END SOLUTION
    return local, memory, (B, Hq, Lq, D, Hkv, G, M)


def memory_attention(q, k, v, memory_keys, memory_values, *, top_k: int | None = None, memory_mask=None,
                     scale: float | None = None) -> mx.array:
    """One softmax over the causal local keys and the memory (FoT / LongLLaMA).

    ``q (B, Hq, Lq, D)`` rotated at local positions; ``k, v (B, Hkv, Lk, D)``, the queries being
    the last ``Lq`` of the keys; ``memory_keys``, ``memory_values (B, Hkv, M, D)``, keys un-rotated
    (``M`` may be 0: plain causal attention); ``top_k``: each query keeps its best ``top_k``
    memory entries by ``q . k``; ``memory_mask (B, M)`` bool, False hides an entry from that batch
    row (another document, padding); ``scale`` defaults to ``D ** -0.5``. Returns ``(B, Hq, Lq, D)``
    in ``q``'s dtype, computed in float32.

    ``_grouped`` gives the masked scores; keep the memory's ``top_k_mask`` entries, take one
    softmax over ``[local | memory]`` and weight ``[v ; memory_values]`` into ``out`` (float32,
    ``(B, Hkv, G * Lq, D)``; the last line reshapes it). About 5 lines."""
    check_memory(q, k, v, memory_keys, memory_values, top_k, memory_mask)
    check_scale(scale)
    local, memory, (B, Hq, Lq, D, Hkv, G, M) = _grouped(q, k, v, memory_keys, memory_values, memory_mask, scale)
    # BEGIN SOLUTION
    memory = mx.where(top_k_mask(memory, top_k), memory, -mx.inf)
    weights = mx.softmax(mx.concatenate([local, memory], axis=-1), axis=-1, precise=True)
    Lk = local.shape[-1]
    out = weights[..., :Lk] @ v.astype(mx.float32) + weights[..., Lk:] @ memory_values.astype(mx.float32)
    # END SOLUTION
    return out.reshape(B, Hq, Lq, D).astype(q.dtype)


def gated_memory_attention(q, k, v, memory_keys, memory_values, gate, *, top_k: int | None = None,
                           memory_mask=None, scale: float | None = None) -> mx.array:
    """The Memorizing Transformer's memory layer: causal local attention and attention over the
    memory, each with its own softmax, mixed per query head by ``g = sigmoid(gate)``:
    ``g * memory_out + (1 - g) * local_out``. ``gate (Hq,)`` logits (learned); other arguments
    as ``memory_attention``. A query with no visible memory entry gets ``memory_out = 0``.

    Set ``out`` (float32, ``(B, Hkv, G, Lq, D)`` or any shape that reshapes to the output's, query
    head ``h`` being ``kv * G + g``). About 8 lines."""
    check_memory(q, k, v, memory_keys, memory_values, top_k, memory_mask)
    check_scale(scale)
    if tuple(gate.shape) != (q.shape[1],):
        raise ValueError(f"gate must have shape (Hq,) = ({q.shape[1]},), got {tuple(gate.shape)}")
    local, memory, (B, Hq, Lq, D, Hkv, G, M) = _grouped(q, k, v, memory_keys, memory_values, memory_mask, scale)
    # BEGIN SOLUTION
    local_out = mx.softmax(local, axis=-1, precise=True) @ v.astype(mx.float32)
    memory = mx.where(top_k_mask(memory, top_k), memory, -mx.inf)
    seen = mx.isfinite(memory).any(axis=-1, keepdims=True)  # a row with nothing visible: 0, not NaN
    weights = mx.softmax(mx.where(seen, memory, 0.0), axis=-1, precise=True) * seen
    memory_out = weights @ memory_values.astype(mx.float32)
    g = mx.sigmoid(gate.astype(mx.float32)).reshape(1, Hkv, G, 1, 1)
    out = (g * memory_out.reshape(B, Hkv, G, Lq, D) + (1 - g) * local_out.reshape(B, Hkv, G, Lq, D))
    # END SOLUTION
    return out.reshape(B, Hq, Lq, D).astype(q.dtype)


def retrieve(queries, memory_keys, top_k: int, *, memory_mask=None, index: str = "exact") -> mx.array:
    """The kNN step alone: for every query its ``top_k`` memory entries by inner product, best
    first. ``queries (B, Hq, Lq, D)``, ``memory_keys (B, Hkv, M, D)`` -> int32 ``(B, Hq, Lq,
    min(top_k, M))``. ``index="faiss"`` searches with a ``faiss.IndexFlatIP`` per (batch, kv head)
    instead (the ``memory`` extra; the same sets on inputs without ties), for large memories."""
    from longctx.knn import check_index, faiss_search
    check_positive_int("top_k", top_k)
    check_index(index)
    if memory_mask is not None:
        raise ValueError("memory_mask is not supported by retrieve: search each document's memory on its own")
    B, Hq, Lq, D = queries.shape
    Hkv, M = memory_keys.shape[1], memory_keys.shape[2]
    k = min(top_k, M)
    qg = queries.astype(mx.float32).reshape(B, Hkv, (Hq // Hkv) * Lq, D)
    if index == "faiss":
        found = faiss_search(np.array(qg), np.array(memory_keys.astype(mx.float32)), k)
        return mx.array(found).reshape(B, Hq, Lq, k)
    scores = qg @ memory_keys.astype(mx.float32).swapaxes(-1, -2)
    order = mx.argsort(-scores, axis=-1)[..., :k]
    return order.astype(mx.int32).reshape(B, Hq, Lq, k)


def crossbatch_selector(batch_size: int, extra_contexts: int) -> tuple[mx.array, mx.array]:
    """FoT's crossbatch: which batch entries entry ``i`` attends to besides its own window.
    Returns ``index (batch_size, extra_contexts)`` int32, entry ``i``'s row being ``i - 1, i - 2,
    .., i - extra_contexts``, and ``valid`` (same shape, bool): False where the index is below 0
    (no entry there; the index is then clipped to 0). About 3 lines."""
    batch_size = check_positive_int("batch_size", batch_size)
    extra_contexts = check_nonnegative_int("extra_contexts", extra_contexts)
    # BEGIN SOLUTION
    index = mx.arange(batch_size)[:, None] - mx.arange(1, extra_contexts + 1)[None]
    return mx.maximum(index, 0).astype(mx.int32), index >= 0
    # END SOLUTION


def crossbatch_attention(q, k, v, raw_keys, extra_contexts: int, *, scale: float | None = None) -> mx.array:
    """The memory layer while training with crossbatch: ``q, k, v (B, H, L, D)`` (rotated at local
    positions), ``raw_keys`` the same keys un-rotated. Entry ``i``'s memory is the un-rotated keys
    and the values of entries ``crossbatch_selector(B, extra_contexts)``; one softmax over its own
    window (causal) and that memory, differentiable end to end. Gather each entry's memory,
    ``memory_keys``, ``memory_values (B, Hkv, d * L, D)`` with ``d = extra_contexts`` (the selected
    entries' windows one after another), and its ``memory_mask (B, d * L)`` (an invalid selector
    slot hides its whole window). About 6 lines."""
    B, Hkv, L, D = k.shape
    # BEGIN SOLUTION
    index, valid = crossbatch_selector(B, extra_contexts)
    d = index.shape[1]
    memory_keys = raw_keys[index].transpose(0, 2, 1, 3, 4).reshape(B, Hkv, d * L, D)  # (B, d, Hkv, L, D) ->
    memory_values = v[index].transpose(0, 2, 1, 3, 4).reshape(B, Hkv, d * L, D)
    memory_mask = mx.repeat(valid, L, axis=1)  # (B, d * L)
    # END SOLUTION
    return memory_attention(q, k, v, memory_keys, memory_values, memory_mask=memory_mask, scale=scale)


class MemoryAttention:
    """The memory path on attention inputs (``longctx bench``): ``q, k, v (B, H, L, D)`` in windows
    of ``context_length``; each window attends to itself causally and to all earlier windows as
    memory (``top_k`` entries per query). Dense memory (``top_k=None``) is causal attention,
    computed one window at a time."""

    def __init__(self, context_length: int = 512, top_k: int | None = None, scale: float | None = None):
        self.context_length = check_positive_int("context_length", context_length)
        self.top_k = None if top_k is None else check_positive_int("top_k", top_k)
        self.scale = check_scale(scale)

    def __call__(self, q, k, v) -> mx.array:
        L, C, outs = k.shape[2], self.context_length, []
        if q.shape[2] != L:
            raise ValueError(f"q and k must have the same length (self-attention), got {q.shape[2]} and {L}")
        for s in range(0, L, C):
            e = min(L, s + C)
            outs.append(memory_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], k[:, :, :s], v[:, :, :s],
                                         top_k=self.top_k, scale=self.scale))
            mx.eval(outs[-1])  # one window's scores alive at a time
        return mx.concatenate(outs, axis=2)


class MemoryKVCache(LongCache):
    """LongLLaMA's caches of one layer in mlx-lm's cache protocol: a local context of at most
    ``context_length`` entries (rotated at their local positions, as mlx-lm stores keys), and a
    memory of at most ``memory_size`` entries (un-rotated keys and values; the oldest leave first;
    ``memory_size=0``: a layer without memory, whose old windows are dropped).

    ``flush()`` moves the local context to the memory (``LongContextQwen3`` calls it after each
    window of a long input, ``longctx.techniques.memory.memory_windows``); a full local context flushes by
    itself when the next token comes, so generation never exceeds ``context_length`` local
    entries. ``last_context_length`` is the number of a prompt's last tokens kept local for
    generation. ``top_k``: each query's memory entries (None: all, as LongLLaMA's code).
    ``rope``: the layer's RoPE (to un-rotate keys on their way to memory)."""

    def __init__(self, memory_size: int = 65536, last_context_length: int = 256, top_k: int | None = None, *,
                 context_length: int = 512, rope=None):
        self.memory_size, self.last_context_length, self.top_k, self.context_length = check_cache_options(
            memory_size, last_context_length, top_k, context_length)
        if rope is not None and not (hasattr(rope, "dims") and hasattr(rope, "traditional")):
            raise ValueError(f"rope must be a RoPE module with dims and traditional, got {type(rope).__name__}")
        self.rope = rope
        self.keys = self.values = None  # the local context (B, Hkv, n, D), keys rotated at 0 .. n-1
        self.memory_keys = self.memory_values = None  # (B, Hkv, M, D), keys un-rotated
        self.tokens_seen = 0

    @property
    def local_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def memory_length(self) -> int:
        return 0 if self.memory_keys is None else self.memory_keys.shape[2]

    @property
    def offset(self) -> int:
        """The local position the next token is rotated at: 0 once the local context is full
        (it moves to memory before that token joins, as LongLLaMA's generation does)."""
        n = self.local_length
        return 0 if n >= self.context_length else n

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """``keys``, ``values (B, Hkv, S, D)``, keys rotated by the model at ``self.offset``;
        returns the local context with them (what the queries attend to besides the memory).

        A full local context (``local_length >= context_length``) first moves to memory
        (``self.flush()``); then append the new entries to ``self.keys``/``self.values``. About
        7 lines."""
        S = keys.shape[2]
        # BEGIN SOLUTION
        if self.local_length >= self.context_length:
            self.flush()
        if self.keys is None or self.local_length == 0:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        # END SOLUTION
        if self.local_length > self.context_length:
            raise ValueError(f"a memory cache takes at most context_length={self.context_length} local entries "
                             f"(LongLLaMA's windows), got {self.local_length}: feed windows through "
                             f"LongContextQwen3 or with prefill_step_size <= {self.context_length - self.offset}")
        self.tokens_seen += S
        return self.keys, self.values

    def flush(self) -> None:
        """Move the local context to the memory: keys un-rotated (``unrotate`` at position 0),
        appended after the memory; keep the last ``memory_size`` entries (none when 0); the local
        context becomes empty. About 8 lines."""
        if self.local_length == 0:
            return
        # BEGIN SOLUTION
        if self.memory_size > 0:
            raw = self.keys if self.rope is None else unrotate(self.rope, self.keys, 0)
            if self.memory_keys is not None and self.memory_length:
                raw = mx.concatenate([self.memory_keys, raw], axis=2)
                values = mx.concatenate([self.memory_values, self.values], axis=2)
            else:
                values = self.values
            self.memory_keys, self.memory_values = raw[:, :, -self.memory_size:], values[:, :, -self.memory_size:]
        self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]
        # END SOLUTION

    def attend(self, queries, keys, values, scale, mask):
        """``LongContextQwen3``'s seam: ``memory_attention`` over the local context and the memory."""
        if self.memory_length == 0:  # mlx-lm's own attention: the base model's logits, exactly
            return base.scaled_dot_product_attention(queries, keys, values, cache=self, scale=scale, mask=mask)
        return memory_attention(queries, keys, values, self.memory_keys, self.memory_values, top_k=self.top_k,
                                scale=scale)

    def size(self) -> int:
        return self.local_length

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        # The local context is cleared into memory before the window's next token: the next position, not size.
        return create_attention_mask(N, offset=self.offset, return_array=return_array, window_size=window_size)

    @property
    def state(self):
        if self.keys is None:
            return ()
        if self.memory_keys is None:
            return self.keys, self.values
        return self.keys, self.values, self.memory_keys, self.memory_values

    @state.setter
    def state(self, v):
        v = tuple(v) + (None,) * (4 - len(v))
        self.keys, self.values, self.memory_keys, self.memory_values = v

    @property
    def meta_state(self):
        return tuple(map(str, (self.memory_size, self.last_context_length, self.top_k or 0, self.context_length,
                               self.tokens_seen)))

    @meta_state.setter
    def meta_state(self, v):
        size, last, top_k, context, seen = map(int, v)
        self.memory_size, self.last_context_length, self.top_k = size, last, top_k or None
        self.context_length, self.tokens_seen = context, seen


__all__ = ["MemoryAttention", "MemoryKVCache", "crossbatch_attention", "crossbatch_selector", "gated_memory_attention",
           "memory_attention", "retrieve", "top_k_mask"]
