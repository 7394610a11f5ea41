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
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from longctx.checks import STRATEGY_OPTIONS, check_positive_int, check_strategy, check_tokens, prefill_chunks

from .compression import NEEDS_ATTENTION, CompressedKVCache, ContextCompressor
from .hierarchical import HierarchicalAttention
from .sliding import SlidingWindowAttention
from .streaming import SinkKVCache

STRATEGIES = tuple(STRATEGY_OPTIONS)
SAMPLING = ("temperature", "top_p", "top_k", "min_p")


def attention(module, query, key, value, attention_mask, scaling=None, longctx_attend=None, **kwargs):
    """The ``"longctx"`` attention function: ``(B, H, Lq, D)`` in, ``(B, Lq, H, D)`` out, as transformers expects."""
    if longctx_attend is None:
        raise ValueError("attn_implementation 'longctx' is set by LongContextQwen3 inside its own calls only")
    return longctx_attend(module.layer_idx, query, key, value, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register("longctx", attention)


class LongContextQwen3:
    """A transformers Qwen3 with a long-context strategy: ``process_long_sequence`` and ``generate``."""

    def __init__(self, base_model, context_strategy: str = "hierarchical", **options):
        if not isinstance(base_model, PreTrainedModel) or not hasattr(base_model, "model"):
            raise ValueError(f"base_model must be a transformers causal LM (AutoModelForCausalLM), "
                             f"got {type(base_model).__name__}")
        self.model = base_model
        self.strategy, self.chunk_size, self.options = check_strategy(context_strategy, options)
        self.cache = self.make_cache()  # validates the options now, not at the first call
        self.queries: dict[int, torch.Tensor] = {}

    def make_cache(self) -> Cache:
        o, n = self.options, self.model.config.num_hidden_layers
        if self.strategy == "sliding":
            window = check_positive_int("window_size", o["window_size"])
            return Cache(layers=[DynamicSlidingWindowLayer(window) for _ in range(n)])
        if self.strategy == "hierarchical":
            HierarchicalAttention(o["levels"], o["dilations"])  # validates them
            return Cache(layers=[DynamicLayer() for _ in range(n)])
        if self.strategy == "streaming":
            return SinkKVCache(o["sink_tokens"], o["window"], rotary_emb=self.model.model.rotary_emb, num_layers=n)
        if self.strategy == "compressed":
            return CompressedKVCache(ContextCompressor(**o), num_layers=n)
        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def process_long_sequence(self, tokens) -> torch.Tensor:
        """Logits ``(1, L, vocab)``, prefilled in chunks of ``chunk_size`` through this strategy's cache."""
        ids = self._check_tokens(tokens)
        self.cache = self.make_cache()
        return self._prefill(ids)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int, **sampling) -> Iterator[int]:
        """Token ids after the prompt, one at a time; greedy unless ``temperature`` (and
        ``top_p``, ``top_k``, ``min_p``) say otherwise, with transformers' logits warpers."""
        ids = self._check_tokens(tokens)
        max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
        warpers = self._warpers(sampling)
        self.cache = self.make_cache()
        if len(ids) > 1:
            self._prefill(ids[:-1])
        seen, last = torch.tensor([ids]), torch.tensor([ids[-1:]])
        for _ in range(max_new_tokens):
            logits = self._forward(last)[:, -1].float()
            if warpers is None:
                token = logits.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial(torch.softmax(warpers(seen, logits), -1), 1)
            seen, last = torch.cat([seen, token], 1), token
            yield int(token)

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        self.queries = {}  # nothing left from an interrupted call
        chunks = prefill_chunks(len(ids), self.chunk_size)
        logits = [self._forward(torch.tensor([ids[start:end]])) for start, end in chunks]
        if self.strategy == "compressed":
            for i, layer in enumerate(self.cache.layers):
                layer.compress(self.queries.pop(i, None))
        return torch.cat(logits, 1)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.model.device)
        if self.strategy in ("full", "streaming"):
            return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True).logits
        with self._implementation("longctx"):
            return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                              longctx_attend=self._attend).logits

    def _attend(self, layer: int, q, k, v, scale):
        o = self.options
        if self.strategy == "sliding":
            return SlidingWindowAttention(o["window_size"], scale)(q, k, v)
        if self.strategy == "hierarchical":
            return HierarchicalAttention(o["levels"], o["dilations"], scale=scale)(q, k, v)
        method = o["method"]
        if not self.cache.layers[layer].compressed and method in NEEDS_ATTENTION:
            seen = q if layer not in self.queries else torch.cat([self.queries[layer], q], 2)
            self.queries[layer] = seen if method == "h2o" else seen[:, :, -o["observation_window"]:]
        Lq, Lk = q.shape[2], k.shape[2]
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)  # held entries all precede
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale,
                                                                enable_gqa=True)

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

    def _check_tokens(self, tokens) -> list[int]:
        return check_tokens(tokens, self.model.config.vocab_size)


__all__ = ["STRATEGIES", "LongContextQwen3", "attention"]
