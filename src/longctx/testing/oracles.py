"""Float64 numpy oracles: slow and obviously right. The book quotes them.

Every attention oracle follows the contract: ``q (B, Hq, Lq, D)``, ``k, v (B,
Hkv, Lk, D)``, query ``i`` at absolute position ``Lk - Lq + i``, query head
``h`` reads kv head ``h // (Hq // Hkv)``, a row with no visible key is zeros.
"""
from __future__ import annotations

import numpy as np

from longctx.exact import (attention, causal_mask, causal_rows, query_positions, relative_error,  # noqa: F401
                           sliding_mask, sliding_window_attention)


def sliding_mistakes(q, k, v, window: int, *, scale=None) -> dict[str, np.ndarray]:
    """What the classic Task 1 mistakes would output, for :func:`assert_close`'s diagnosis."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    p = query_positions(lq, lk)[:, None]
    j = np.arange(lk)[None, :]
    out = {
        "future positions leak through the causal mask (the band is two-sided)":
            attention(q, k, v, np.abs(j - p) < window, scale=scale),
        "window off by one: window_size + 1 keys visible":
            attention(q, k, v, sliding_mask(lq, lk, window + 1), scale=scale),
        "the window is ignored (plain causal attention)":
            attention(q, k, v, causal_mask(lq, lk), scale=scale),
        "missing the 1/sqrt(D) scale":
            attention(q, k, v, sliding_mask(lq, lk, window), scale=1.0),
        "the scale argument is ignored (used D ** -0.5)":
            attention(q, k, v, sliding_mask(lq, lk, window), scale=d ** -0.5),
    }
    if lq < lk:
        p0 = np.arange(lq)[:, None]  # the mistake: queries at positions 0 .. Lq-1
        out["position offset ignored (queries placed at 0 .. Lq-1, not the last Lq positions)"] = attention(
            q, k, v, (j <= p0) & (j > p0 - window), scale=scale)
    if window > 1:
        out["window off by one: window_size - 1 keys visible"] = attention(
            q, k, v, sliding_mask(lq, lk, window - 1), scale=scale)
    hq, hkv = q.shape[1], k.shape[1]
    if hkv not in (1, hq):
        perm = np.arange(hq) % hkv  # the mistake: kv head h % Hkv
        out["GQA heads mapped as h % Hkv instead of h // (Hq // Hkv)"] = np.concatenate(
            [attention(q[:, h:h + 1], k[:, perm[h]:perm[h] + 1], v[:, perm[h]:perm[h] + 1],
                       sliding_mask(lq, lk, window), scale=scale) for h in range(hq)], axis=1)
    return out


# ---------------------------------------------------------------- Task 2: dilated / hierarchical

def head_offset(h: int, hq: int, dilation: int, head_offsets: bool = True) -> int:
    """The offset head ``h`` keeps inside each segment: heads split into ``dilation`` groups."""
    return h // -(-hq // dilation) if head_offsets else 0


# ANCHOR: dilated_pairs
def dilated_pairs(hq: int, lq: int, lk: int, segment_size: int, dilation: int, *,
                  head_offsets: bool = True, causal: bool = True) -> np.ndarray:
    """``(hq, lq, lk)`` bool: one level pairs query ``i`` (position ``lk - lq + i``) with key ``j``."""
    pairs = np.zeros((hq, lq, lk), dtype=bool)
    t = np.arange(lk)
    segment = t // segment_size
    for h in range(hq):
        offset = head_offset(h, hq, dilation, head_offsets)
        kept = (t - segment * segment_size) % dilation == offset
        for i, p in enumerate(query_positions(lq, lk)):
            if kept[p]:
                pairs[h, i] = kept & (segment == segment[p]) & ((t <= p) if causal else True)
    return pairs
# ANCHOR_END: dilated_pairs


def dilated_attention(q, k, v, segment_size: int, dilation: int, *, head_offsets: bool = True,
                      causal: bool = True, scale=None) -> tuple[np.ndarray, np.ndarray]:
    """One LongNet level: ``(out, lse)``; ``lse`` is ``-inf`` (and ``out`` 0) where no key is paired."""
    hq, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    pairs = dilated_pairs(hq, lq, lk, segment_size, dilation, head_offsets=head_offsets, causal=causal)
    return attention(q, k, v, pairs[None], scale=scale), attention_lse(q, k, pairs[None], scale=scale)


def attention_lse(q, k, mask, *, scale=None) -> np.ndarray:
    """``(B, Hq, Lq)`` float64: log of each row's softmax denominator (``-inf`` for an empty row)."""
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.where(mask, np.einsum("bhid,bhjd->bhij", q, k) * scale, -np.inf)
    m = s.max(axis=-1)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(s - m_safe[..., None]).sum(axis=-1)) + m_safe


def default_dilations(levels) -> list[int]:
    """``w // levels[0]`` per level: every segment keeps about ``levels[0]`` positions."""
    return [max(1, w // levels[0]) for w in levels]


# ANCHOR: hierarchical
def hierarchical_attention(q, k, v, levels, dilations=None, *, causal: bool = True, scale=None,
                           head_offsets: bool = True) -> np.ndarray:
    """LongNet's mix as one softmax over the union, with multiplicity, of every level's keys:
    ``softmax(scores + log c) @ v`` where ``c`` counts the levels that pair query and key."""
    dilations = default_dilations(levels) if dilations is None else dilations
    hq, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    count = sum(dilated_pairs(hq, lq, lk, w, r, head_offsets=head_offsets, causal=causal).astype(np.float64)
                for w, r in zip(levels, dilations))
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    k, v = (np.repeat(x, hq // x.shape[1], axis=1) for x in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with np.errstate(divide="ignore"):
        s = np.einsum("bhid,bhjd->bhij", q, k) * scale + np.log(count)[None]  # log 0 = -inf: unseen
    e = np.exp(s - s.max(axis=-1, keepdims=True))  # level 0 keeps every query: no empty row
    return np.einsum("bhij,bhjd->bhid", e / e.sum(axis=-1, keepdims=True), v)
# ANCHOR_END: hierarchical


def hierarchical_mistakes(q, k, v, levels, dilations=None, *, causal: bool = True, scale=None):
    """What the classic Task 2 mistakes would output, for :func:`assert_close`'s diagnosis."""
    dilations = default_dilations(levels) if dilations is None else dilations
    parts = [dilated_attention(q, k, v, w, r, causal=causal, scale=scale) for w, r in zip(levels, dilations)]
    kept = [np.isfinite(lse)[..., None] for _, lse in parts]
    out = {
        "levels averaged instead of mixed by their softmax denominators (LSE)":
            sum(o for o, _ in parts) / sum(kept),
        "dilation offset not per head (every head keeps offset 0)":
            hierarchical_attention(q, k, v, levels, dilations, causal=causal, scale=scale, head_offsets=False),
        "missing the 1/sqrt(D) scale":
            hierarchical_attention(q, k, v, levels, dilations, causal=causal, scale=1.0),
    }
    if causal:
        out["future positions leak: segments are not causal"] = hierarchical_attention(
            q, k, v, levels, dilations, causal=False, scale=scale)
    return out


# ---------------------------------------------------------------- Task 3: ring

def shard_mask(n_q: int, n_k: int, query_position: int, ring_position: int, causal: bool = True) -> np.ndarray:
    """``(n_q, n_k)`` bool: what one ring step lets query shard ``query_position`` see of kv
    shard ``ring_position`` (later shards nothing, the diagonal causally, earlier ones all)."""
    if not causal or ring_position < query_position:
        return np.ones((n_q, n_k), dtype=bool)
    if ring_position > query_position:
        return np.zeros((n_q, n_k), dtype=bool)
    return np.arange(n_k)[None, :] <= np.arange(n_q)[:, None]


def ring_mistakes(q, k, v, ring_size: int, *, causal: bool = True, scale=None) -> dict[str, np.ndarray]:
    """What the classic Task 3 mistakes would output for a ring of ``ring_size`` equal shards."""
    L = q.shape[2]
    n = -(-L // ring_size)
    shard = np.arange(L) // n
    mask = causal_mask(L, L) if causal else np.ones((L, L), dtype=bool)
    same = shard[:, None] == shard[None, :]
    out = {"missing the 1/sqrt(D) scale": attention(q, k, v, mask, scale=1.0)}
    # Normalised per-shard outputs added up (or averaged) instead of merged by their lse.
    blocks = [attention(q, k, v, mask & (shard[None, :] == s), scale=scale) for s in range(shard[-1] + 1)]
    out["normalised block outputs summed instead of merged by log-sum-exp"] = sum(blocks)
    visible = [(mask & (shard[None, :] == s)).any(axis=1)[None, None, :, None] for s in range(shard[-1] + 1)]
    out["normalised block outputs averaged instead of merged by log-sum-exp"] = sum(blocks) / sum(visible)
    if causal:
        out["later kv shards not skipped (only the diagonal shard is causal)"] = attention(
            q, k, v, mask | (shard[None, :] > shard[:, None]), scale=scale)
        out["diagonal shard not causal"] = attention(q, k, v, mask | same, scale=scale)
        out["causal mask ignored"] = attention(q, k, v, None, scale=scale)
    return out


def attention_weights(q, k, *, scale=None) -> np.ndarray:
    """``(B, Hq, Lq, Lk)`` causal softmax weights in float64 (what eager attention returns)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.where(causal_mask(q.shape[2], k.shape[2]), q @ k.swapaxes(-1, -2) * scale, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ANCHOR: compression_scores
def compression_scores(method: str, keys, queries=None, *, observation_window: int = 32,
                       pool_kernel: int = 5) -> np.ndarray:
    """Importance ``(B, Hkv, L)`` of each cached entry, float64, higher = keep."""
    keys = np.asarray(keys, np.float64)
    B, H, L, _ = keys.shape
    if method == "knorm":
        return -np.sqrt((keys ** 2).sum(axis=-1))
    if method == "streaming":
        return np.broadcast_to(np.arange(L, dtype=np.float64), (B, H, L)).copy()
    a = attention_weights(queries, keys)  # (B, Hq, Lq, L)
    G = a.shape[1] // H
    if method == "h2o":
        return a.sum(axis=2).reshape(B, H, G, L).mean(axis=2)
    w = min(observation_window, a.shape[2], L)
    mean = a[:, :, -w:, :L - w].mean(axis=2)  # (B, Hq, L - w)
    pooled = np.zeros_like(mean)
    for j in range(L - w):  # avg_pool1d, zero padding counted
        lo, hi = max(0, j - pool_kernel // 2), min(L - w, j + pool_kernel // 2 + 1)
        pooled[..., j] = mean[..., lo:hi].sum(axis=-1) / pool_kernel
    scores = np.full((B, H, L), np.inf)
    scores[..., :L - w] = pooled.reshape(B, H, G, L - w).mean(axis=2)
    return scores
# ANCHOR_END: compression_scores


# ANCHOR: kept_indices
def n_kept(length: int, compression_ratio: float) -> int:
    """kvpress's ``compute_n_kept``: ``compression_ratio`` is the fraction removed."""
    return max(1, int(length * (1 - compression_ratio)))


def kept_indices(scores, budget: int, sink_tokens: int, recent_tokens: int,
                 positions=None, length: int | None = None) -> np.ndarray:
    """Ascending indices of the ``budget`` entries kept along the last axis.

    ``positions`` (default ``arange``) place the entries in a sequence of
    ``length``. Positions ``< sink_tokens`` and the last ``recent_tokens``
    positions first (sinks, then the latest, if they alone exceed the budget),
    then the highest scores, ties to the earlier entry.
    """
    scores = np.asarray(scores, np.float64)
    n = scores.shape[-1]
    positions = np.arange(n) if positions is None else np.asarray(positions)
    length = n if length is None else length
    sinks = min(sink_tokens, budget)
    recent = min(recent_tokens, budget - sinks)
    out = np.zeros((*scores.shape[:-1], budget), np.int64)
    for idx in np.ndindex(*scores.shape[:-1]):
        pos = positions[idx] if positions.ndim > 1 else positions
        protected = [j for j in range(n) if pos[j] < sinks or pos[j] >= length - recent]
        rest = sorted((j for j in range(n) if j not in protected), key=lambda j: (-scores[idx][j], j))
        out[idx] = sorted((protected + rest)[:budget])
    return out
# ANCHOR_END: kept_indices


# ANCHOR: qwen3_logits
def qwen3_logits(weights: dict, config: dict, ids, attend=None) -> np.ndarray:
    """A Qwen3 forward in float64 from its Hugging Face weights: logits ``(L, vocab)``.

    ``attend(layer, q, k, v) -> (1, Hq, L, D)`` replaces causal attention
    (``q (1, Hq, L, D)``, ``k, v (1, Hkv, L, D)``, after q/k norm and RoPE).
    """
    w = {name: np.asarray(t, np.float64) for name, t in weights.items()}
    H, Hkv, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps, L = config["rms_norm_eps"], len(ids)

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    angle = np.arange(L)[:, None] * config["rope_theta"] ** (-np.arange(0, D, 2) / D)  # (L, D/2)
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(x):  # (1, H, L, D), pairs (j, j + D/2) as Qwen3 does
        a, b = x[..., :D // 2], x[..., D // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def heads(x, n):
        return x.reshape(L, n, D).transpose(1, 0, 2)[None]  # (1, n, L, D)

    x = w["model.embed_tokens.weight"][np.asarray(ids)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope(norm(heads(h @ w[p + "self_attn.q_proj.weight"].T, H), w[p + "self_attn.q_norm.weight"]))
        k = rope(norm(heads(h @ w[p + "self_attn.k_proj.weight"].T, Hkv), w[p + "self_attn.k_norm.weight"]))
        v = heads(h @ w[p + "self_attn.v_proj.weight"].T, Hkv)
        o = attention(q, k, v, causal_mask(L, L)) if attend is None else attend(i, q, k, v)
        x = x + o[0].transpose(1, 0, 2).reshape(L, H * D) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = norm(x, w["model.norm.weight"])
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T
# ANCHOR_END: qwen3_logits


# ANCHOR: rope_frequencies
def rope_frequencies(rope_scaling: dict, head_dim: int, base: float, seq_len=None) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``(head_dim / 2,)`` and the attention factor, in float64, pair by pair from
    the papers' formulas (``rope_scaling`` as ``longctx.checks.check_rope_scaling`` returns it)."""
    s, d = rope_scaling, head_dim
    kind = s["rope_type"]
    theta = np.array([base ** (-2.0 * i / d) for i in range(d // 2)])  # the original RoPE
    if kind == "default":
        return theta, 1.0
    if kind == "linear":  # PI: every position divided by the factor
        return theta / s["factor"], 1.0
    T0 = s.get("original_max_position_embeddings")
    if kind == "dynamic":  # NTK-aware: a larger base, grown with the length seen
        L = max(seq_len or T0, T0)
        grown = base * (s["factor"] * L / T0 - (s["factor"] - 1)) ** (d / (d - 2))
        return np.array([grown ** (-2.0 * i / d) for i in range(d // 2)]), 1.0
    if kind == "yarn":  # NTK-by-parts: interpolate the pairs with few rotations in T0, keep the fast ones
        def pair_at(rotations):  # the (fractional) pair index i whose wavelength fits `rotations` times in T0
            return d * np.log(T0 / (rotations * 2 * np.pi)) / (2 * np.log(base))
        lo, hi = pair_at(s["beta_fast"]), pair_at(s["beta_slow"])
        if s["truncate"]:
            lo, hi = np.floor(lo), np.ceil(hi)
        lo, hi = max(lo, 0.0), min(hi, d - 1.0)
        hi = hi + 0.001 if lo == hi else hi
        out = np.empty(d // 2)
        for i in range(d // 2):
            ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate (divide)
            out[i] = theta[i] * (1 - ramp) + theta[i] / s["factor"] * ramp

        def mscale(m):
            return 1.0 if s["factor"] <= 1 else 0.1 * m * np.log(s["factor"]) + 1.0
        if s.get("attention_factor") is not None:
            factor = s["attention_factor"]
        elif s.get("mscale") and s.get("mscale_all_dim"):
            factor = mscale(s["mscale"]) / mscale(s["mscale_all_dim"])
        else:
            factor = mscale(1.0)
        return out, float(factor)
    if kind == "llama3":
        out = np.empty(d // 2)
        for i in range(d // 2):
            wavelength = 2 * np.pi / theta[i]
            if wavelength < T0 / s["high_freq_factor"]:
                out[i] = theta[i]
            elif wavelength > T0 / s["low_freq_factor"]:
                out[i] = theta[i] / s["factor"]
            else:
                smooth = (T0 / wavelength - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
                out[i] = (1 - smooth) * theta[i] / s["factor"] + smooth * theta[i]
        return out, 1.0
    # longrope: one rescale factor per pair; the long ones once the sequence is longer than T0
    factors = s["long_factor"] if seq_len and seq_len > T0 else s["short_factor"]
    if s.get("attention_factor") is not None:
        factor = s["attention_factor"]
    else:
        factor = 1.0 if s["factor"] <= 1 else np.sqrt(1 + np.log(s["factor"]) / np.log(T0))
    return theta / np.asarray(factors, np.float64), float(factor)
# ANCHOR_END: rope_frequencies


# ANCHOR: rope
def rope(x, inv_freq, attention_factor: float = 1.0, *, offset: int = 0, traditional: bool = False,
         start_tokens: int = 0, original=None) -> np.ndarray:
    """``x (..., L, D)`` rotated at positions ``offset ..``, in float64: pair ``i`` is dims
    ``(i, i + D/2)`` (Qwen3, Llama; ``traditional``: ``(2i, 2i + 1)``), turned by ``position *
    inv_freq[i]``, times ``attention_factor``. Positions below ``start_tokens`` use ``original``
    (LongRoPE's n_hat: the first tokens keep the unscaled RoPE)."""
    x = np.asarray(x, np.float64)
    L, D = x.shape[-2], x.shape[-1]
    positions = np.arange(offset, offset + L, dtype=np.float64)[:, None]
    angle = positions * np.asarray(inv_freq, np.float64)[None, :]  # (L, D/2)
    if start_tokens:
        early = positions[:, 0] < start_tokens
        angle[early] = positions[early] * np.asarray(original, np.float64)[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = (x[..., 0::2], x[..., 1::2]) if traditional else (x[..., :D // 2], x[..., D // 2:])
    ra, rb = a * cos - b * sin, b * cos + a * sin
    out = np.empty_like(x)
    if traditional:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :D // 2], out[..., D // 2:] = ra, rb
    return out * attention_factor
# ANCHOR_END: rope


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


# ---------------------------------------------------------------- Task 11: linear attention

# ANCHOR: linear_attention
def elu_plus_one(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def linear_attention(q, k, v, state=None, *, eps: float = 1e-6, phi=elu_plus_one, normalise: bool = True):
    """Causal linear attention, ``phi(x) = elu(x) + 1``: ``out_i = phi(q_i) S_i / (phi(q_i) . z_i
    + eps)`` with ``S_i = S_0 + sum_{j <= i} phi(k_j) v_j^T``, ``z_i = z_0 + sum_{j <= i}
    phi(k_j)``; the queries are the last ``Lq`` positions. Returns ``(out, (S, z))``, float64.
    (``phi``, ``normalise=False``: what the classic mistakes compute.)"""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    fq, fk = phi(q), phi(k)
    S = np.zeros((B, Hkv, D, v.shape[-1])) if state is None else np.asarray(state[0], np.float64)
    z = np.zeros((B, Hkv, D)) if state is None else np.asarray(state[1], np.float64)
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for j in range(Lk):
        S = S + np.einsum("bhd,bhe->bhde", fk[:, :, j], v[:, :, j])
        z = z + fk[:, :, j]
        i = j - (Lk - Lq)
        if i >= 0:
            Sq, zq = np.repeat(S, Hq // Hkv, axis=1), np.repeat(z, Hq // Hkv, axis=1)
            num = np.einsum("bhd,bhde->bhe", fq[:, :, i], Sq)
            out[:, :, i] = num / ((fq[:, :, i] * zq).sum(-1, keepdims=True) + eps) if normalise else num
    return out, (S, z)
# ANCHOR_END: linear_attention


# ---------------------------------------------------------------- Task 12: Longformer, BigBird

# ANCHOR: longformer_mask
def longformer_mask(lq: int, lk: int, window: int, global_tokens=(), causal: bool = False) -> np.ndarray:
    """``(lq, lk)`` bool. Local query ``p``: ``|p - j| <= window / 2`` (causal: ``p - window < j
    <= p``) or ``j`` global (causal: and ``j <= p``). A global query sees every key (causal:
    ``j <= p``). Each key at most once: a mask has no multiplicity."""
    p = query_positions(lq, lk)[:, None]
    j = np.arange(lk)[None, :]
    g = np.isin(j, list(global_tokens))
    past = j <= p
    if causal:
        mask = past & ((j > p - window) | g)
    else:
        mask = (np.abs(p - j) <= window // 2) | g
    rows = np.isin(p[:, 0], list(global_tokens))
    mask[rows] = past[rows] if causal else True
    return mask
# ANCHOR_END: longformer_mask


def longformer_attention(q, k, v, window: int, global_tokens=(), causal: bool = False, *, global_qkv=None,
                         scale=None) -> np.ndarray:
    """Attention under :func:`longformer_mask`; the global queries' rows from ``global_qkv``."""
    lq, lk = q.shape[2], k.shape[2]
    mask = longformer_mask(lq, lk, window, global_tokens, causal)
    out = attention(q, k, v, mask, scale=scale)
    if global_qkv is not None:
        rows = np.isin(query_positions(lq, lk), list(global_tokens))
        out[:, :, rows] = attention(*global_qkv, mask, scale=scale)[:, :, rows]
    return out


# ANCHOR: bigbird_counts
def bigbird_counts(heads: int, num_blocks: int, block_size: int, random_blocks, causal: bool = False) -> np.ndarray:
    """``(heads, L, L)``: how many times query ``i`` counts key ``j`` in BigBird's softmax. Query
    blocks ``0, n-1``: every key once. Middle block ``i``: the set {global blocks (0 and n-1;
    causal: 0), window blocks ``i-1 .. i+1`` (causal: ``i-2 .. i``) inside ``0 .. n-1``} once
    each, plus one per entry of ``random_blocks[h, i]`` that is ``>= 0``. Causal: times ``j <= i``."""
    n, b = num_blocks, block_size
    L = n * b
    counts = np.zeros((heads, L, L))
    for h in range(heads):
        for i in range(n):
            rows = slice(i * b, (i + 1) * b)
            if i in (0, n - 1):
                counts[h, rows] = 1
                continue
            fixed = {0} | ({i - 2, i - 1, i} if causal else {n - 1, i - 1, i, i + 1})
            for c in [c for c in fixed if 0 <= c < n] + [int(c) for c in random_blocks[h, i] if c >= 0]:
                counts[h, rows, c * b:(c + 1) * b] += 1
    if causal:
        counts *= np.tril(np.ones((L, L)))
    return counts
# ANCHOR_END: bigbird_counts


def weighted_attention(q, k, v, counts, *, scale=None) -> np.ndarray:
    """Softmax attention where key ``j`` enters query ``i``'s softmax ``counts[..., i, j]`` times
    (``counts`` broadcastable to ``(B, Hq, Lq, Lk)``; 0 = masked; every row needs a key)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, np.repeat(k, rep, axis=1)) * scale
    e = np.exp(s - s.max(axis=-1, keepdims=True)) * counts
    return np.einsum("bhij,bhjd->bhid", e / e.sum(axis=-1, keepdims=True), np.repeat(v, rep, axis=1))


def bigbird_attention(q, k, v, block_size: int, random_blocks, causal: bool = False, *, scale=None) -> np.ndarray:
    """Attention weighted by :func:`bigbird_counts`."""
    counts = bigbird_counts(q.shape[1], q.shape[2] // block_size, block_size, np.asarray(random_blocks), causal)
    return weighted_attention(q, k, v, counts[None], scale=scale)
