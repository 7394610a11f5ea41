"""The offline tiny Qwen3 checkpoint: written in the Hugging Face layout, read by the real
loaders (mlx-lm and transformers), the same model on both sides."""
import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

from longctx.models import CHAT_TEMPLATE, make_checkpoint, torch_qwen3

TEXTS = ["Four score and seven years ago our fathers brought forth",
         "Unseen words: Zürich, 東京, emoji 🙂, tabs\tand\nnewlines -- 12345."]


@pytest.fixture(scope="module", params=[dict(), dict(layers=3, tie_word_embeddings=False, seed=7)],
                ids=["tied", "untied"])
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), **request.param), request.param


def test_layout_is_hugging_faces(checkpoint):
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_mlx_lm_and_transformers_read_the_same_model(checkpoint):
    import mlx_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, options = checkpoint
    mlx_model, mlx_tokenizer = mlx_lm.load(str(path))
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    ids = hf_tokenizer(TEXTS[0])["input_ids"]
    assert mlx_tokenizer.encode(TEXTS[0]) == ids
    got = np.array(mlx_model(mx.array(ids)[None])[0])
    with torch.no_grad():
        want = hf_model(torch.tensor(ids)[None]).logits[0].numpy()
        seeded = torch_qwen3(options.get("seed", 0), num_hidden_layers=options.get("layers", 2),
                             tie_word_embeddings=options.get("tie_word_embeddings", True),
                             vocab_size=hf_model.config.vocab_size,  # pad's embedding row starts at zero
                             pad_token_id=hf_model.config.pad_token_id)(torch.tensor(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(want, seeded, rtol=1e-5, atol=1e-5)  # the checkpoint is longctx.models' model
    assert got.shape == (len(ids), 512)


def test_tokenizer_is_lossless_byte_level_bpe_with_qwen_specials(checkpoint):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(checkpoint[0])
    for text in TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer(TEXTS[0])["input_ids"]) < len(TEXTS[0].encode()) / 2, "BPE merges were learned"
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(special)["input_ids"]) == 1, special
    assert tokenizer.eos_token == "<|im_end|>"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_cli_writes_a_checkpoint_and_rejects_bad_sizes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "longctx.cli", "make-model", str(tmp_path / "m"), "--layers", "1"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and (tmp_path / "m" / "model.safetensors").is_file(), ok.stdout + ok.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 1
    bad = subprocess.run([sys.executable, "-m", "longctx.cli", "make-model", str(tmp_path / "n"), "--vocab-size",
                          "100"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "vocab_size must be >= 259" in bad.stderr


STRATEGIES = [("full", {}), ("sliding", {"window_size": 24, "chunk_size": 16}),
              ("hierarchical", {"levels": [8, 32], "dilations": [1, 2], "chunk_size": 20}),
              ("streaming", {"sink_tokens": 4, "window": 20, "chunk_size": 12}),
              ("compressed", {"compression_ratio": 0.6, "method": "snapkv", "observation_window": 8})]


@pytest.fixture(scope="module")
def loaded(checkpoint):
    import mlx_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, _ = checkpoint
    mlx_model, mlx_tokenizer = mlx_lm.load(str(path))
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return mlx_model, mlx_tokenizer, hf_model, AutoTokenizer.from_pretrained(path)


def test_full_generate_is_mlx_lm_generate(loaded):
    """Serving code's view: the checkpoint through mlx_lm.load, greedy, token for token."""
    from mlx_lm import stream_generate

    from longctx.mlx import LongContextQwen3
    model, tokenizer, _, _ = loaded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], add_generation_prompt=True)
    want = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=16)]
    got = list(LongContextQwen3(model, "full").generate(prompt, 16))
    assert got[:len(want)] == want  # mlx-lm stops early at <|im_end|>; ours yields max_new_tokens


@pytest.mark.parametrize("strategy, options", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_mlx_and_torch_wrappers_agree(loaded, strategy, options):
    """The same checkpoint in mlx-lm and transformers, each wrapped, past every window."""
    from longctx.mlx import LongContextQwen3 as MLXWrapper
    from longctx.torch import LongContextQwen3 as TorchWrapper
    mlx_model, _, hf_model, hf_tokenizer = loaded
    ids = hf_tokenizer(" ".join(TEXTS) * 2)["input_ids"]
    assert len(ids) > 60
    a, b = MLXWrapper(mlx_model, strategy, **options), TorchWrapper(hf_model, strategy, **options)
    np.testing.assert_allclose(np.array(a.process_long_sequence(ids)), b.process_long_sequence(ids).numpy(),
                               rtol=1e-4, atol=1e-4)
    assert list(a.generate(ids, 10)) == list(b.generate(ids, 10))
    assert hf_model.config._attn_implementation != "longctx", "the model is left as it was"
