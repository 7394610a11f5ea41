"""The Qwen3 integration in PyTorch: Tasks 1-5 inside Hugging Face transformers' Qwen3.

Same names, strategies, options and semantics as ``solutions/week3/qwen3_long.py``
(book chapter "Putting it into Qwen3"). transformers has a supported seam for
each part: attention functions are registered with ``AttentionInterface`` and
picked by ``config._attn_implementation``; caches are ``Cache`` subclasses
made of layers. ``LongContextQwen3`` registers ``"longctx"``, whose function
calls the strategy (Task 1's window, Task 2's levels, or causal attention that
records the queries Task 4's SnapKV and H2O need), and switches the model to
it only inside its own calls. transformers builds no mask for an
implementation it does not know, so no ``L x L`` mask is ever made.
``full`` and ``streaming`` keep the model's own attention: Task 5's
``SinkKVCache`` gives transformers the mask sizes it needs.

``rope_scaling`` (Task 9, any strategy) puts a ``ScaledRoPE`` in the place of
``model.model.rotary_emb`` inside our calls, its length fixed for the whole
call as in MLX.

As in MLX, each strategy's cache class (the same names: ``SlidingKVCache``,
``HierarchicalKVCache``, ``SinkKVCache``, ``QueryRecordingCache``) and its
options come from ``longctx.techniques``; a cache with an ``attend`` method
gets the ``"longctx"`` attention function.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from longctx.checks import check_positive_int, check_tokens
from longctx.techniques import STRATEGIES, TECHNIQUES, check_strategy
from longctx.techniques.compressed import NEEDS_ATTENTION
from longctx.techniques.rope import rope_scaling_from_config

from .compression import CompressedKVCache, ContextCompressor
from .hierarchical import HierarchicalAttention
from .rope_scaling import RotaryEmbedding, ScaledRoPE, model_rope
from .sliding import SlidingWindowAttention
SAMPLING = ("temperature", "top_p", "top_k", "min_p")


def attention(module, query, key, value, attention_mask, scaling=None, longctx_attend=None, **kwargs):
    """The ``"longctx"`` attention function: ``(B, H, Lq, D)`` in, ``(B, Lq, H, D)`` out, as transformers expects."""
    if longctx_attend is None:
        raise ValueError("attn_implementation 'longctx' is set by LongContextQwen3 inside its own calls only")
    return longctx_attend(module.layer_idx, query, key, value, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register("longctx", attention)


class LayerCache(Cache):
    """A model's cache made of one-layer caches that attend themselves (``MemoryKVCache``): the
    ``"longctx"`` attention function calls layer ``i``'s ``attend``; ``flush`` moves every
    layer's local context to its memory."""

    def __init__(self, layers: list):
        super().__init__(layers=layers)

    def attend(self, layer: int, q, k, v, scale):
        return self.layers[layer].attend(q, k, v, scale)

    def flush(self) -> None:
        for layer in self.layers:
            layer.flush()


class SlidingKVCache(Cache):
    """transformers' sliding-window layers (the last ``window_size - 1`` entries plus the new
    ones), attended by Task 1: ``window_size`` keys per query, in O(L * window)."""

    def __init__(self, window_size: int, *, num_layers: int):
        super().__init__(layers=[DynamicSlidingWindowLayer(window_size) for _ in range(num_layers)])
        self.window_size = window_size

    def attend(self, layer: int, q, k, v, scale):
        return SlidingWindowAttention(self.window_size, scale)(q, k, v)


class HierarchicalKVCache(Cache):
    """Plain layers, attended by Task 2's dilated levels (queries are the last of the keys)."""

    def __init__(self, levels, dilations=None, *, num_layers: int):
        super().__init__(layers=[DynamicLayer() for _ in range(num_layers)])
        self.attention = HierarchicalAttention(levels, dilations)

    def attend(self, layer: int, q, k, v, scale):
        a = self.attention
        return HierarchicalAttention(a.levels, a.dilations, scale=scale)(q, k, v)


class QueryRecordingCache(CompressedKVCache):
    """Task 4's cache, keeping the prompt's queries that ``compress`` needs (H2O: all of
    them; SnapKV: the last ``observation_window``) while attending causally."""

    def __init__(self, *, num_layers: int, **compressor_options):
        super().__init__(ContextCompressor(**compressor_options), num_layers=num_layers)
        self.compressor = self.layers[0].compressor
        self.queries: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q, k, v, scale):
        method = self.compressor.method
        if not self.layers[layer].compressed and method in NEEDS_ATTENTION:
            seen = q if layer not in self.queries else torch.cat([self.queries[layer], q], 2)
            self.queries[layer] = seen if method == "h2o" else seen[:, :, -self.compressor.observation_window:]
        Lq, Lk = q.shape[2], k.shape[2]
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)  # held entries all precede
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale,
                                                                enable_gqa=True)

    def compress(self) -> None:
        """Compress every layer with the queries it recorded."""
        for i, layer in enumerate(self.layers):
            layer.compress(self.queries.pop(i, None))


class LongContextQwen3:
    """A transformers Qwen3 with a long-context strategy: ``process_long_sequence`` and ``generate``."""

    def __init__(self, base_model, context_strategy: str = "hierarchical", *, rope_scaling: dict | None = None,
                 **options):
        if not isinstance(base_model, PreTrainedModel) or not hasattr(base_model, "model"):
            raise ValueError(f"base_model must be a transformers causal LM (AutoModelForCausalLM), "
                             f"got {type(base_model).__name__}")
        self.model = base_model
        self.strategy, self.chunk_size, self.options = check_strategy(context_strategy, options)
        self.technique = TECHNIQUES[self.strategy]  # how to run it: options for this model, prefill plan, caches
        self.options = self.technique.fit(self.options, base_model.config.num_hidden_layers,
                                          base_model.config.max_position_embeddings)
        self.rope = None  # Task 9: in the place of model.model.rotary_emb inside our calls
        if rope_scaling is not None:
            head_dim, theta, _, _ = model_rope(base_model)
            scaling = rope_scaling_from_config({"rope_scaling": rope_scaling,
                                                "max_position_embeddings": base_model.config.max_position_embeddings})
            self.rope = RotaryEmbedding(ScaledRoPE(head_dim, theta, scaling))
        self.cache = self.make_cache()  # validates the options now, not at the first call

    def make_cache(self) -> Cache:
        """A fresh cache for this strategy: the registry's cache class, built from the options. A
        class of one layer's cache (a ``DynamicLayer``, as every MLX cache is) gets one per layer,
        each with ``layer_options``, in a ``LayerCache``."""
        t, n = self.technique, self.model.config.num_hidden_layers
        if t.cache is None:
            return DynamicCache(config=self.model.config)
        cls = t.resolve(__package__, t.cache)
        rotary = self.rope or self.model.model.rotary_emb
        takes = inspect.signature(cls).parameters
        if issubclass(cls, DynamicLayer):
            rope = {"rope": rotary} if "rope" in takes else {}
            return LayerCache([cls(**t.layer_options(self.options, i), **rope) for i in range(n)])
        return cls(**self.options, num_layers=n, **({"rotary_emb": rotary} if "rotary_emb" in takes else {}))

    @torch.no_grad()
    def process_long_sequence(self, tokens) -> torch.Tensor:
        """Logits ``(1, L, vocab)``, prefilled in chunks of ``chunk_size`` through this strategy's cache."""
        ids = self._check_tokens(tokens)
        self.cache = self.make_cache()
        return self._prefill(ids)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int, *, cache: Cache | None = None, **sampling) -> Iterator[int]:
        """Token ids after the prompt, one at a time; greedy unless ``temperature`` (and
        ``top_p``, ``top_k``, ``min_p``) say otherwise, with transformers' logits warpers.
        ``cache``: continue from it (advanced in place) instead of a fresh one."""
        max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
        ids = self._check_tokens(tokens, max_new_tokens)
        warpers = self._warpers(sampling)
        self._check_continued(cache)
        self.cache = self.make_cache() if cache is None else cache
        self._prefill(ids[:-1], keep_logits=False)  # may be empty: the prompt still ends (a compressed cache compresses)
        device = self.model.device  # generated tokens stay there: no CPU tensor meets a CUDA one
        seen, last = torch.tensor([ids], device=device), torch.tensor([ids[-1:]], device=device)
        for _ in range(max_new_tokens):
            logits = self._forward(last)[:, -1].float()
            if warpers is None:
                token = logits.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial(torch.softmax(warpers(seen, logits), -1), 1)
            seen, last = torch.cat([seen, token], 1), token
            yield int(token)

    @torch.no_grad()
    def prefill(self, tokens, cache: Cache | None = None) -> Cache:
        """The cache after ``tokens``: a fresh one, or ``cache`` continued (in place), without the logits."""
        ids = self._check_tokens(tokens)
        self._check_continued(cache)
        self.cache = self.make_cache() if cache is None else cache
        self._prefill(ids, keep_logits=False)
        return self.cache

    def _prefill(self, ids: list[int], keep_logits: bool = True) -> torch.Tensor | None:
        logits = []
        for start, end, to_memory in self.technique.plan(len(ids), self.chunk_size, self.options):
            out = self._forward(torch.tensor([ids[start:end]]), None if keep_logits else 1)
            if keep_logits:
                logits.append(out)
            if to_memory:
                self.cache.flush()
        if self.technique.compress_after_prefill and not self.cache.layers[0].compressed:  # once
            self.cache.compress()
        return torch.cat(logits, 1) if keep_logits else None

    def _forward(self, ids: torch.Tensor, logits_to_keep: int | None = None) -> torch.Tensor:
        ids = ids.to(self.model.device)
        attend = getattr(self.cache, "attend", None)
        keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        with self._rotary():
            if attend is None:  # full, streaming: the model's own attention
                return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **keep).logits
            with self._implementation("longctx"):
                return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                                  longctx_attend=attend, **keep).logits

    @contextlib.contextmanager
    def _rotary(self):
        """The scaled RoPE in the place of the model's rotary embedding, for one forward."""
        before = self.model.model.rotary_emb
        if self.rope is not None:
            self.model.model.rotary_emb = self.rope
        try:
            yield
        finally:
            self.model.model.rotary_emb = before

    @contextlib.contextmanager
    def _implementation(self, name: str):
        before = self.model.config._attn_implementation
        self.model.set_attn_implementation(name)
        try:
            yield
        finally:
            self.model.set_attn_implementation(before)

    @staticmethod
    def _warpers(sampling: dict) -> LogitsProcessorList | None:
        unknown = set(sampling) - set(SAMPLING)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {sorted(unknown)}; use {sorted(SAMPLING)}")
        if not sampling.get("temperature"):
            return None
        warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling["temperature"])])
        if sampling.get("top_k"):
            warpers.append(TopKLogitsWarper(sampling["top_k"]))
        if sampling.get("top_p"):
            warpers.append(TopPLogitsWarper(sampling["top_p"]))
        if sampling.get("min_p"):
            warpers.append(MinPLogitsWarper(sampling["min_p"]))
        return warpers

    def _check_continued(self, cache) -> None:
        if cache is not None and self.rope is not None:
            raise ValueError("cache: a continued cache cannot be given with rope_scaling (its frequencies are set "
                             "by the whole call's length)")

    def _check_tokens(self, tokens, new_tokens: int = 0) -> list[int]:
        """The prompt's ids, checked; the scaled RoPE's length for this call is the prompt's plus ``new_tokens``."""
        ids = check_tokens(tokens, self.model.config.vocab_size)
        if self.rope is not None:
            self.rope.rope.seq_len = len(ids) + new_tokens
        return ids


__all__ = ["STRATEGIES", "LongContextQwen3", "attention"]
