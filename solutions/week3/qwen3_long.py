"""Task 8: Tasks 1-5 inside a real Qwen3 (book chapter "Putting it into Qwen3").

``LongContextQwen3(model, strategy, **options)`` runs an mlx-lm Qwen3
(``mlx_lm.load(path)`` or ``mlx_lm.models.qwen3.Model``) with a long-context
strategy, reusing mlx-lm's model code whole. Two seams are enough:

* **The cache.** Every layer's attention calls ``cache.update_and_fetch`` and
  rotates with ``offset=cache.offset``: a strategy brings its cache (Task 4's
  ``CompressedKVCache``, Task 5's ``SinkKVCache``, mlx-lm's own
  ``RotatingKVCache`` for a window, its ``KVCache`` otherwise).
* **The attention.** mlx-lm's attention ends in
  ``scaled_dot_product_attention(queries, keys, values, cache=cache, scale=, mask=)``,
  a name each model module imports from ``mlx_lm.models.base``. Inside its
  own calls only, ``LongContextQwen3`` replaces that name in the model's
  module with ``attention``, which calls ``cache.attend(...)`` when the cache
  has one (Task 1's sliding window, Task 2's dilated levels) and mlx-lm's
  function otherwise, and puts mlx-lm's back when the call returns (or a
  ``generate`` step yields): no other model or cache is touched.

Which cache a strategy uses, and its options with their defaults, are
declared once in ``longctx.techniques``; ``make_cache`` builds
``cls(**options)`` (and passes the layer's ``rope`` to a cache that takes it).

``rope_scaling`` (any strategy): Hugging Face's dict (Task 9: ``linear``,
``dynamic``, ``yarn``, ``llama3``, ``longrope``) puts a ``ScaledRoPE`` in every
layer's ``self_attn.rope`` inside the same seam, e.g. sliding window + YaRN.
Its length (``dynamic``'s base, LongRoPE's short or long factors) is the whole
call's: the prompt for ``process_long_sequence``, prompt + ``max_new_tokens``
for ``generate``, so every chunk and every cached key share one set of
frequencies (transformers instead re-decides at each forward, and keeps the
keys it cached with the other set).

Strategies and their options (each also takes ``chunk_size``, the prefill
step, 2048 as in mlx-lm):

==============  ==============================================  =========================================
strategy        options                                         exact (base logits) while
==============  ==============================================  =========================================
full            --                                              always
sliding         window_size=4096                                L <= window_size
hierarchical    levels, dilations (Task 2's)                    L <= min(levels) with every dilation 1
streaming       sink_tokens=4, window=4096                      L <= sink_tokens + window
compressed      compression_ratio=0.5, method="snapkv", ...     always for the prompt (the cache is
                (Task 4's ``ContextCompressor`` arguments)      compressed after it, for generation)
memory          memory_layers=None (the last), memory_size,     L <= last_context_length (one window,
                last_context_length=256, top_k=None,            an empty memory)
                context_length=None (the model's max positions)
==============  ==============================================  =========================================

``memory`` (Task 10) feeds a long prompt in LongLLaMA's windows
(its registry entry's ``plan``): each window of ``context_length`` moves
to the memory of the ``memory_layers`` after its forward (the other layers
drop it); the last ``last_context_length`` tokens stay local for generation.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models import base
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.sample_utils import make_sampler

from longctx.checks import check_positive_int, check_tokens
from longctx.techniques import STRATEGIES, TECHNIQUES, check_strategy
from longctx.techniques.compressed import NEEDS_ATTENTION
from longctx.techniques.rope import rope_scaling_from_config

from .compression import CompressedKVCache, ContextCompressor
from .hierarchical import HierarchicalAttention
from .rope_scaling import ScaledRoPE, model_rope
from .sliding import SlidingWindowAttention

SAMPLING = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}


def attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention``, deferring to ``cache.attend`` when the cache has one."""
    attend = getattr(cache, "attend", None)
    if attend is None:
        return base.scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask,
                                                 sinks=sinks)
    return attend(queries, keys, values, scale, mask)


class SlidingKVCache(RotatingKVCache):
    """mlx-lm's rotating cache (the last ``window_size - 1`` entries, plus the new
    ones), attended by Task 1: ``window_size`` keys per query, in O(L * window)."""

    def __init__(self, window_size: int):
        super().__init__(max_size=window_size)

    def attend(self, queries, keys, values, scale, mask):
        """``queries (B, Hq, Lq, D)``, the ``keys``, ``values (B, Hkv, Lk, D)`` this cache
        returned, mlx-lm's ``scale`` and ``mask`` -> ``(B, Hq, Lq, D)``. About 1 line."""
        # BEGIN SOLUTION
        # A decode step gets the ring buffer out of order; one query's softmax does not care.
        return SlidingWindowAttention(self.max_size, scale)(queries, keys, values)
        # END SOLUTION


class HierarchicalKVCache(KVCache):
    """mlx-lm's plain cache, attended by Task 2's dilated levels (queries are the last of the keys)."""

    def __init__(self, levels, dilations=None):
        super().__init__()
        self.levels, self.dilations = levels, dilations

    def attend(self, queries, keys, values, scale, mask):
        """As ``SlidingKVCache.attend``, with Task 2's levels. About 1 line."""
        # BEGIN SOLUTION
        return HierarchicalAttention(self.levels, self.dilations, scale=scale)(queries, keys, values)
        # END SOLUTION


class QueryRecordingCache(CompressedKVCache):
    """Task 4's cache, keeping the prompt's queries that ``compress`` needs (H2O: all of
    them; SnapKV: the last ``observation_window``) while attending as mlx-lm does."""

    def __init__(self, **compressor_options):
        super().__init__(ContextCompressor(**compressor_options))
        self.queries = None

    def attend(self, queries, keys, values, scale, mask):
        """Record the prompt's queries in ``self.queries`` (``(B, Hq, n, D)``; H2O keeps all,
        SnapKV the last ``observation_window``; none once compressed), then attend as mlx-lm
        does (``base.scaled_dot_product_attention``). About 5 lines."""
        # BEGIN SOLUTION
        method = self.compressor.method
        if not self.compressed and method in NEEDS_ATTENTION:
            q = queries if self.queries is None else mx.concatenate([self.queries, queries], axis=2)
            self.queries = q if method == "h2o" else q[:, :, -self.compressor.observation_window:]
        return base.scaled_dot_product_attention(queries, keys, values, cache=self, scale=scale, mask=mask)
        # END SOLUTION

    def compress(self, queries=None) -> None:
        super().compress(self.queries if queries is None else queries)
        self.queries = None


class LongContextQwen3:
    """An mlx-lm Qwen3 with a long-context strategy: ``process_long_sequence`` and ``generate``."""

    def __init__(self, base_model, context_strategy: str = "hierarchical", *, rope_scaling: dict | None = None,
                 **options):
        layers = getattr(base_model, "layers", None)
        if not layers or not all(hasattr(layer, "self_attn") for layer in layers):
            raise ValueError(f"base_model must be an mlx-lm model with layers[i].self_attn (as mlx_lm.load "
                             f"returns), got {type(base_model).__name__}")
        self.model = base_model
        self.strategy, self.chunk_size, self.options = check_strategy(context_strategy, options)
        self.technique = TECHNIQUES[self.strategy]  # how to run it: options for this model, prefill plan, caches
        self.options = self.technique.fit(self.options, len(layers), base_model.args.max_position_embeddings)
        self.rope = None  # Task 9: the scaled RoPE every layer uses inside our calls
        if rope_scaling is not None:
            head_dim, theta, _, _ = model_rope(base_model)
            scaling = rope_scaling_from_config({"rope_scaling": rope_scaling,
                                                "max_position_embeddings": base_model.args.max_position_embeddings})
            self.rope = ScaledRoPE(head_dim, theta, scaling,
                                   traditional=getattr(layers[0].self_attn.rope, "traditional", False))
        self.modules = {sys.modules[type(layer.self_attn).__module__] for layer in layers}
        for module in self.modules:
            if getattr(module, "scaled_dot_product_attention", None) not in (base.scaled_dot_product_attention,
                                                                             attention) and self.strategy != "full":
                raise ValueError(f"{module.__name__} does not call mlx_lm.models.base.scaled_dot_product_attention:"
                                 f" context_strategy={self.strategy!r} cannot reach its attention")
        self.make_cache()  # validates the options now, not at the first call
        self.cache = None

    def make_cache(self) -> list:
        """A fresh cache per layer for this strategy: the registry's cache class, built from the options."""
        t = self.technique
        cls = t.resolve(__package__, t.cache) if t.cache else KVCache
        takes_rope = "rope" in inspect.signature(cls).parameters
        return [cls(**t.layer_options(self.options, i), **({"rope": self.rope or layer.self_attn.rope} if takes_rope
                                                           else {}))
                for i, layer in enumerate(self.model.layers)]

    @contextlib.contextmanager
    def _attention_seam(self):
        """mlx-lm's attention name points at ``attention`` (and each layer's ``rope`` at the scaled
        RoPE, with ``rope_scaling``) for the duration of one call."""
        before = {module: module.scaled_dot_product_attention for module in self.modules}
        ropes = [layer.self_attn.rope for layer in self.model.layers]
        for module in self.modules:
            module.scaled_dot_product_attention = attention
        if self.rope is not None:
            for layer in self.model.layers:
                layer.self_attn.rope = self.rope
        try:
            yield
        finally:
            for module, function in before.items():
                module.scaled_dot_product_attention = function
            for layer, rope in zip(self.model.layers, ropes):
                layer.self_attn.rope = rope

    def process_long_sequence(self, tokens) -> mx.array:
        """Logits ``(1, L, vocab)`` for ``tokens`` (L ids), prefilled in chunks of
        ``chunk_size`` through this strategy's cache, kept as ``self.cache``
        (``self.make_cache()``, ``self._prefill``). About 3 lines."""
        ids = self._check_tokens(tokens)
        # BEGIN SOLUTION
        self.cache = self.make_cache()
        return self._prefill(ids, self.cache)
        # END SOLUTION

    def generate(self, tokens, max_new_tokens: int, *, cache: list | None = None, **sampling) -> Iterator[int]:
        """Token ids after the prompt ``tokens``, one at a time, through mlx-lm's
        ``generate_step`` with this strategy's cache. Greedy unless ``temperature``
        (and ``top_p``, ``top_k``, ``min_p``) say otherwise. ``cache``: continue from
        it (it holds the tokens before ``tokens``, e.g. a document's; it is advanced
        in place) instead of a fresh one.

        Prefill all but the prompt's last token (``self._prefill``), then let
        ``generate_step`` start from that token with ``prompt_cache=self.cache``,
        advancing it inside ``self._attention_seam()`` only (not while the caller
        holds a token). About 11 lines."""
        max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
        ids = self._check_tokens(tokens, max_new_tokens)
        unknown = set(sampling) - set(SAMPLING)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {sorted(unknown)}; use {sorted(SAMPLING)}")
        self._check_continued(cache)
        sampler = make_sampler(**{SAMPLING[k]: v for k, v in sampling.items()})
        self.cache = self.make_cache() if cache is None else cache
        if len(ids) == 1:  # nothing to prefill, but the prompt ends here (a compressed cache starts compressed)
            self._prefill([], self.cache, keep_logits=False)
        # BEGIN SOLUTION
        if len(ids) > 1:
            self._prefill(ids[:-1], self.cache, keep_logits=False)
        steps = generate_step(mx.array(ids[-1:]), self.model, max_tokens=max_new_tokens, sampler=sampler,
                              prompt_cache=self.cache)
        while True:
            with self._attention_seam():  # not while the caller holds the token
                token = next(steps, None)
            if token is None:
                return
            yield int(token[0])
        # END SOLUTION

    def prefill(self, tokens, cache: list | None = None) -> list:
        """The cache after ``tokens``: a fresh one, or ``cache`` continued (advanced in place).
        ``process_long_sequence`` without the logits: a document a server keeps, to be
        continued by ``generate(question, n, cache=longctx.caches.copy_cache(...))``."""
        ids = self._check_tokens(tokens)
        self._check_continued(cache)
        cache = self.make_cache() if cache is None else cache
        self._prefill(ids, cache, keep_logits=False)
        return cache

    def _prefill(self, ids: list[int], cache: list, keep_logits: bool = True) -> mx.array | None:
        logits = []
        for start, end, to_memory in self.technique.plan(len(ids), self.chunk_size, self.options):
            with self._attention_seam():
                out = self.model(mx.array(ids[start:end])[None], cache=cache)
                # The lazy graph never spans more than a chunk; without the logits, lm_head never runs.
                mx.eval(out if keep_logits else [], [c.state for c in cache])
            if keep_logits:
                logits.append(out)
            if to_memory:
                for c in cache:
                    c.flush()
        if self.technique.compress_after_prefill:
            for c in cache:
                if not c.compressed:  # a continued cache already is
                    c.compress()
        return mx.concatenate(logits, axis=1) if keep_logits else None

    def _check_continued(self, cache) -> None:
        if cache is not None and self.rope is not None:
            raise ValueError("cache: a continued cache cannot be given with rope_scaling (its frequencies are set "
                             "by the whole call's length)")

    def _check_tokens(self, tokens, new_tokens: int = 0) -> list[int]:
        """The prompt's ids, checked; the scaled RoPE's length for this call is the prompt's plus ``new_tokens``."""
        ids = check_tokens(tokens, self.model.args.vocab_size)
        if self.rope is not None:
            self.rope.seq_len = len(ids) + new_tokens
        return ids


__all__ = ["STRATEGIES", "LongContextQwen3", "attention"]
