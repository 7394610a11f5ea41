"""Graded tests, Task 5: endless streams with attention sinks.

Run: ``pytest labs/week3 --task 5`` (your stubs), ``--impl solutions`` or
``--impl torch``. The model is the seeded tiny Qwen3 of ``longctx.models``
(mlx-lm's for MLX, transformers' for torch). Two independent references: one
full forward of the same model (while the stream fits in the cache), and,
for a one-layer model, a fresh forward over exactly what StreamingLLM keeps:
the sinks, the last ``window`` tokens, the chunk, at positions ``0 .. n-1``
(one layer's keys depend on their token and position only, so this is exact).
"""
import itertools

import numpy as np
import pytest

from longctx.testing import assert_close

pytestmark = pytest.mark.task(5)


def processor(lab, chunk_size=8, overlap=0, **kw):
    return lab("streaming").StreamingProcessor(chunk_size, overlap, **kw)


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def cache_sizes(arrays, caches):
    """Entries each layer holds (a list of mlx-lm caches, or one transformers Cache)."""
    return [arrays.cache_offset(c) for c in arrays.cache_layers(caches)]


@pytest.mark.parametrize("n, chunk", [(37, 8), (40, 40), (23, 1), (50, 64)])
def test_stream_that_fits_equals_one_forward(lab, arrays, tiny_model, n, chunk):
    """While the stream fits in the cache, chunked streaming is one full forward (chunks need not divide it)."""
    model, forward, _ = tiny_model
    ids = tokens(n)
    p = processor(lab, chunk, sink_tokens=4, window=64)
    outs = list(p.process_stream(iter(ids), model))
    assert [arrays.numpy(o).shape[0] for o in outs] == [len(ids[i:i + chunk]) for i in range(0, n, chunk)], \
        "one output per chunk, one row per new token"
    assert_close(arrays.numpy(p.merge_chunk_outputs(outs)), arrays.numpy(forward(ids)), rtol=2e-4, atol=2e-4,
                 name="streamed logits", axes=("token", "vocab"))


@pytest.mark.parametrize("sinks, window, chunk", [(4, 16, 8), (2, 10, 7), (1, 5, 1), (0, 12, 5), (3, 8, 20)])
def test_stream_beyond_the_cache_is_streamingllm(lab, arrays, tiny_models, sinks, window, chunk):
    """Beyond the cache, each chunk sees the sinks + the last ``window`` tokens at positions inside the cache."""
    model, forward, _ = tiny_models(num_hidden_layers=1)
    ids = tokens(70, seed=1)
    p = processor(lab, chunk, sink_tokens=sinks, window=window)
    for t, out in enumerate(p.process_stream(iter(ids), model)):
        start = t * chunk
        context = ids[:min(sinks, start)] + ids[max(sinks, start - window):start]
        want = arrays.numpy(forward(context + ids[start:start + chunk]))[len(context):]
        assert_close(arrays.numpy(out), want, rtol=2e-4, atol=2e-4, name=f"logits of chunk {t} (tokens {start}..)",
                     axes=("token", "vocab"))
        assert max(cache_sizes(arrays, p.caches)) <= sinks + window, \
            f"after chunk {t} the cache holds {cache_sizes(arrays, p.caches)} entries, more than sinks + window"


def endless(limit: int):
    """An endless token stream that refuses to be read more than ``limit`` tokens ahead."""
    for i in itertools.count():
        if i >= limit:
            raise RuntimeError(f"process_stream read {limit} tokens: far ahead of the chunks it yielded")
        yield (i * 7919) % 256


def test_positions_stay_bounded(lab, arrays, tiny_model):
    """No position beyond sink_tokens + window + chunk_size, however long the stream."""
    model, _, _ = tiny_model
    p = processor(lab, 16, sink_tokens=4, window=32)
    for out in itertools.islice(p.process_stream(endless(41 * 16), model), 40):
        sizes = cache_sizes(arrays, p.caches)
        assert max(sizes) <= 4 + 32, f"cache sizes {sizes}: positions would grow past sink_tokens + window"
    assert arrays.numpy(out).shape[0] == 16


def test_endless_stream_is_read_lazily(lab, arrays, tiny_model):
    model, _, _ = tiny_model
    outs = list(itertools.islice(processor(lab, 8, window=16).process_stream(endless(4 * 8), model), 3))
    assert len(outs) == 3


@pytest.mark.parametrize("n, chunk, overlap", [(50, 8, 3), (24, 8, 0), (9, 4, 4), (31, 10, 12)])
def test_overlap_is_context_without_a_cache(lab, arrays, n, chunk, overlap):
    """A model without cache support gets the previous chunk's last ``overlap`` tokens in front of
    each chunk, as context; each chunk's output keeps one row per new token, and merging (by any
    processor: nothing from an earlier call) gives one row per token of the stream."""
    seen = []

    def model(t):  # no `layers`, no cache: row i reports its token
        seen.append(arrays.numpy(t)[0].astype(int).tolist())
        return t[..., None] * 1.0

    ids = tokens(n, seed=2)
    outs = list(processor(lab, chunk, overlap).process_stream(iter(ids), model))
    prefix = min(overlap, chunk)
    for t, (inputs, out) in enumerate(zip(seen, outs)):
        start = t * chunk
        context = ids[max(0, start - prefix):start] if t else []
        assert inputs == context + ids[start:start + chunk], f"chunk {t}: the model must see the {prefix} tokens " \
                                                            "before it, then the chunk"
        got = arrays.numpy(out)[:, 0].astype(int).tolist()
        assert got == ids[start:start + chunk], f"chunk {t} yields {len(got)} rows: one per new token, not the overlap"
    merged = arrays.numpy(processor(lab, chunk, overlap).merge_chunk_outputs(outs))
    assert merged[:, 0].astype(int).tolist() == ids, "merged: one row per token, in order"


def test_cache_state_round_trip_loses_nothing(lab, arrays, tiny_model):
    """Save every layer's state mid-stream, restore it into fresh caches: the stream continues identically."""
    model, forward, _ = tiny_model
    ids = tokens(60, seed=3)
    p = processor(lab, 10, sink_tokens=2, window=12)
    first = p.make_cache(model)
    forward(ids[:30], first)
    saved = [(c.state, c.meta_state) for c in arrays.cache_layers(first)]
    restored = p.make_cache(model)
    for c, (state, meta) in zip(arrays.cache_layers(restored), saved):
        c.state, c.meta_state = state, meta
    assert_close(arrays.numpy(forward(ids[30:45], restored)), arrays.numpy(forward(ids[30:45], first)), rtol=0, atol=0,
                 name="logits after restoring the saved state")


def test_memory_is_bounded(lab, arrays, tiny_model, record):
    """Peak memory streaming 10x more tokens stays within a small margin."""
    model, _, _ = tiny_model
    p = processor(lab, 64, sink_tokens=4, window=128)

    def run(n):
        for out in p.process_stream(itertools.islice(itertools.cycle(tokens(500)), n), model):
            last = out
        return last

    run(512)  # warm-up
    peaks = {n: arrays.peak_bytes(lambda: run(n)) for n in (1024, 10240)}
    ratio = peaks[10240] / peaks[1024]
    record("peak memory, 10x longer stream", f"{ratio:.2f}x ({peaks[10240] / 2**20:.1f} MiB at 10k tokens)")
    assert ratio < 1.2, f"peak grew {ratio:.2f}x for a 10x longer stream: something keeps every chunk"
