"""Task 6 in PyTorch: a conversation under a token budget, the mirror of ``longctx.mlx``.

The manager works on text and a tokenizer, not on arrays, so it has one
source, the reference (``solutions/week3/adaptive.py``, book chapter
"Adaptive context"), which imports no MLX: loading it here leaves ``mlx`` out
of the process. Only the summarizer that asks the model differs: here it is a
Hugging Face model through ``generate``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from longctx.checks import check_positive_int
from longctx.mlx.adaptive import AdaptiveContextManager, ContextOverflowError


def llm_summarizer(model, tokenizer, *, max_tokens: int = 128) -> Callable[[str], str]:
    """A ``summarizer`` that asks the model itself (a transformers causal LM and its
    tokenizer), greedy, through ``model.generate``."""
    max_tokens = check_positive_int("max_tokens", max_tokens)

    def summarize(text: str) -> str:
        request = [{"role": "user", "content": "Summarize the key facts, names, numbers and decisions of this "
                                               f"conversation as short bullet points:\n\n{text}"}]
        ids = tokenizer.apply_chat_template(request, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"].to(model.device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return summarize


__all__ = ["AdaptiveContextManager", "ContextOverflowError", "llm_summarizer"]
