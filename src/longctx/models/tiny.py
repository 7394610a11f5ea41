"""A tiny Qwen3, seeded: ``transformers``' ``Qwen3ForCausalLM`` makes the
weights, mlx-lm's ``qwen3.Model`` loads the same tensors through its own
``sanitize`` and ``load_weights``. Nothing is downloaded.
"""
from __future__ import annotations

TINY_QWEN3 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=1 << 20, tie_word_embeddings=True,
                  initializer_range=0.1)


def hf_config(**overrides):
    from transformers import Qwen3Config
    return Qwen3Config(**{**TINY_QWEN3, **overrides})


def torch_qwen3(seed: int = 0, **overrides):
    """``Qwen3ForCausalLM`` in float32, eval mode, weights from ``torch.manual_seed(seed)``."""
    import torch
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    config = hf_config(**overrides)
    config._attn_implementation = "eager"  # exact softmax; works with every cache
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():  # RMSNorm weights start at 1, which gives every key (after k_norm) the same norm
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def mlx_qwen3(seed: int = 0, **overrides):
    """mlx-lm's Qwen3 holding the same weights as ``torch_qwen3(seed, **overrides)``."""
    import mlx.core as mx
    from mlx_lm.models.qwen3 import Model, ModelArgs
    config = {**TINY_QWEN3, **overrides}
    args = ModelArgs.from_dict({"model_type": "qwen3", **config})
    model = Model(args)
    weights = {name: mx.array(t.detach().numpy()) for name, t in torch_qwen3(seed, **overrides).state_dict().items()}
    model.load_weights(list(model.sanitize(weights).items()))
    mx.eval(model.parameters())
    return model
