"""Task 8's float64 oracle: a Qwen3 forward from its Hugging Face weights."""
from __future__ import annotations

import numpy as np

from longctx.exact import attention, causal_mask


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
