"""Tiny seeded models, built offline: the same weights for mlx-lm and transformers."""
from longctx.models.tiny import TINY_QWEN3, hf_config, mlx_qwen3, torch_qwen3

__all__ = ["TINY_QWEN3", "hf_config", "mlx_qwen3", "torch_qwen3"]
