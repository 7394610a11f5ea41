"""A tiny Qwen3 checkpoint in the Hugging Face layout, built offline.

``make_checkpoint(path)`` writes ``config.json`` (``model_type: qwen3``),
``model.safetensors`` (``transformers``' ``save_pretrained``), and a
byte-level BPE tokenizer trained with ``tokenizers`` on the public-domain
texts in ``longctx.data``, with Qwen3's special tokens and ChatML template.
The real loaders read it: ``mlx_lm.load(path)``,
``AutoModelForCausalLM.from_pretrained(path)``, ``AutoTokenizer.from_pretrained(path)``.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from longctx.checks import check_positive_int
from longctx.data import SPECIAL_TOKENS

# Qwen3's template, without tools and thinking: <|im_start|>role\ncontent<|im_end|>\n per message.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_tokenizer(vocab_size: int = 512):
    """Byte-level BPE (GPT-2 / Qwen style) trained on the shipped corpus, specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from longctx.data import corpus
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


@functools.cache
def tiny_tokenizer(vocab_size: int = 512):
    """The checkpoint's tokenizer as transformers loads it (``PreTrainedTokenizerFast``, ChatML
    template, ``<|im_end|>`` ends a turn), built in memory."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(vocab_size), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def save_tokenizer(tokenizer, path: Path):
    """``tokenizer.save_pretrained(path)``, with the chat template in one home, ``tokenizer_config.json``
    (transformers 5 also writes a ``chat_template.jinja``; older mlx-lm versions only read the config)."""
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(tokenizer_config, indent=2))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return tokenizer


def make_checkpoint(path, *, seed: int = 0, layers: int = 2, tie_word_embeddings: bool = True,
                    vocab_size: int = 512) -> Path:
    """Write the tiny Qwen3 (``longctx.models.torch_qwen3`` weights) and its tokenizer to ``path``."""
    from transformers.utils.logging import disable_progress_bar

    from longctx.models.tiny import torch_qwen3
    layers = check_positive_int("layers", layers)
    if check_positive_int("vocab_size", vocab_size) < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), "
                         f"got {vocab_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(tiny_tokenizer(vocab_size), path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    model = torch_qwen3(seed, num_hidden_layers=layers, tie_word_embeddings=tie_word_embeddings,
                        vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    model.config._attn_implementation = "sdpa"  # torch_qwen3 picks eager for the tests; loaders choose their own
    disable_progress_bar()
    model.save_pretrained(path, safe_serialization=True)
    return path
