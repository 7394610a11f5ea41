"""Task 5: endless streams with attention sinks (book chapter "Streaming with attention sinks").

StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with
Attention Sinks") keeps the first ``sink_tokens`` entries, which soak up the
attention a query has nowhere else to put, and a window of the most recent
``window`` entries: memory is bounded however long the stream.

The position trick: attention uses positions *inside the cache*, so after
evictions the window's keys sit right after the sinks and no position ever
exceeds ``sink_tokens + window + chunk``. mlx-lm's attention applies RoPE with
``offset=cache.offset`` before the cache sees the keys, so ``SinkKVCache``
stores keys *un-rotated* (RoPE inverted once, on the way in) and rotates the
whole cache at positions ``0 .. n-1`` on every fetch, as the paper's code does.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import mlx.core as mx

from longctx.cachebase import LongCache
from longctx.checks import check_nonnegative_int, check_positive_int
from longctx.techniques.streaming import chunk_rows


def unrotate(rope, x: mx.array, offset: int) -> mx.array:
    """Undo ``rope(x, offset)``: a rotation by ``-angle`` is the rotation by
    ``angle`` conjugated by negating the second coordinate of each pair. A
    scaled RoPE (YaRN, LongRoPE) also multiplies by its attention factor ``a``;
    ``rope`` at position 0 is ``a`` times the identity, so dividing by its square
    leaves the un-rotated, unscaled key."""
    i = mx.arange(x.shape[-1])
    second = (i % 2 == 1) if rope.traditional else (i >= rope.dims // 2)  # pairs (2j, 2j+1) or (j, j+dims/2)
    sign = mx.where(second & (i < rope.dims), -1.0, 1.0).astype(x.dtype)
    a = rope(mx.ones((1, 1, 1, x.shape[-1]), dtype=mx.float32), offset=0)[0, 0, 0, 0]
    out = rope(x * sign, offset=offset) * sign
    return out if a.item() == 1.0 else (out / (a * a)).astype(x.dtype)


class SinkKVCache(LongCache):
    """mlx-lm cache keeping ``sink_tokens`` first entries and the last ``window``.

    ``rope``: the layer's RoPE module (``layer.self_attn.rope`` in mlx-lm; it
    must have ``dims`` and ``traditional``, as ``mlx.nn.RoPE``). Without it the
    keys are stored as given, which is right only for a model without rotary
    positions.
    """

    def __init__(self, sink_tokens: int = 4, window: int = 1024, *, rope=None):
        self.sink_tokens = check_nonnegative_int("sink_tokens", sink_tokens)
        self.window = check_positive_int("window", window)
        if rope is not None and not (hasattr(rope, "dims") and hasattr(rope, "traditional")):
            raise ValueError(f"rope must be a RoPE module with dims and traditional, got {type(rope).__name__}")
        self.rope = rope
        self.keys = self.values = None  # (B, H, held, D); keys un-rotated when rope is set
        self.offset = 0  # entries held = the position the next token gets
        self.tokens_seen = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """``keys``, ``values (B, H, S, D)``, rotated by the model at ``offset``;
        returns the cache plus them, every key at its position in the cache.

        Store keys un-rotated (``unrotate``), rotate the whole cache at positions
        ``0 .. n - 1`` on the way out (``self.rope(keys)``), then evict the middle:
        keep the first ``sink_tokens`` and the last ``window``. Set ``self.keys``,
        ``self.values``, ``self.offset`` (entries held) and ``self.tokens_seen``
        (``state``, ``size`` and the model read them). About 18 lines."""
        # BEGIN SOLUTION
        raw = keys if self.rope is None else unrotate(self.rope, keys, self.offset)
        if self.keys is None:
            fetched_k, fetched_v = keys, values
            all_k, all_v = raw, values
        else:
            cached = self.keys if self.rope is None else self.rope(self.keys)  # positions 0 .. offset - 1
            fetched_k = mx.concatenate([cached, keys], axis=2)
            fetched_v = mx.concatenate([self.values, values], axis=2)
            all_k = mx.concatenate([self.keys, raw], axis=2)
            all_v = fetched_v
        n, s = all_k.shape[2], self.sink_tokens
        if n > s + self.window:  # evict the middle: keep the sinks and the last `window`
            all_k = mx.concatenate([all_k[:, :, :s], all_k[:, :, n - self.window:]], axis=2)
            all_v = mx.concatenate([all_v[:, :, :s], all_v[:, :, n - self.window:]], axis=2)
        self.keys, self.values = all_k, all_v
        self.offset = all_k.shape[2]
        self.tokens_seen += keys.shape[2]
        return fetched_k, fetched_v
        # END SOLUTION

    META = ("sink_tokens", "window", "tokens_seen")

    def size(self) -> int:
        return self.offset

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, v):
        self.keys, self.values = v
        self.offset = 0 if self.keys is None else self.keys.shape[2]



class StreamingProcessor:
    """Feed a (possibly endless) token stream to a model, ``chunk_size`` tokens at a time."""

    def __init__(self, chunk_size: int = 2048, overlap: int = 256, *, sink_tokens: int = 4,
                 window: int = 4096):
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.overlap = check_nonnegative_int("overlap", overlap)
        self.sink_tokens = check_nonnegative_int("sink_tokens", sink_tokens)
        self.window = check_positive_int("window", window)
        self.caches = None  # the caches of the stream being processed (to inspect or save)

    def make_cache(self, model) -> list[SinkKVCache]:
        """One ``SinkKVCache`` per layer, each with its layer's RoPE (mlx-lm layout)."""
        return [SinkKVCache(self.sink_tokens, self.window,
                            rope=getattr(getattr(layer, "self_attn", None), "rope", None))
                for layer in model.layers]

    def process_stream(self, token_stream: Iterable[int], model) -> Iterator[mx.array]:
        """Yield each chunk's logits ``(n, vocab)``, one row per new token, reading the stream lazily.

        A model with ``layers`` (mlx-lm) is called as ``model(tokens[None],
        cache=caches)``: context crosses chunks through the caches. Any other
        callable gets ``model(tokens[None])`` with the previous chunk's last
        ``overlap`` tokens in front, as context; their rows are dropped before
        the chunk is yielded. Read the stream ``chunk_size`` tokens at a time
        (``itertools.islice``: it may be endless) and evaluate each chunk before
        yielding it. About 12 lines.
        """
        stream = iter(token_stream)
        self.caches = caches = self.make_cache(model) if hasattr(model, "layers") else None
        # BEGIN SOLUTION
        previous: list[int] = []
        while chunk := list(itertools.islice(stream, self.chunk_size)):
            if caches is not None:
                logits = model(mx.array(chunk)[None], cache=caches)[0]
                mx.eval(logits, [c.state for c in caches])  # one chunk of graph alive at a time
            else:
                context = previous[len(previous) - min(self.overlap, len(previous)):]
                logits = model(mx.array(context + chunk)[None])[0][len(context):]
                mx.eval(logits)
                previous = chunk
            yield logits
        # END SOLUTION

    def merge_chunk_outputs(self, chunk_outputs: list[mx.array]) -> mx.array:
        """One ``(tokens, vocab)`` array from the chunks' outputs, in order: each ``(n, vocab)``, or
        ``(1, n, vocab)`` as a model returns it (a batch of one stream). ``process_stream`` yields only
        the new tokens' rows (the overlap's rows were context), so merging needs nothing from an
        earlier call."""
        return mx.concatenate(chunk_rows(chunk_outputs), axis=0)


__all__ = ["SinkKVCache", "StreamingProcessor", "unrotate"]
