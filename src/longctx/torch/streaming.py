"""Task 5 in PyTorch: endless streams with attention sinks, the mirror of ``longctx.mlx``.

Same names, arguments and semantics as ``solutions/week3/streaming.py`` (read
the book chapter there). ``SinkKVCache`` is a ``transformers`` ``Cache``: HF
Qwen3 takes position ids from ``get_seq_length()``, which is the number of
entries held, so new tokens get positions inside the cache; keys are stored
un-rotated (with the model's ``rotary_emb``) and rotated at ``0 .. n-1`` on
every fetch, as StreamingLLM's code does.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from longctx.checks import check_nonnegative_int, check_positive_int
from longctx.techniques.streaming import chunk_rows


def rotate(rotary_emb, x: torch.Tensor, start: int, inverse: bool = False) -> torch.Tensor:
    """``x (B, H, n, D)`` rotated by the model's ``rotary_emb`` at positions ``start ..``, or
    (``inverse``) that rotation undone, a scaled RoPE's attention factor divided out."""
    position_ids = torch.arange(start, start + x.shape[2], device=x.device)[None]
    cos, sin = rotary_emb(x, position_ids)
    if not inverse:
        return apply_rotary_pos_emb(x, x, cos, sin)[1]
    a = rotary_emb(x, torch.zeros_like(position_ids[:, :1]))[0][:, :, :1]  # cos(0) x the attention factor
    return apply_rotary_pos_emb(x, x, cos, -sin)[1] / (a[:, None] * a[:, None])  # (a scaled RoPE: YaRN, LongRoPE)


class SinkLayer(DynamicLayer):
    """One layer: the first ``sink_tokens`` entries and the last ``window``."""

    def __init__(self, sink_tokens: int, window: int, rotary_emb=None):
        super().__init__()
        self.sink_tokens, self.window, self.rotary_emb = sink_tokens, window, rotary_emb
        self.tokens_seen = 0

    def _rotate(self, x: torch.Tensor, start: int, inverse: bool = False) -> torch.Tensor:
        return rotate(self.rotary_emb, x, start, inverse)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        offset = self.get_seq_length()
        raw = key_states if self.rotary_emb is None else self._rotate(key_states, offset, inverse=True)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            fetched_k, fetched_v, all_k, all_v = key_states, value_states, raw, value_states
        else:
            cached = self.keys if self.rotary_emb is None else self._rotate(self.keys, 0)
            fetched_k = torch.cat([cached, key_states], dim=2)
            fetched_v = torch.cat([self.values, value_states], dim=2)
            all_k, all_v = torch.cat([self.keys, raw], dim=2), fetched_v
        n, s = all_k.shape[2], self.sink_tokens
        if n > s + self.window:
            all_k = torch.cat([all_k[:, :, :s], all_k[:, :, n - self.window:]], dim=2)
            all_v = torch.cat([all_v[:, :, :s], all_v[:, :, n - self.window:]], dim=2)
        # A cache holds values, not graph: training through a stream backpropagates inside each
        # chunk (the fetched keys carry it), never into earlier chunks (Transformer-XL's rule).
        self.keys, self.values = all_k.detach(), all_v.detach()
        self.tokens_seen += key_states.shape[2]
        return fetched_k, fetched_v

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, v):
        self.keys, self.values = v
        self.is_initialized = self.keys is not None

    @property
    def meta_state(self):
        return tuple(map(str, (self.sink_tokens, self.window, self.tokens_seen)))

    @meta_state.setter
    def meta_state(self, v):
        self.sink_tokens, self.window, self.tokens_seen = map(int, v)


class SinkKVCache(Cache):
    """A ``transformers`` cache keeping ``sink_tokens`` first entries and the last ``window``.

    ``rotary_emb``: the model's rotary embedding (``model.model.rotary_emb``
    for HF Qwen3/Llama); without it keys are stored as given (right only for a
    model without rotary positions). ``num_layers`` makes the layers up front.
    """

    def __init__(self, sink_tokens: int = 4, window: int = 1024, *, rotary_emb=None, num_layers: int | None = None):
        sink_tokens = check_nonnegative_int("sink_tokens", sink_tokens)
        window = check_positive_int("window", window)
        if num_layers is None:
            super().__init__(layer_class_to_replicate=lambda: SinkLayer(sink_tokens, window, rotary_emb))
        else:
            num_layers = check_positive_int("num_layers", num_layers)
            super().__init__(layers=[SinkLayer(sink_tokens, window, rotary_emb) for _ in range(num_layers)])


class StreamingProcessor:
    """Feed a (possibly endless) token stream to a model, ``chunk_size`` tokens at a time."""

    def __init__(self, chunk_size: int = 2048, overlap: int = 256, *, sink_tokens: int = 4,
                 window: int = 4096):
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.overlap = check_nonnegative_int("overlap", overlap)
        self.sink_tokens = check_nonnegative_int("sink_tokens", sink_tokens)
        self.window = check_positive_int("window", window)
        self.caches = None

    def make_cache(self, model: PreTrainedModel) -> SinkKVCache:
        return SinkKVCache(self.sink_tokens, self.window, rotary_emb=getattr(model.model, "rotary_emb", None),
                           num_layers=model.config.num_hidden_layers)

    def process_stream(self, token_stream: Iterable[int], model) -> Iterator[torch.Tensor]:
        """Yield each chunk's logits ``(n, vocab)``, one row per new token (with a gradient when the
        model's weights need one: the cache carries none between chunks). A ``transformers`` model
        gets a ``SinkKVCache``; any other callable gets ``model(tokens[None])`` with the previous
        chunk's last ``overlap`` tokens in front as context, their rows dropped."""
        stream = iter(token_stream)
        self.caches = caches = self.make_cache(model) if isinstance(model, PreTrainedModel) else None
        device = next(model.parameters()).device if caches is not None else None
        previous: list[int] = []
        while chunk := list(itertools.islice(stream, self.chunk_size)):
            if caches is not None:
                ids = torch.tensor(chunk, device=device)[None]
                yield model(input_ids=ids, past_key_values=caches, use_cache=True).logits[0]
            else:
                context = previous[len(previous) - min(self.overlap, len(previous)):]
                out = model(torch.tensor(context + chunk)[None])
                previous = chunk
                yield getattr(out, "logits", out)[0][len(context):]

    def merge_chunk_outputs(self, chunk_outputs: list[torch.Tensor]) -> torch.Tensor:
        """One ``(tokens, vocab)`` tensor from the chunks' outputs, in order: each ``(n, vocab)``, or
        ``(1, n, vocab)`` as a model returns it (a batch of one stream). ``process_stream`` yields only
        the new tokens' rows (the overlap's rows were context), so merging needs nothing from an
        earlier call."""
        return torch.cat(chunk_rows(chunk_outputs), dim=0)


__all__ = ["SinkKVCache", "SinkLayer", "StreamingProcessor"]
