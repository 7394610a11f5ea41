"""Graded tests, the Qwen3 integration: every strategy inside a real Qwen3.

Run: ``pytest labs/week3 --task 8`` (your stubs), ``--impl solutions`` or
``--impl torch``. The model is the seeded tiny Qwen3 of ``longctx.models``:
mlx-lm's ``qwen3.Model`` for MLX, transformers' ``Qwen3ForCausalLM`` for
torch. The oracle is an independent float64 forward of the same weights
(``longctx.testing.oracles.qwen3_logits``) with the strategy's attention
written as a mask over the whole sequence: a window band, LongNet's pairs
with their multiplicity, or the entries Task 4's rule keeps.
"""
import numpy as np
import pytest

from longctx.models import TINY_QWEN3, torch_qwen3
from longctx.testing import assert_close
from longctx.testing.oracles import (attention, causal_mask, compression_scores, dilated_pairs, kept_indices,
                                     n_kept, qwen3_logits, sliding_window_attention)

pytestmark = pytest.mark.task(8)


@pytest.fixture(scope="module")
def weights():
    return {name: t.detach().numpy() for name, t in torch_qwen3(0).state_dict().items()}


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def wrap(lab, model, strategy, **options):
    return lab("qwen3_long").LongContextQwen3(model, strategy, **options)


def logits(arrays, wrapper, ids):
    out = arrays.numpy(wrapper.process_long_sequence(ids))
    assert out.shape == (1, len(ids), TINY_QWEN3["vocab_size"]), f"logits must be (1, L, vocab), got {out.shape}"
    return out[0]


def test_full_is_the_base_model(lab, arrays, tiny_model, weights):
    model, forward, _ = tiny_model
    ids = tokens(45)
    got = logits(arrays, wrap(lab, model, "full", chunk_size=16), ids)
    assert_close(got, arrays.numpy(forward(ids)), rtol=1e-5, atol=1e-5, name="full vs the base model")
    assert_close(got, qwen3_logits(weights, TINY_QWEN3, ids), rtol=1e-4, atol=1e-4, name="full vs the oracle")


@pytest.mark.parametrize("strategy, options", [
    ("sliding", {"window_size": 40}), ("sliding", {"window_size": 90, "chunk_size": 7}),
    ("hierarchical", {"levels": [40, 64], "dilations": [1, 1]}),
    ("streaming", {"sink_tokens": 4, "window": 36, "chunk_size": 9}), ("streaming", {"sink_tokens": 0, "window": 40}),
    ("compressed", {"compression_ratio": 0.5, "method": "knorm", "chunk_size": 16}),
    ("compressed", {"compression_ratio": 0.9, "method": "h2o", "chunk_size": 13}),
])
def test_each_strategy_is_exact_while_the_input_fits(lab, arrays, tiny_model, strategy, options):
    model, forward, _ = tiny_model
    ids = tokens(40, seed=1)
    assert_close(logits(arrays, wrap(lab, model, strategy, **options), ids), arrays.numpy(forward(ids)), rtol=1e-4,
                 atol=1e-4, name=f"{strategy} {options}: an input inside the window must give the base logits")


@pytest.mark.parametrize("window, chunk", [(1, 16), (8, 16), (13, 5), (16, 64)])
def test_sliding_beyond_the_window(lab, arrays, tiny_model, weights, window, chunk):
    model, _, _ = tiny_model
    ids = tokens(50, seed=2)
    want = qwen3_logits(weights, TINY_QWEN3, ids, lambda i, q, k, v: sliding_window_attention(q, k, v, window))
    assert_close(logits(arrays, wrap(lab, model, "sliding", window_size=window, chunk_size=chunk), ids), want,
                 rtol=1e-4, atol=1e-4, name=f"sliding, window {window}, chunks of {chunk}", axes=("token", "vocab"))


@pytest.mark.parametrize("levels, dilations, chunk", [([8, 16], [1, 2], 64), ([4, 12, 32], [1, 2, 4], 10)])
def test_hierarchical_is_longnet_in_every_layer(lab, arrays, tiny_model, weights, levels, dilations, chunk):
    """LongNet mixes its levels by their denominators: one softmax over the union of the
    keys each level gives a query, a key counted once per level that gives it."""
    model, _, _ = tiny_model
    ids = tokens(50, seed=3)
    L, H = len(ids), TINY_QWEN3["num_attention_heads"]
    count = sum(dilated_pairs(H, L, L, w, r).astype(np.float64) for w, r in zip(levels, dilations))

    def longnet(i, q, k, v):  # multiplicity as a log weight on the scores
        kr = np.repeat(k, H // k.shape[1], axis=1)
        vr = np.repeat(v, H // v.shape[1], axis=1)
        s = np.where(count > 0, q @ kr.swapaxes(-1, -2) / np.sqrt(q.shape[-1]) + np.log(np.maximum(count, 1)),
                     -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ vr
    want = qwen3_logits(weights, TINY_QWEN3, ids, longnet)
    got = logits(arrays, wrap(lab, model, "hierarchical", levels=levels, dilations=dilations, chunk_size=chunk), ids)
    assert_close(got, want, rtol=1e-4, atol=1e-4, name=f"hierarchical {levels} {dilations}", axes=("token", "vocab"))


@pytest.mark.parametrize("sinks, window, chunk", [(4, 12, 8), (1, 20, 6), (0, 9, 16)])
def test_streaming_beyond_the_window(lab, arrays, tiny_models, sinks, window, chunk):
    """One layer (its keys depend on token and position only): chunk t is a fresh forward over the
    sinks, the last ``window`` tokens and the chunk, at positions 0 .. n-1 (StreamingLLM)."""
    model, _, _ = tiny_models(num_hidden_layers=1)
    w1 = {name: t.detach().numpy() for name, t in torch_qwen3(0, num_hidden_layers=1).state_dict().items()}
    config = {**TINY_QWEN3, "num_hidden_layers": 1}
    ids = tokens(50, seed=6)
    got = logits(arrays, wrap(lab, model, "streaming", sink_tokens=sinks, window=window, chunk_size=chunk), ids)
    for start in range(0, len(ids), chunk):
        end = start + chunk if len(ids) - start - chunk != 1 else len(ids)  # no lone last token
        context = ids[:min(sinks, start)] + ids[max(sinks, start - window):start]
        want = qwen3_logits(w1, config, context + ids[start:end])[len(context):]
        assert_close(got[start:end], want, rtol=1e-4, atol=1e-4, name=f"streaming, chunk at {start}",
                     axes=("token", "vocab"))
        if end == len(ids):
            break


@pytest.mark.parametrize("method, ratio", [("knorm", 0.5), ("snapkv", 0.6), ("h2o", 0.7), ("streaming", 0.8)])
def test_compressed_generation_sees_what_task4_keeps(lab, arrays, tiny_model, weights, method, ratio):
    """The prompt is prefilled whole, then each layer's cache keeps Task 4's entries (scored
    from that layer's own keys and prompt queries): the first new token attends to them and itself."""
    model, _, _ = tiny_model
    ids = tokens(48, seed=4)
    P = len(ids) - 1  # generate prefills all but the last token, which is the first decode step
    opts = dict(compression_ratio=ratio, method=method, sink_tokens=2, recent_tokens=4, observation_window=6,
                chunk_size=16)  # H2O needs the queries of every chunk, SnapKV the last 6

    def decode_sees_kept(i, q, k, v):
        scores = compression_scores(method, k[:, :, :P], q[:, :, :P], observation_window=6)
        kept = kept_indices(scores, n_kept(P, ratio), 2, 4)  # (1, Hkv, budget)
        mask = np.broadcast_to(causal_mask(P + 1, P + 1), (1, k.shape[1], P + 1, P + 1)).copy()
        mask[:, :, P, :P] = False
        np.put_along_axis(mask[:, :, P, :P], kept, True, axis=-1)
        return attention(q, k, v, np.repeat(mask, q.shape[1] // k.shape[1], axis=1))
    want = qwen3_logits(weights, TINY_QWEN3, ids, decode_sees_kept)[-1]
    first = next(iter(wrap(lab, model, "compressed", **opts).generate(ids, 1)))
    assert first == int(np.argmax(want)), \
        f"{method}: first new token {first}, but attending to Task 4's kept entries gives {int(np.argmax(want))}"


def test_greedy_generate_continues_the_base_model(lab, arrays, tiny_model, weights):
    model, _, _ = tiny_model
    ids = tokens(20, seed=5)
    got = list(wrap(lab, model, "full").generate(ids, 6))
    assert len(got) == 6 and all(isinstance(t, int) for t in got), "generate yields max_new_tokens ints"
    seq = list(ids)
    for _ in range(6):
        seq.append(int(np.argmax(qwen3_logits(weights, TINY_QWEN3, seq)[-1])))
    assert got == seq[len(ids):], f"greedy tokens {got}, the oracle's {seq[len(ids):]}"


@pytest.mark.parametrize("strategy, options", [
    ("full", {}), ("sliding", {"window_size": 16}), ("hierarchical", {"levels": [16, 32], "dilations": [1, 1]}),
    ("streaming", {"sink_tokens": 4, "window": 12}), ("compressed", {"compression_ratio": 0.5, "method": "snapkv"}),
    ("memory", {"context_length": 16, "last_context_length": 8}),
])
def test_generate_from_a_one_token_prompt(lab, arrays, tiny_model, weights, strategy, options):
    """A one-token prompt leaves nothing to prefill: ``generate_step`` starts from that token on a fresh
    cache (a compressed one compressed from the start). While the tokens fit the strategy's window,
    greedy decoding is the base model's."""
    model, _, _ = tiny_model
    ids = tokens(1, seed=9)
    got = list(wrap(lab, model, strategy, **options).generate(ids, 5))
    assert len(got) == 5 and all(isinstance(t, int) for t in got), "generate yields max_new_tokens ints"
    if strategy == "compressed":  # it keeps half of what it holds: not the base model's tokens
        return
    seq = list(ids)
    for _ in range(5):
        seq.append(int(np.argmax(qwen3_logits(weights, TINY_QWEN3, seq)[-1])))
    assert got == seq[1:], f"{strategy}: greedy tokens {got} after one prompt token, the oracle's {seq[1:]}"
