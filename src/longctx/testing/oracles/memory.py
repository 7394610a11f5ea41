"""Task 10's float64 oracle: memory layers (FoT, LongLLaMA)."""
from __future__ import annotations

import numpy as np

from longctx.exact import attention, causal_mask
from longctx.testing.oracles.qwen3 import qwen3_logits
from longctx.testing.oracles.rope_scaling import rope


# ANCHOR: memory_attention
def memory_top_k(q, memory_keys, top_k, memory_mask=None) -> np.ndarray:
    """Bool ``(B, Hq, Lq, M)``: the memory entries each query keeps, its ``top_k`` best visible
    ones by ``q . k`` in float64, and any tied with the k-th (all visible ones when ``top_k`` is
    None). Ties are real: the first layer's keys of two equal tokens are equal in memory."""
    q, mk = np.asarray(q, np.float64), np.asarray(memory_keys, np.float64)
    B, Hq, Lq, _ = q.shape
    M = mk.shape[2]
    mk = np.repeat(mk, Hq // mk.shape[1], axis=1)
    visible = np.ones((B, M), bool) if memory_mask is None else np.asarray(memory_mask, bool)
    keep = np.zeros((B, Hq, Lq, M), bool)
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq):
                scores = {j: q[b, h, i] @ mk[b, h, j] for j in range(M) if visible[b, j]}
                ranked = sorted(scores.values(), reverse=True)
                if top_k is not None and top_k < len(ranked):  # ties with the k-th best are kept too
                    scores = {j: x for j, x in scores.items() if x >= ranked[top_k - 1]}
                keep[b, h, i, list(scores)] = True
    return keep


def memory_attention(q, k, v, memory_keys, memory_values, *, top_k=None, memory_mask=None, scale=None):
    """FoT's memory layer: ONE softmax over the causal local keys and the kept memory entries
    (the keys concatenated, the masks side by side)."""
    Lq, Lk = q.shape[2], k.shape[2]
    keys = np.concatenate([np.asarray(k, np.float64), np.asarray(memory_keys, np.float64)], axis=2)
    values = np.concatenate([np.asarray(v, np.float64), np.asarray(memory_values, np.float64)], axis=2)
    local = np.broadcast_to(causal_mask(Lq, Lk), (q.shape[0], q.shape[1], Lq, Lk))
    mask = np.concatenate([local, memory_top_k(q, memory_keys, top_k, memory_mask)], axis=-1)
    return attention(q, keys, values, mask, scale=scale)
# ANCHOR_END: memory_attention


def gated_memory_attention(q, k, v, memory_keys, memory_values, gate, *, top_k=None, memory_mask=None,
                           scale=None) -> np.ndarray:
    """The Memorizing Transformer's layer: two softmaxes, mixed by ``g = sigmoid(gate)`` per head."""
    g = 1 / (1 + np.exp(-np.asarray(gate, np.float64)))[None, :, None, None]
    local = attention(q, k, v, causal_mask(q.shape[2], k.shape[2]), scale=scale)
    memory = attention(q, memory_keys, memory_values, memory_top_k(q, memory_keys, top_k, memory_mask), scale=scale)
    return g * memory + (1 - g) * local


# ANCHOR: memory_model_logits
def memory_model_logits(weights: dict, config: dict, ids, *, memory_layers, context_length: int = 0,
                        last_context_length: int = 0, top_k=None, memory_size=None, windows=None) -> np.ndarray:
    """LongLLaMA's windowed forward in float64: logits ``(L, vocab)``. All but the last
    ``last_context_length`` tokens go in windows of ``context_length``; each window is a fresh
    forward (``qwen3_logits``) whose ``memory_layers`` attend with ``memory_attention`` to the
    keys (un-rotated: RoPE at position 0) and values of the earlier windows (the last
    ``memory_size``); the rest of the prompt is one last window. ``windows``: ``(start, end)``
    given instead (every one but the last joins the memory)."""
    D, theta = config["head_dim"], config["rope_theta"]
    inv_freq = theta ** (-np.arange(0, D, 2) / D)
    memory = {i: None for i in memory_layers}
    n, prefix = len(ids), max(len(ids) - last_context_length, 0)
    if windows is None:
        windows = [(s, min(s + context_length, prefix)) for s in range(0, prefix, context_length)]
        windows += [(prefix, n)] if prefix < n else []
    else:
        prefix = windows[-1][0]
    out = []
    for s, e in windows:
        seen = {}

        def attend(i, q, k, v):
            if i not in memory:
                return attention(q, k, v, causal_mask(q.shape[2], k.shape[2]))
            seen[i] = (rope(k[..., ::-1, :], inv_freq, offset=-(k.shape[2] - 1))[..., ::-1, :], v)  # positions -j
            mk, mv = memory[i] if memory[i] is not None else (k[:, :, :0], v[:, :, :0])
            return memory_attention(q, k, v, mk, mv, top_k=top_k)
        out.append(qwen3_logits(weights, config, ids[s:e], attend))
        if e <= prefix:  # a window of the prefix joins the memory
            for i, (k, v) in seen.items():
                mk, mv = (k, v) if memory[i] is None else (np.concatenate([memory[i][0], k], 2),
                                                           np.concatenate([memory[i][1], v], 2))
                keep = mk.shape[2] if memory_size is None else min(memory_size, mk.shape[2])
                memory[i] = (mk[:, :, mk.shape[2] - keep:], mv[:, :, mv.shape[2] - keep:])
    return np.concatenate(out, axis=0)
# ANCHOR_END: memory_model_logits


def memory_counts(q, k, context_length: int, top_k=None) -> np.ndarray:
    """``(Hq, L, L)`` visibility of ``MemoryAttention(context_length, top_k)`` (self-attention, batch
    of one): each window of ``context_length`` queries sees its own keys causally and the earlier
    keys that ``top_k`` keeps (``memory_top_k``: all of them with None). The selection is not
    differentiated; the kept scores are."""
    Hq, L = q.shape[1], q.shape[2]
    counts = np.zeros((Hq, L, L))
    for s in range(0, L, context_length):
        e = min(L, s + context_length)
        counts[:, s:e, s:e] = np.tril(np.ones((e - s, e - s)))
        if s:
            counts[:, s:e, :s] = memory_top_k(q[:, :, s:e], k[:, :, :s], top_k)[0]
    return counts
