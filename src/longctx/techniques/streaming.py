"""Task 5, attention sinks and a window, chunk by chunk: what is not array code."""
from __future__ import annotations

from longctx.techniques.base import BYTES, Technique


def chunk_rows(chunk_outputs) -> list:
    """``StreamingProcessor.merge_chunk_outputs``'s input as ``(n, vocab)`` arrays: each chunk's
    output is ``(n, vocab)`` or, as mlx-lm's and transformers' models return it, ``(1, n, vocab)``.
    A larger batch would be several streams at once, which one processor does not run: merge each
    stream's outputs on its own (``[o[b] for o in outputs]``)."""
    shapes = [tuple(getattr(o, "shape", ())) for o in chunk_outputs] if isinstance(chunk_outputs, (list, tuple)) else []
    if not shapes or any(len(s) not in (2, 3) or (len(s) == 3 and s[0] != 1) for s in shapes) \
            or len({s[-1] for s in shapes}) != 1:
        raise ValueError(f"chunk_outputs must be a non-empty list of (n, vocab) or (1, n, vocab) arrays with one "
                         f"vocab (a batch of B > 1 is B streams: merge each on its own), got "
                         f"{shapes or chunk_outputs!r}")
    return [o[0] if o.ndim == 3 else o for o in chunk_outputs]


def memory(L, H, D, o, backend):
    c = min(o["chunk_size"], L)
    held = o["sink_tokens"] + o["window"] + c
    return (3 * H * c * held + 4 * H * held * D) * BYTES  # a chunk's scores, the cache; the output in place


TECHNIQUE = Technique(
    "streaming", 5, "attention sinks plus a window of recent entries, chunk by chunk",
    {"sink_tokens": 4, "window": 1024, "chunk_size": 1024}, memory,
    strategy={"sink_tokens": 4, "window": 4096}, cache="SinkKVCache",
    from_window=lambda w: {"window": w, "chunk_size": w},
    evaluate=lambda w: {"sink_tokens": 4, "window": w, "chunk_size": 16})
