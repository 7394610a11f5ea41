"""Models without a network: tiny seeded Qwen3s (the same weights for mlx-lm and transformers),
a checkpoint writer in the Hugging Face layout (``longctx make-model PATH``), and the small
trained Qwen3 that ships in this folder (``TRAINED``; ``longctx train-tiny`` remakes it)."""
from pathlib import Path

from longctx.models.checkpoint import CHAT_TEMPLATE, make_checkpoint, tiny_tokenizer, train_tokenizer
from longctx.models.tiny import TINY_QWEN3, hf_config, mlx_qwen3, torch_qwen3

TRAINED = Path(__file__).parent / "qwen3-tiny-longctx"


def load_trained(backend: str = "mlx", path=TRAINED):
    """``(model, tokenizer)`` of the shipped model (or another folder) through the real loaders:
    ``mlx_lm.load`` for ``"mlx"``, ``AutoModelForCausalLM`` / ``AutoTokenizer`` for ``"torch"``."""
    if backend == "mlx":
        from mlx_lm import load
        return load(str(path))
    if backend != "torch":
        raise ValueError(f"backend must be 'mlx' or 'torch', got {backend!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(path).float().eval(), AutoTokenizer.from_pretrained(path)


__all__ = ["CHAT_TEMPLATE", "TINY_QWEN3", "TRAINED", "hf_config", "load_trained", "make_checkpoint", "mlx_qwen3",
           "tiny_tokenizer", "torch_qwen3", "train_tokenizer"]
