"""Task 4: KV-cache and context compression (book chapter "Context compression").

Of ``L`` entries keep ``max(1, int(L * (1 - compression_ratio)))`` per batch row
and kv head (NVIDIA kvpress's ``compute_n_kept``): the first ``sink_tokens`` and
the last ``recent_tokens`` always, the rest of the budget to the highest
importance scores, ties to the earlier position. Kept entries stay in their
original order, with their original positions, so RoPE'd keys stay valid.

Scores (higher = keep):

* ``h2o``: attention each entry receives, summed over the queries (Zhang et al.
  2023, "H2O: Heavy-Hitter Oracle").
* ``snapkv``: attention from the last ``observation_window`` queries, averaged
  over them, average-pooled along positions with ``pool_kernel`` (zero padding
  counted), averaged over the query heads of each kv head; the observation
  window itself scores ``+inf`` (Li et al. 2024, "SnapKV"; kvpress's ``SnapKVPress``).
* ``knorm``: minus the key's L2 norm (Devoto et al. 2024; kvpress's ``KnormPress``).
* ``streaming``: the position, so the budget after the sinks goes to the most
  recent entries (Xiao et al. 2024, "StreamingLLM"; kvpress's ``StreamingLLMPress``).

Fused attention kernels do not return weights, so ``compress_kv`` computes the
attention the scores need from queries and keys, a block of queries at a time:
memory ``O(block * L)``, never ``L * L``.
"""
from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from longctx.cachebase import LongCache
from longctx.checks import check_attention, check_choice, check_nonnegative_int, check_positive_int
from longctx.techniques.compressed import COMPRESSION_METHODS, NEEDS_ATTENTION, check_ratio, n_kept

SCORE_BLOCK = 1 << 22  # floats of scores alive at once in `attention_received`


class CompressedContext(NamedTuple):
    tokens: mx.array     # the kept entries, in their original order
    positions: mx.array  # int32 original positions of the kept entries


def attention_received(queries: mx.array, keys: mx.array, scale: float | None = None) -> mx.array:
    """``sum_i softmax(q_i K^T * scale)`` over the queries, causal, GQA-aware.

    ``queries (B, Hq, Lq, D)`` are the last ``Lq`` positions of ``keys (B, Hkv, L, D)``;
    returns float32 ``(B, Hq, L)``. A block of queries at a time, so the
    score matrix alive is ``(B, Hq, block, L)``, not ``L x L`` (``SCORE_BLOCK``
    floats at most). About 15 lines.
    """
    # BEGIN SOLUTION
    B, Hq, Lq, D = queries.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    q = queries.reshape(B, Hkv, G, Lq, D).astype(mx.float32) * scale
    kt = keys.astype(mx.float32)[:, :, None].swapaxes(-1, -2)  # (B, Hkv, 1, D, L)
    block = max(1, min(Lq, SCORE_BLOCK // (B * Hq * L)))
    total = mx.zeros((B, Hkv, G, L), mx.float32)
    for start in range(0, Lq, block):
        qb = q[:, :, :, start:start + block]  # (B, Hkv, G, b, D)
        qpos = L - Lq + start + mx.arange(qb.shape[3])
        s = mx.where(mx.arange(L) <= qpos[:, None], qb @ kt, -mx.inf)  # (B, Hkv, G, b, L)
        total = total + mx.softmax(s, axis=-1, precise=True).sum(axis=-2)
        mx.eval(total)
    return total.reshape(B, Hq, L)
    # END SOLUTION


def avg_pool(x: mx.array, kernel: int) -> mx.array:
    """``avg_pool1d(kernel, stride=1, padding=kernel // 2)`` along the last axis, zeros counted
    (SnapKV's smoothing: an entry next to an important one counts too). Same shape as ``x``
    for an odd ``kernel``. About 4 lines."""
    # BEGIN SOLUTION
    pad = kernel // 2
    n = x.shape[-1]
    padded = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    return sum(padded[..., j:j + n] for j in range(kernel)) / kernel
    # END SOLUTION


def select(priority: mx.array, positions: mx.array, length: int, budget: int, sink_tokens: int,
           recent_tokens: int) -> mx.array:
    """Indices (int32, ascending) of the ``budget`` entries to keep along the last axis.

    ``positions`` are the entries' positions in a sequence of ``length``;
    positions ``< sink_tokens`` and ``>= length - recent_tokens`` are kept
    first (when they alone exceed the budget: the sinks, then the most recent),
    then the highest ``priority``, ties to the earlier entry. ``priority (..., n)``,
    ``positions (n,)`` or like ``priority``; returns ``(..., budget)``. About 12 lines.
    """
    # BEGIN SOLUTION
    n = priority.shape[-1]
    sinks = min(sink_tokens, budget)
    recent = min(recent_tokens, budget - sinks)
    protected = (positions < sinks) | (positions >= length - recent)
    p = mx.where(protected, mx.inf, priority.astype(mx.float32))
    threshold = mx.topk(p, budget, axis=-1).min(axis=-1, keepdims=True)  # the budget-th largest
    above = p > threshold
    tie = p == threshold
    room = budget - above.sum(axis=-1, keepdims=True)
    keep = above | (tie & (mx.cumsum(tie.astype(mx.int32), axis=-1) <= room))  # earlier ties first
    index = mx.arange(n)
    return mx.argsort(mx.where(keep, index, n + index), axis=-1)[..., :budget].astype(mx.int32)
    # END SOLUTION


def gather(x: mx.array, index: mx.array) -> mx.array:
    """``x (..., L, D)`` rows at ``index (..., n)`` -> ``(..., n, D)``."""
    return mx.take_along_axis(x, index[..., None], axis=-2)


class ContextCompressor:
    """Keep the most important ``1 - compression_ratio`` of a context or KV cache."""

    def __init__(self, compression_ratio: float = 0.5, *, method: str = "snapkv", sink_tokens: int = 4,
                 recent_tokens: int = 32, observation_window: int = 32, pool_kernel: int = 5):
        self.compression_ratio = check_ratio(compression_ratio)
        self.method = check_choice("method", method, COMPRESSION_METHODS)
        self.sink_tokens = check_nonnegative_int("sink_tokens", sink_tokens)
        self.recent_tokens = check_nonnegative_int("recent_tokens", recent_tokens)
        self.observation_window = check_positive_int("observation_window", observation_window)
        self.pool_kernel = check_positive_int("pool_kernel", pool_kernel)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd (avg_pool1d with padding k // 2 keeps the length), "
                             f"got {pool_kernel}")

    def compute_importance(self, tokens: mx.array, attention_weights: mx.array | None = None) -> mx.array:
        """Scores with the shape of ``tokens`` without its feature axis (``(L,)`` for ids).

        ``tokens``: ``(L,)`` ids, ``(B, L, D)`` hidden states or ``(B, H, L, D)``
        keys. ``attention_weights`` (``h2o``, ``snapkv``): softmax weights
        ``(..., Lq, L)`` whose leading axes are those of the scores without
        ``L``, with a head axis to average where the tokens have none (ids:
        ``(Lq, L)`` or ``(H, Lq, L)``; hidden: ``(B, H, Lq, L)``) or a
        multiple of theirs (keys: ``(B, Hq, Lq, L)``, GQA groups averaged).
        """
        lead, L = self._score_shape(tokens)
        groups = self._check_weights(tokens, attention_weights, lead, L)
        # BEGIN SOLUTION
        if self.method == "streaming":
            return mx.broadcast_to(mx.arange(L, dtype=mx.float32), (*lead, L))
        if self.method == "knorm":
            return -mx.sqrt(mx.square(tokens.astype(mx.float32)).sum(axis=-1))
        a = attention_weights.astype(mx.float32)
        w = min(self.observation_window, a.shape[-2])
        received = a.sum(axis=-2) if self.method == "h2o" else a[..., -w:, :].mean(axis=-2)
        return self._reduce(received.reshape(*lead, groups, L), w)
        # END SOLUTION

    def _check_weights(self, tokens, attention_weights, lead: tuple, L: int) -> int:
        """Given: check what ``method`` needs; returns how many query heads share a score row
        (``G``: the weights are read as ``(*lead, G, Lq, L)``)."""
        if self.method == "knorm" and tokens.ndim == 1:
            raise ValueError(f"method 'knorm' needs feature vectors, got tokens of shape {tuple(tokens.shape)} (ids)")
        if self.method not in NEEDS_ATTENTION:
            return 1
        if attention_weights is None:
            raise ValueError(f"method {self.method!r} needs attention_weights, got None")
        a = attention_weights
        if a.ndim not in (len(lead) + 2, len(lead) + 3) or a.shape[-1] != L:
            raise ValueError(f"attention_weights must have shape (..., Lq, {L}) for tokens "
                             f"{tuple(tokens.shape)}, got {tuple(a.shape)}")
        if a.ndim == len(lead) + 3:  # a head axis the tokens do not have: average it
            ok, groups = tuple(a.shape[:len(lead)]) == lead, a.shape[len(lead)]
        elif lead:  # keys: Hq query heads, a multiple of the Hkv kv heads
            ok = tuple(a.shape[:len(lead) - 1]) == lead[:-1] and a.shape[len(lead) - 1] % lead[-1] == 0
            groups = a.shape[len(lead) - 1] // lead[-1]
        else:
            ok, groups = True, 1
        if not ok:
            raise ValueError(f"attention_weights must have leading axes {lead} (or a multiple of the heads), "
                             f"got shape {tuple(a.shape)}")
        return groups

    def _reduce(self, received: mx.array, w: int) -> mx.array:
        """``(..., G, L)`` attention received per query head -> ``(..., L)`` scores.

        ``h2o``: the mean over the ``G`` query heads. ``snapkv``: the entries before
        the observation window (the last ``w``) pooled with ``avg_pool(pool_kernel)``,
        then averaged over the heads; the window itself scores ``+inf``. About 6 lines.
        """
        # BEGIN SOLUTION
        if self.method == "h2o":
            return received.mean(axis=-2)
        L = received.shape[-1]
        w = min(w, L)
        pooled = avg_pool(received[..., :L - w], self.pool_kernel).mean(axis=-2)
        return mx.concatenate([pooled, mx.full((*pooled.shape[:-1], w), mx.inf)], axis=-1)
        # END SOLUTION

    def compress_context(self, tokens: mx.array, importance_scores: mx.array) -> CompressedContext:
        """Keep the budget along the sequence axis: ``(L,)``, ``(B, L, D)`` or ``(B, H, L, D)``."""
        lead, L = self._score_shape(tokens)
        if tuple(importance_scores.shape) != (*lead, L):
            raise ValueError(f"importance_scores must have shape {(*lead, L)} for tokens "
                             f"{tuple(tokens.shape)}, got {tuple(importance_scores.shape)}")
        index = self._keep(importance_scores, L)
        kept = mx.take(tokens, index) if tokens.ndim == 1 else gather(tokens, index)
        return CompressedContext(kept, index)

    def compress_kv(self, keys: mx.array, values: mx.array,
                    queries: mx.array | None = None) -> tuple[mx.array, mx.array, mx.array]:
        """``(B, H, L, D)`` keys and values -> the kept ``(k, v, positions (B, H, n))``.

        ``queries (B, Hq, Lq, D)``, the last ``Lq`` positions (after RoPE, as
        attention saw them), are needed by ``h2o`` and ``snapkv`` (only the last
        ``observation_window`` of them are read).
        """
        scores = self.kv_importance(keys, values, queries)
        index = self._keep(scores, keys.shape[2])
        return gather(keys, index), gather(values, index), index

    def kv_importance(self, keys: mx.array, values: mx.array, queries: mx.array | None = None) -> mx.array:
        """Scores ``(B, H, L)`` for a KV cache, attention computed blockwise from ``queries``."""
        if self.method in NEEDS_ATTENTION:
            if queries is None:
                raise ValueError(f"method {self.method!r} needs queries, got None")
            check_attention(queries, keys, values)
        else:
            check_attention(keys, keys, values)
        B, H, L, _ = keys.shape
        if self.method not in NEEDS_ATTENTION:
            return self.compute_importance(keys)
        w = min(self.observation_window, queries.shape[2])
        if self.method == "snapkv":
            queries = queries[:, :, -w:]
        received = attention_received(queries, keys)  # (B, Hq, L)
        if self.method == "snapkv":
            received = received / w
        return self._reduce(received.reshape(B, H, -1, L), w)

    def _keep(self, scores: mx.array, L: int) -> mx.array:
        budget = n_kept(L, self.compression_ratio)
        return select(scores, mx.arange(L), L, budget, self.sink_tokens, self.recent_tokens)

    @staticmethod
    def _score_shape(tokens) -> tuple[tuple[int, ...], int]:
        if tokens.ndim not in (1, 3, 4) or 0 in tuple(tokens.shape):
            raise ValueError(f"tokens must be (L,) ids, (B, L, D) hidden states or (B, H, L, D) keys, "
                             f"got shape {tuple(tokens.shape)}")
        shape = tuple(tokens.shape) if tokens.ndim == 1 else tuple(tokens.shape[:-1])
        return shape[:-1], shape[-1]


class CompressedKVCache(LongCache):
    """An mlx-lm cache that compresses after prefill and stays within its budget.

    Until the first one-token update (the first decode step) it is a plain
    cache. Then, or when ``compress(queries)`` is called (``h2o`` and
    ``snapkv`` need the queries, which the cache protocol never passes), it
    keeps ``n_kept(offset)`` entries per head, and it holds that budget
    between steps (a step attends to what is held plus its new entries, then
    evicts; transformers builds the mask for that length): each new entry is
    scored (``knorm``: its key norm; ``streaming``: its position; the
    attention methods, which see no decode queries: lowest, so generated
    tokens leave once they are out of the recent window) and the least
    important unprotected entries are evicted. ``offset`` counts every token
    seen, so RoPE positions stay the true ones; ``positions`` records each
    kept entry's.

    Storage is a buffer grown in steps, like mlx-lm's ``KVCache``: a decode
    step writes its entry in place, into the slot the previous step's eviction
    freed (or at the end while the budget grows), so entries are not in
    position order (attention does not care; ``positions`` says where each came
    from).
    """

    step = 256

    def __init__(self, compressor: ContextCompressor):
        if not isinstance(compressor, ContextCompressor):
            raise ValueError(f"compressor must be a ContextCompressor, got {type(compressor).__name__}")
        self.compressor = compressor
        self._buffers = None  # keys, values, positions, scores: (B, H, capacity[, D])
        self._n = 0  # entries held (plus one, while an eviction is pending)
        self._victim = None  # (B, H) slot evicted at the last update: the next entry's (or the last one's)
        self.offset = 0
        self.compressed = False

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Given: the buffers, the offset, and when to compress; it asks ``decode_victim``
        which entry leaves at each decode step."""
        S = keys.shape[2]
        prefill_done = S == 1 and not self.compressed and self._buffers is not None
        if prefill_done and self.compressor.method in NEEDS_ATTENTION:
            raise ValueError(f"method {self.compressor.method!r} needs queries: call cache.compress(queries) "
                             "after prefill (the cache protocol never passes queries)")
        positions = mx.broadcast_to(self.offset + mx.arange(S, dtype=mx.int32), keys.shape[:3])
        self._append(keys, values, positions, self._decode_scores(keys, positions))
        self.offset += S
        fetched = self.keys, self.values  # this step attends to all it held plus the new entries
        budget = n_kept(self.offset, self.compressor.compression_ratio)
        c = self.compressor
        if prefill_done:
            self.compress()
        elif self.compressed and self._n == budget + 1:  # decode: one entry leaves, chosen now, moved later
            self._victim = self.decode_victim(self.positions, self.scores, budget)
        elif self.compressed and self._n > budget:
            self._take(mx.argsort(self.positions, axis=-1))  # position order: ties go to the earlier one
            self._take(select(self.scores, self.positions, self.offset, budget, c.sink_tokens, c.recent_tokens))
        return fetched

    def decode_victim(self, positions: mx.array, scores: mx.array, budget: int) -> mx.array:
        """The entry to evict after a decode step: ``(B, H)`` indices into the held entries.

        ``positions``, ``scores (B, H, budget + 1)``: every held entry, the new one
        included; ``self.offset`` tokens seen. The first ``sink_tokens`` and the
        last ``recent_tokens`` positions (each cut to the budget, sinks first, as in
        ``select``) are protected; of the rest, the lowest score leaves, ties to the
        later position. About 6 lines.
        """
        # BEGIN SOLUTION
        c = self.compressor
        sinks = min(c.sink_tokens, budget)
        recent = min(c.recent_tokens, budget - sinks)
        p = mx.where((positions < sinks) | (positions >= self.offset - recent), mx.inf, scores)
        lowest = p.min(axis=-1, keepdims=True)
        return mx.argmax(mx.where(p == lowest, positions, -1), axis=-1)  # ties: the later one leaves
        # END SOLUTION

    def compress(self, queries: mx.array | None = None) -> None:
        """Compress what is cached to ``n_kept(offset)`` and hold the ratio from now on."""
        if self.compressed:
            raise ValueError("compress: the cache is already compressed")
        if self._buffers is None:  # a prompt of one token leaves nothing cached: hold the ratio from now on
            self.compressed = True
            return
        self._settle()
        k, v, pos, _ = self.state
        scores = self.compressor.kv_importance(k, v, queries)
        self._store(k, v, pos, scores)
        self.compressed = True
        self._take(self.compressor._keep(scores, self.offset))

    def _decode_scores(self, keys: mx.array, positions: mx.array) -> mx.array:
        method = self.compressor.method
        if method == "knorm":
            return self.compressor.compute_importance(keys)
        if method == "streaming":
            return positions.astype(mx.float32)
        return mx.full(keys.shape[:3], -mx.inf)

    def _append(self, *new) -> None:
        S = new[0].shape[2]
        if self._victim is not None and S == 1:  # a decode step: the new entry takes the evicted one's slot
            slot = self._victim[:, :, None]
            # One scatter per buffer, into a buffer nothing else reads, so MLX writes it in place.
            self._buffers = [mx.put_along_axis(b, slot.reshape(*slot.shape, *([1] * (b.ndim - 3))), x, axis=2)
                             for b, x in zip(self._buffers, new)]
            self._victim = None
            return
        self._settle()
        if self._buffers is None:
            self._buffers, self._n = [x[:, :, :0] for x in new], 0
        if self._n + S > self._buffers[0].shape[2]:  # grow in steps, as mlx-lm's KVCache does
            grow = -(-(S + 1) // self.step) * self.step
            self._buffers = [mx.concatenate([b[:, :, :self._n], mx.zeros((*b.shape[:2], grow, *b.shape[3:]), b.dtype)],
                                            axis=2) for b in self._buffers]
        for b, x in zip(self._buffers, new):
            b[:, :, self._n:self._n + S] = x
        self._n += S

    def _settle(self) -> None:
        """Apply a pending eviction: the last entry moves into the evicted slot."""
        if self._victim is None:
            return
        self._buffers = [self._settled(b) for b in self._buffers]
        self._n -= 1
        self._victim = None

    def _settled(self, b: mx.array) -> mx.array:
        """Buffer ``b`` with the pending eviction applied (a new array: ``b`` is unchanged)."""
        last, slot = self._n - 1, self._victim[:, :, None]
        return mx.put_along_axis(b, slot.reshape(*slot.shape, *([1] * (b.ndim - 3))), b[:, :, last:last + 1], axis=2)

    def _store(self, *arrays) -> None:
        self._buffers, self._n = list(arrays), arrays[0].shape[2]

    def _take(self, index: mx.array) -> None:
        k, v, pos, score = self.state
        self._store(gather(k, index), gather(v, index), mx.take_along_axis(pos, index, axis=-1),
                    mx.take_along_axis(score, index, axis=-1))

    def _held(self, i: int):
        """What the cache holds of buffer ``i``; reading never changes the buffers."""
        if self._buffers is None:
            return None
        if self._victim is None:
            return self._buffers[i][:, :, :self._n]
        return self._settled(self._buffers[i])[:, :, :self._n - 1]

    keys = property(lambda self: self._held(0))
    values = property(lambda self: self._held(1))
    positions = property(lambda self: self._held(2))  # int32 (B, H, n): where each held entry came from
    scores = property(lambda self: self._held(3))

    def size(self) -> int:
        return self._n - (self._victim is not None)

    @property
    def state(self):
        return tuple(self._held(i) for i in range(4))

    @state.setter
    def state(self, v):
        self._victim = None
        if v[0] is None:
            self._buffers, self._n = None, 0
        else:
            self._store(*v)

    @property
    def meta_state(self):
        c = self.compressor
        return tuple(map(str, (self.offset, int(self.compressed), c.compression_ratio, c.method, c.sink_tokens,
                               c.recent_tokens, c.observation_window, c.pool_kernel)))

    @meta_state.setter
    def meta_state(self, v):
        offset, compressed, ratio, method, sink, recent, window, kernel = v
        self.offset, self.compressed = int(offset), bool(int(compressed))
        self.compressor = ContextCompressor(float(ratio), method=method, sink_tokens=int(sink),
                                            recent_tokens=int(recent), observation_window=int(window),
                                            pool_kernel=int(kernel))

    @property
    def nbytes(self) -> int:
        return 0 if self._buffers is None else sum(b.nbytes for b in self._buffers)


__all__ = ["CompressedContext", "CompressedKVCache", "ContextCompressor", "attention_received", "n_kept"]
