"""Tiny seeded models, built offline: the same weights for mlx-lm and transformers, and a
checkpoint in the Hugging Face layout that the real loaders read (``longctx make-model PATH``)."""
from longctx.models.checkpoint import CHAT_TEMPLATE, make_checkpoint, tiny_tokenizer, train_tokenizer
from longctx.models.tiny import TINY_QWEN3, hf_config, mlx_qwen3, torch_qwen3

__all__ = ["CHAT_TEMPLATE", "TINY_QWEN3", "hf_config", "make_checkpoint", "mlx_qwen3", "tiny_tokenizer",
           "torch_qwen3", "train_tokenizer"]
