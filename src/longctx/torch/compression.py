"""Task 4 in PyTorch: context and KV-cache compression, the mirror of ``longctx.mlx``.

Same names, arguments and semantics as ``solutions/week3/compression.py``
(read the book chapter there); ``torch.Tensor`` in and out, on CPU or CUDA.
``CompressedKVCache`` is a ``transformers`` ``Cache`` (one
``CompressedLayer`` per model layer), so it plugs into HF Qwen3 as
``model(ids, past_key_values=cache)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from longctx.checks import check_attention, check_choice, check_nonnegative_int, check_positive_int
from longctx.techniques.compressed import COMPRESSION_METHODS, NEEDS_ATTENTION, check_ratio, n_kept

SCORE_BLOCK = 1 << 22  # floats of scores alive at once in `attention_received`


class CompressedContext(NamedTuple):
    tokens: torch.Tensor     # the kept entries, in their original order
    positions: torch.Tensor  # int32 original positions of the kept entries


def attention_received(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``sum_i softmax(q_i K^T * scale)`` over the causal queries -> float32 ``(B, Hq, L)``, blockwise."""
    B, Hq, Lq, D = queries.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    q = queries.reshape(B, Hkv, G, Lq, D).float() * scale
    kt = keys.float()[:, :, None].transpose(-1, -2)  # (B, Hkv, 1, D, L)
    block = max(1, min(Lq, SCORE_BLOCK // (B * Hq * L)))
    total = torch.zeros(B, Hkv, G, L, device=keys.device)
    key_pos = torch.arange(L, device=keys.device)
    for start in range(0, Lq, block):
        qb = q[:, :, :, start:start + block]
        qpos = L - Lq + start + torch.arange(qb.shape[3], device=keys.device)
        s = (qb @ kt).masked_fill(key_pos > qpos[:, None], float("-inf"))  # (B, Hkv, G, b, L)
        total += torch.softmax(s, dim=-1).sum(dim=-2)
    return total.reshape(B, Hq, L)


def avg_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """``avg_pool1d(kernel, stride=1, padding=kernel // 2)`` along the last axis, zeros counted."""
    shape = x.shape
    return F.avg_pool1d(x.reshape(-1, 1, shape[-1]), kernel, 1, kernel // 2).reshape(shape)


def select(priority: torch.Tensor, positions: torch.Tensor, length: int, budget: int, sink_tokens: int,
           recent_tokens: int) -> torch.Tensor:
    """Indices (int32, ascending) of the ``budget`` entries to keep along the last axis."""
    n = priority.shape[-1]
    sinks = min(sink_tokens, budget)
    recent = min(recent_tokens, budget - sinks)
    protected = (positions < sinks) | (positions >= length - recent)
    p = torch.where(protected, float("inf"), priority.float())
    threshold = p.topk(budget, dim=-1).values.amin(dim=-1, keepdim=True)
    above, tie = p > threshold, p == threshold
    room = budget - above.sum(dim=-1, keepdim=True)
    keep = above | (tie & (tie.int().cumsum(dim=-1) <= room))  # earlier ties first
    index = torch.arange(n, device=priority.device).expand_as(keep)
    return torch.where(keep, index, n + index).argsort(dim=-1)[..., :budget].int()


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (..., L, D)`` rows at ``index (..., n)`` -> ``(..., n, D)``."""
    return x.gather(-2, index.long()[..., None].expand(*index.shape, x.shape[-1]))


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

    def compute_importance(self, tokens: torch.Tensor, attention_weights: torch.Tensor | None = None):
        """Scores with the shape of ``tokens`` without its feature axis (``(L,)`` for ids)."""
        lead, L = self._score_shape(tokens)
        if self.method == "streaming":
            return torch.arange(L, dtype=torch.float32, device=tokens.device).expand(*lead, L)
        if self.method == "knorm":
            if tokens.ndim == 1:
                raise ValueError("method 'knorm' needs feature vectors, got tokens of shape "
                                 f"{tuple(tokens.shape)} (ids)")
            return -torch.linalg.vector_norm(tokens.float(), dim=-1)
        if attention_weights is None:
            raise ValueError(f"method {self.method!r} needs attention_weights, got None")
        a = attention_weights
        if a.ndim not in (len(lead) + 2, len(lead) + 3) or a.shape[-1] != L:
            raise ValueError(f"attention_weights must have shape (..., Lq, {L}) for tokens "
                             f"{tuple(tokens.shape)}, got {tuple(a.shape)}")
        if a.ndim == len(lead) + 3:
            ok, groups = tuple(a.shape[:len(lead)]) == lead, a.shape[len(lead)]
        elif lead:
            ok = tuple(a.shape[:len(lead) - 1]) == lead[:-1] and a.shape[len(lead) - 1] % lead[-1] == 0
            groups = a.shape[len(lead) - 1] // lead[-1]
        else:
            ok, groups = True, 1
        if not ok:
            raise ValueError(f"attention_weights must have leading axes {lead} (or a multiple of the heads), "
                             f"got shape {tuple(a.shape)}")
        w = min(self.observation_window, a.shape[-2])
        a = a.float()
        received = a.sum(dim=-2) if self.method == "h2o" else a[..., -w:, :].mean(dim=-2)
        return self._reduce(received.reshape(*lead, groups, L), w)

    def _reduce(self, received: torch.Tensor, w: int) -> torch.Tensor:
        """``(..., G, L)`` attention received per query head -> ``(..., L)``; snapkv's window scores +inf."""
        if self.method == "h2o":
            return received.mean(dim=-2)
        L = received.shape[-1]
        w = min(w, L)
        pooled = avg_pool(received[..., :L - w], self.pool_kernel).mean(dim=-2)
        return F.pad(pooled, (0, w), value=float("inf"))

    def compress_context(self, tokens: torch.Tensor, importance_scores: torch.Tensor) -> CompressedContext:
        lead, L = self._score_shape(tokens)
        if tuple(importance_scores.shape) != (*lead, L):
            raise ValueError(f"importance_scores must have shape {(*lead, L)} for tokens "
                             f"{tuple(tokens.shape)}, got {tuple(importance_scores.shape)}")
        index = self._keep(importance_scores, L)
        kept = tokens[index.long()] if tokens.ndim == 1 else gather(tokens, index)
        return CompressedContext(kept, index)

    def compress_kv(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None):
        """``(B, H, L, D)`` keys and values -> the kept ``(k, v, positions (B, H, n))``."""
        scores = self.kv_importance(keys, values, queries)
        index = self._keep(scores, keys.shape[2])
        return gather(keys, index), gather(values, index), index

    def kv_importance(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None):
        if self.method in NEEDS_ATTENTION:
            if queries is None:
                raise ValueError(f"method {self.method!r} needs queries, got None")
            check_attention(queries, keys, values)
        else:
            check_attention(keys, keys, values)
            return self.compute_importance(keys)
        B, H, L, _ = keys.shape
        w = min(self.observation_window, queries.shape[2])
        if self.method == "snapkv":
            queries = queries[:, :, -w:]
        received = attention_received(queries, keys)
        if self.method == "snapkv":
            received = received / w
        return self._reduce(received.reshape(B, H, -1, L), w)

    def _keep(self, scores: torch.Tensor, L: int) -> torch.Tensor:
        budget = n_kept(L, self.compression_ratio)
        return select(scores, torch.arange(L, device=scores.device), L, budget, self.sink_tokens,
                      self.recent_tokens)

    @staticmethod
    def _score_shape(tokens) -> tuple[tuple[int, ...], int]:
        if tokens.ndim not in (1, 3, 4) or 0 in tuple(tokens.shape):
            raise ValueError(f"tokens must be (L,) ids, (B, L, D) hidden states or (B, H, L, D) keys, "
                             f"got shape {tuple(tokens.shape)}")
        shape = tuple(tokens.shape) if tokens.ndim == 1 else tuple(tokens.shape[:-1])
        return shape[:-1], shape[-1]


class CompressedLayer(DynamicLayer):
    """One layer of ``CompressedKVCache``: the mirror of the MLX cache's logic."""

    def __init__(self, compressor: ContextCompressor):
        super().__init__()
        self.compressor = compressor
        self.positions = self.scores = None
        self.offset = 0
        self.compressed = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        S = key_states.shape[2]
        prefill_done = S == 1 and not self.compressed and self.is_initialized
        if prefill_done and self.compressor.method in NEEDS_ATTENTION:
            raise ValueError(f"method {self.compressor.method!r} needs queries: call cache.compress(queries) "
                             "after prefill (the cache protocol never passes queries)")
        positions = (self.offset + torch.arange(S, device=key_states.device, dtype=torch.int32)).expand(
            *key_states.shape[:3])
        scores = self._decode_scores(key_states, positions)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values, self.positions, self.scores = key_states, value_states, positions, scores
        else:
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
            self.positions = torch.cat([self.positions, positions], dim=2)
            self.scores = torch.cat([self.scores, scores], dim=2)
        self.offset += S
        fetched = self.keys, self.values  # the mask was built for what was held plus the new entries
        budget = n_kept(self.offset, self.compressor.compression_ratio)
        if prefill_done:
            self.compress()
        elif self.compressed and self.keys.shape[2] > budget:
            c = self.compressor
            self._take(select(self.scores, self.positions, self.offset, budget, c.sink_tokens, c.recent_tokens))
        return fetched

    def compress(self, queries: torch.Tensor | None = None) -> None:
        if self.compressed:
            raise ValueError("compress: the cache is already compressed")
        if not self.is_initialized:  # a prompt of one token leaves nothing cached: hold the ratio from now on
            self.compressed = True
            return
        self.scores = self.compressor.kv_importance(self.keys, self.values, queries)
        self.compressed = True
        self._take(self.compressor._keep(self.scores, self.offset))

    def _decode_scores(self, keys, positions):
        if self.compressor.method == "knorm":
            return self.compressor.compute_importance(keys)
        if self.compressor.method == "streaming":
            return positions.float()
        return torch.full(keys.shape[:3], float("-inf"), device=keys.device)

    def _take(self, index: torch.Tensor) -> None:
        self.keys, self.values = gather(self.keys, index), gather(self.values, index)
        self.positions = self.positions.gather(-1, index.long())
        self.scores = self.scores.gather(-1, index.long())

    def get_seq_length(self) -> int:
        return self.offset  # the true position count: HF derives position_ids from it

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.keys.shape[2] if self.is_initialized else 0
        return held + query_length, self.offset - held  # cached entries all precede the new ones

    @property
    def state(self):
        return self.keys, self.values, self.positions, self.scores

    @state.setter
    def state(self, v):
        self.keys, self.values, self.positions, self.scores = v
        self.is_initialized = self.keys is not None

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


class CompressedKVCache(Cache):
    """A ``transformers`` cache that compresses after prefill and stays within its budget.

    ``num_layers`` makes the layers up front (to restore saved states);
    otherwise they are made as the model first reaches them.
    """

    def __init__(self, compressor: ContextCompressor, *, num_layers: int | None = None):
        if not isinstance(compressor, ContextCompressor):
            raise ValueError(f"compressor must be a ContextCompressor, got {type(compressor).__name__}")
        if num_layers is None:
            super().__init__(layer_class_to_replicate=lambda: CompressedLayer(compressor))
        else:
            num_layers = check_positive_int("num_layers", num_layers)
            super().__init__(layers=[CompressedLayer(compressor) for _ in range(num_layers)])


__all__ = ["CompressedContext", "CompressedKVCache", "CompressedLayer", "ContextCompressor", "attention_received",
           "n_kept"]
