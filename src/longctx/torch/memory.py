"""Task 10 in PyTorch: memory layers (Focused Transformer / LongLLaMA), the mirror of ``longctx.mlx``.

Same names, arguments and semantics as ``solutions/week3/memory.py`` (read the
book chapter there). ``MemoryKVCache`` is one layer's cache, as in MLX: a
``transformers`` cache layer (``DynamicLayer``), which ``LongContextQwen3`` puts
in a model cache, one per layer. HF Qwen3 takes the new tokens' positions from
``get_seq_length()``, which is the local context's length (0 once it is full:
it moves to memory before the next token joins), so keys are rotated at local
positions, as LongLLaMA does.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from longctx.checks import check_nonnegative_int, check_positive_int, check_scale
from longctx.techniques.memory import check_cache_options, check_memory

from .streaming import rotate


def top_k_mask(scores: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """``scores (..., M)`` -> bool: True among each row's ``top_k`` highest (all when None or >= M)."""
    M = scores.shape[-1]
    if top_k is None or top_k >= M:
        return torch.ones_like(scores, dtype=torch.bool)
    return scores >= scores.topk(top_k, dim=-1).values[..., -1:]


def _grouped(q, k, v, memory_keys, memory_values, memory_mask, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk, M = k.shape[1], k.shape[2], memory_keys.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    qg = q.float().reshape(B, Hkv, G * Lq, D) * scale
    local = qg @ k.float().transpose(-1, -2)  # (B, Hkv, G*Lq, Lk)
    row = torch.arange(Lq, device=q.device).repeat(G)[:, None] + (Lk - Lq)
    local = local.masked_fill(torch.arange(Lk, device=q.device)[None] > row, float("-inf"))
    memory = qg @ memory_keys.float().transpose(-1, -2)  # (B, Hkv, G*Lq, M)
    if memory_mask is not None:
        memory = memory.masked_fill(~memory_mask.bool()[:, None, None, :], float("-inf"))
    return local, memory, (B, Hq, Lq, D, Hkv, G, M)


def memory_attention(q, k, v, memory_keys, memory_values, *, top_k: int | None = None, memory_mask=None,
                     scale: float | None = None) -> torch.Tensor:
    """One softmax over the causal local keys and the memory: ``(B, Hq, Lq, D)`` in ``q``'s dtype."""
    check_memory(q, k, v, memory_keys, memory_values, top_k, memory_mask)
    check_scale(scale)
    local, memory, (B, Hq, Lq, D, Hkv, G, M) = _grouped(q, k, v, memory_keys, memory_values, memory_mask, scale)
    memory = memory.masked_fill(~top_k_mask(memory, top_k), float("-inf"))
    weights = torch.softmax(torch.cat([local, memory], dim=-1), dim=-1)
    Lk = local.shape[-1]
    out = weights[..., :Lk] @ v.float() + weights[..., Lk:] @ memory_values.float()
    return out.reshape(B, Hq, Lq, D).to(q.dtype)


def gated_memory_attention(q, k, v, memory_keys, memory_values, gate, *, top_k: int | None = None,
                           memory_mask=None, scale: float | None = None) -> torch.Tensor:
    """The Memorizing Transformer's gate: ``sigmoid(gate) * memory_out + (1 - sigmoid(gate)) * local_out``."""
    check_memory(q, k, v, memory_keys, memory_values, top_k, memory_mask)
    check_scale(scale)
    if tuple(gate.shape) != (q.shape[1],):
        raise ValueError(f"gate must have shape (Hq,) = ({q.shape[1]},), got {tuple(gate.shape)}")
    local, memory, (B, Hq, Lq, D, Hkv, G, M) = _grouped(q, k, v, memory_keys, memory_values, memory_mask, scale)
    local_out = torch.softmax(local, dim=-1) @ v.float()
    memory = memory.masked_fill(~top_k_mask(memory, top_k), float("-inf"))
    seen = torch.isfinite(memory).any(dim=-1, keepdim=True)
    weights = torch.softmax(memory.masked_fill(~seen, 0.0), dim=-1) * seen
    memory_out = weights @ memory_values.float()
    g = torch.sigmoid(gate.float()).reshape(1, Hkv, G, 1, 1)
    out = g * memory_out.reshape(B, Hkv, G, Lq, D) + (1 - g) * local_out.reshape(B, Hkv, G, Lq, D)
    return out.reshape(B, Hq, Lq, D).to(q.dtype)


def retrieve(queries, memory_keys, top_k: int, *, memory_mask=None, index: str = "exact") -> torch.Tensor:
    """Each query's ``top_k`` memory entries by inner product, best first: int32 ``(B, Hq, Lq, k)``."""
    from longctx.knn import check_index, faiss_search
    check_positive_int("top_k", top_k)
    check_index(index)
    if memory_mask is not None:
        raise ValueError("memory_mask is not supported by retrieve: search each document's memory on its own")
    B, Hq, Lq, D = queries.shape
    Hkv, M = memory_keys.shape[1], memory_keys.shape[2]
    k = min(top_k, M)
    qg = queries.float().reshape(B, Hkv, (Hq // Hkv) * Lq, D)
    if index == "faiss":
        found = faiss_search(qg.cpu().numpy(), memory_keys.float().cpu().numpy(), k)
        return torch.from_numpy(found).to(queries.device).reshape(B, Hq, Lq, k)
    scores = qg @ memory_keys.float().transpose(-1, -2)
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :k].int().reshape(B, Hq, Lq, k)


def crossbatch_selector(batch_size: int, extra_contexts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry ``i`` attends to entries ``i - 1 .. i - extra_contexts``: ``(index, valid)``, each
    ``(batch_size, extra_contexts)``; an index below 0 is clipped to 0 and not ``valid``."""
    batch_size = check_positive_int("batch_size", batch_size)
    extra_contexts = check_nonnegative_int("extra_contexts", extra_contexts)
    index = torch.arange(batch_size)[:, None] - torch.arange(1, extra_contexts + 1)[None]
    return index.clamp(min=0).int(), index >= 0


def crossbatch_attention(q, k, v, raw_keys, extra_contexts: int, *, scale: float | None = None) -> torch.Tensor:
    """Training with crossbatch: entry ``i``'s memory is entries ``crossbatch_selector``'s windows."""
    B, Hkv, L, D = k.shape
    index, valid = crossbatch_selector(B, extra_contexts)
    index, valid = index.to(k.device).long(), valid.to(k.device)
    d = index.shape[1]
    memory_keys = raw_keys[index].transpose(1, 2).reshape(B, Hkv, d * L, D)
    memory_values = v[index].transpose(1, 2).reshape(B, Hkv, d * L, D)
    return memory_attention(q, k, v, memory_keys, memory_values, memory_mask=valid.repeat_interleave(L, dim=1),
                            scale=scale)


class MemoryAttention:
    """The memory path on attention inputs: windows of ``context_length``, earlier windows as memory."""

    def __init__(self, context_length: int = 512, top_k: int | None = None, scale: float | None = None):
        self.context_length = check_positive_int("context_length", context_length)
        self.top_k = None if top_k is None else check_positive_int("top_k", top_k)
        self.scale = check_scale(scale)

    def __call__(self, q, k, v) -> torch.Tensor:
        L, C = k.shape[2], self.context_length
        if q.shape[2] != L:
            raise ValueError(f"q and k must have the same length (self-attention), got {q.shape[2]} and {L}")
        return torch.cat([memory_attention(q[:, :, s:s + C], k[:, :, s:s + C], v[:, :, s:s + C], k[:, :, :s],
                                           v[:, :, :s], top_k=self.top_k, scale=self.scale)
                          for s in range(0, L, C)], dim=2)


class MemoryKVCache(DynamicLayer):
    """LongLLaMA's caches of one layer, as the MLX class: a local context of at most
    ``context_length`` entries (``keys``, ``values``, rotated at local positions) and a memory of
    at most ``memory_size`` (un-rotated; ``memory_size=0``: a layer without memory).
    ``rope``: the model's rotary embedding (``model.model.rotary_emb``), to un-rotate keys for
    the memory."""

    def __init__(self, memory_size: int = 65536, last_context_length: int = 256, top_k: int | None = None, *,
                 context_length: int = 512, rope=None):
        super().__init__()
        self.memory_size, self.last_context_length, self.top_k, self.context_length = check_cache_options(
            memory_size, last_context_length, top_k, context_length)
        self.rotary_emb = rope
        self.memory_keys = self.memory_values = None
        self.tokens_seen = 0

    @property
    def local_length(self) -> int:
        return self.keys.shape[2] if self.is_initialized else 0

    @property
    def memory_length(self) -> int:
        return 0 if self.memory_keys is None else self.memory_keys.shape[2]

    def get_seq_length(self, *args) -> int:
        n = self.local_length
        return 0 if n >= self.context_length else n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.local_length >= self.context_length:
            self.flush()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
        if self.local_length > self.context_length:
            raise ValueError(f"a memory cache takes at most context_length={self.context_length} local entries "
                             f"(LongLLaMA's windows), got {self.local_length}: feed windows through "
                             "LongContextQwen3")
        self.tokens_seen += key_states.shape[2]
        return self.keys, self.values

    def flush(self) -> None:
        if self.local_length == 0:
            return
        if self.memory_size > 0:
            raw = self.keys if self.rotary_emb is None else rotate(self.rotary_emb, self.keys, 0, inverse=True)
            if self.memory_length:
                raw = torch.cat([self.memory_keys, raw], dim=2)
                values = torch.cat([self.memory_values, self.values], dim=2)
            else:
                values = self.values
            self.memory_keys, self.memory_values = raw[:, :, -self.memory_size:], values[:, :, -self.memory_size:]
        self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]

    def attend(self, q, k, v, scale):
        if self.memory_length == 0:
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(
                    k.shape[2] - q.shape[2]), scale=scale, enable_gqa=True)
        return memory_attention(q, k, v, self.memory_keys, self.memory_values, top_k=self.top_k, scale=scale)

    @property
    def state(self):
        if not self.is_initialized:
            return ()
        if self.memory_keys is None:
            return self.keys, self.values
        return self.keys, self.values, self.memory_keys, self.memory_values

    @state.setter
    def state(self, v):
        v = tuple(v) + (None,) * (4 - len(v))
        self.keys, self.values, self.memory_keys, self.memory_values = v
        self.is_initialized = self.keys is not None

    @property
    def meta_state(self):
        return tuple(map(str, (self.memory_size, self.last_context_length, self.top_k or 0, self.context_length,
                               self.tokens_seen)))

    @meta_state.setter
    def meta_state(self, v):
        size, last, top_k, context, seen = map(int, v)
        self.memory_size, self.last_context_length, self.top_k = size, last, top_k or None
        self.context_length, self.tokens_seen = context, seen


__all__ = ["MemoryAttention", "MemoryKVCache", "crossbatch_attention", "crossbatch_selector",
           "gated_memory_attention", "memory_attention", "retrieve", "top_k_mask"]
