"""The drop-in attention modules (``longctx.mlx.nn``, ``longctx.torch.nn``): every technique as a
trainable module, one weight layout in both backends, the seeds' calls."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import longctx  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as mlx_nn
from longctx.mlx import nn as mnn
from longctx.techniques import TECHNIQUES
from longctx.testing import oracles
from longctx.torch import nn as tnn

# Small options for L = 48 (BigBird works in whole blocks); every kind the modules take is here.
SMALL = {"full": {}, "sliding": {"window_size": 8}, "hierarchical": {"levels": [8, 32]},
         "ring": {"ring_size": 2, "block_size": 16}, "memory": {"context_length": 16, "top_k": None},
         "linear": {"chunk_size": 8}, "longformer": {"window": 8, "global_tokens": (0, 5)},
         "bigbird": {"block_size": 8, "num_random_blocks": 1}}
D_MODEL, HEADS, KV_HEADS, L = 64, 4, 2, 48


def test_every_kind_is_here():
    assert set(SMALL) == {n for n, t in TECHNIQUES.items() if t.attention or n == "full"}


def pair(kind, tmp_path, **options):
    """The MLX module and the torch module holding its weights (saved, then loaded)."""
    m = mnn.create_efficient_attention(kind, D_MODEL, HEADS, n_kv_heads=KV_HEADS, **SMALL[kind], **options)
    m.save_weights(str(tmp_path / "w.safetensors"))
    t = tnn.create_efficient_attention(kind, D_MODEL, HEADS, n_kv_heads=KV_HEADS, **SMALL[kind], **options)
    assert not t.load_state_dict(load_file(tmp_path / "w.safetensors")).missing_keys
    return m, t


@pytest.mark.parametrize("kind", list(SMALL))
def test_one_weight_layout_same_outputs_and_gradients(kind, tmp_path):
    """Weights saved from MLX load into torch; the two give the same outputs and the same gradient
    of a loss for every weight and for the input (each backend differentiating on its own)."""
    m, t = pair(kind, tmp_path, bias=True)
    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal((2, L, D_MODEL)).astype(np.float32) for _ in range(2))

    def mlx_loss(model, x):
        return (model(x) * mx.array(w)).sum()
    loss, grads = mlx_nn.value_and_grad(m, mlx_loss)(m, mx.array(x))
    dx = mx.grad(lambda x: mlx_loss(m, x))(mx.array(x))
    xt = torch.tensor(x, requires_grad=True)
    out = t(xt)
    (out * torch.tensor(w)).sum().backward()
    assert np.allclose(np.array(m(mx.array(x))), out.detach().numpy(), atol=1e-4), f"{kind}: outputs differ"
    assert abs(float(loss) - float((out.detach() * torch.tensor(w)).sum())) < 1e-2
    for name, p in t.named_parameters():
        module, leaf = name.split(".")
        g = np.array(grads[module][leaf])
        assert p.grad is not None and np.abs(g).max() > 0, f"{kind}: {name} gets no gradient"
        assert np.allclose(g, p.grad.numpy(), rtol=1e-3, atol=1e-3 * np.abs(g).max()), f"{kind}: d{name} differs"
    assert np.allclose(np.array(dx), xt.grad.numpy(), rtol=1e-3, atol=1e-3 * np.abs(np.array(dx)).max())


@pytest.mark.parametrize("kind", ["full", "sliding"])
def test_module_is_the_float64_formula(kind, tmp_path):
    """Projections, RoPE (pairs (i, i + head_dim / 2)), causal or windowed attention, projection."""
    m, _ = pair(kind, tmp_path)
    x = np.random.default_rng(1).standard_normal((1, L, D_MODEL))
    W = {name: np.array(p, dtype=np.float64) for name, p in dict(mlx_nn.utils.tree_flatten(m.parameters())).items()}
    hd = D_MODEL // HEADS

    def heads(y, n):
        return y.reshape(1, L, n, hd).transpose(0, 2, 1, 3)
    inv_freq = 10_000.0 ** (-np.arange(0, hd, 2) / hd)
    q = oracles.rope(heads(x @ W["q_proj.weight"].T, HEADS), inv_freq)
    k = oracles.rope(heads(x @ W["k_proj.weight"].T, KV_HEADS), inv_freq)
    v = heads(x @ W["v_proj.weight"].T, KV_HEADS)
    a = (oracles.attention(q, k, v, oracles.causal_mask(L, L)) if kind == "full"
         else oracles.sliding_window_attention(q, k, v, SMALL["sliding"]["window_size"]))
    want = a.transpose(0, 2, 1, 3).reshape(1, L, D_MODEL) @ W["o_proj.weight"].T
    assert np.allclose(np.array(m(mx.array(x.astype(np.float32)))), want, atol=1e-4)


@pytest.mark.parametrize("nn", [mnn, tnn], ids=["mlx", "torch"])
def test_the_seeds_calls(nn):
    """The calls of the documents this course grew from (OpenLongContext, LongNet) run as written,
    or refuse naming what is not here."""
    x = np.random.default_rng(2).standard_normal((2, 128, 512)).astype(np.float32)
    as_input = mx.array if nn is mnn else torch.tensor
    sparse = nn.create_efficient_attention("sparse", d_model=512, block_size=64, num_random_blocks=3)
    window = nn.create_efficient_attention("sliding_window", d_model=512, window_size=64)
    dilated = nn.DilatedAttention(d_model=512, num_heads=8, dilation_rate=2, segment_size=64, dropout=0.2)
    flash = nn.FlashAttention(d_model=512, n_heads=8, dropout=0.1, causal=True, window_size=None)
    for module in (sparse, window, dilated, flash):
        assert tuple(module(as_input(x)).shape) == (2, 128, 512)
    assert dilated.attend.levels == [64, 128, 256] and dilated.attend.dilations == [1, 2, 4]
    assert "scaled_dot_product_attention" in repr(flash), "FlashAttention says which kernel it runs"
    with pytest.raises(ValueError, match="feature_dim"):  # Performer's random features: not this course's linear
        nn.create_efficient_attention("linear", d_model=768, feature_dim=256)


@pytest.mark.parametrize("nn", [mnn, tnn], ids=["mlx", "torch"])
@pytest.mark.parametrize("call, match", [
    (lambda nn: nn.create_efficient_attention("streaming", 64), "kind"),
    (lambda nn: nn.create_efficient_attention("sliding", 60, 8), "d_model"),
    (lambda nn: nn.create_efficient_attention("sliding", 64, 4, n_kv_heads=3), "n_kv_heads"),
    (lambda nn: nn.create_efficient_attention("sliding", 64, 4, dropout=1.0), "dropout"),
    (lambda nn: nn.FlashAttention(64, 4, causal=False, window_size=8), "causal"),
    (lambda nn: nn.DilatedAttention(64, 4, dilation_rate=0), "dilation_rate"),
])
def test_bad_arguments_name_themselves(nn, call, match):
    with pytest.raises(ValueError, match=match):
        call(nn)


def test_technique_attention_runs_an_mlx_lm_model_with_a_technique():
    """Inside ``technique_attention`` every layer of mlx-lm's Qwen3 runs the technique (a window as
    long as the row is full attention; linear attention is not); the model is itself again after,
    a cache is refused, and BigBird gets rows padded to whole blocks."""
    from longctx.models import mlx_qwen3
    model = mlx_qwen3(0)
    ids = mx.array(np.random.default_rng(3).integers(3, 200, (1, 70)))
    full = np.array(model(ids))
    with mnn.technique_attention(model, "sliding", window_size=70):
        assert np.allclose(np.array(model(ids)), full, atol=1e-4)
    with mnn.technique_attention(model, "linear"):
        assert not np.allclose(np.array(model(ids)), full, atol=1e-2)
    with mnn.technique_attention(model, "bigbird", block_size=16, num_random_blocks=1):
        assert np.array(model(ids)).shape == full.shape  # 70 rows, padded to 80 inside
    assert np.array_equal(np.array(model(ids)), full), "the model's own attention is back"
    from mlx_lm.models.cache import make_prompt_cache
    with mnn.technique_attention(model, "sliding", window_size=8), pytest.raises(ValueError, match="cache"):
        model(ids, cache=make_prompt_cache(model))
    with pytest.raises(ValueError, match="causal"), mnn.technique_attention(model, "longformer", causal=False):
        pass


def test_train_tiny_trains_with_every_technique(tmp_path):
    """``train-tiny --attention`` for each technique, tiny settings: finite losses, the technique
    recorded in ``config.json`` and ``train.json``, and training really ran it (linear attention's
    first loss is not full attention's)."""
    import json

    from longctx import cli
    from longctx.models.train import train_model
    tiny = {"steps": 1, "short_steps": 1, "batch_size": 1, "seq_len": 256, "log": lambda *a: None}
    first = {}
    for kind, options in SMALL.items():
        options = {"bigbird": {"block_size": 32, "num_random_blocks": 1}}.get(kind, options)
        _, config, _, record = train_model(**tiny, attention=kind, attention_options=options)
        assert np.isfinite(record["losses"]).all() and config["longctx_attention"]["technique"] == kind
        first[kind] = record["losses"][0]
    assert first["linear"] != first["full"]
    out = tmp_path / "model"
    assert cli.main(["train-tiny", str(out), "--attention", "sliding_window", "-o", "window_size=32", "--steps", "1",
                     "--short-steps", "1", "--batch-size", "1", "--seq-len", "256"]) in (0, 1)  # 1: no induction head
    recorded = json.loads((out / "train.json").read_text())["longctx_attention"]
    assert recorded == {"technique": "sliding", "options": {"window_size": 32}}
    assert cli.main(["train-tiny", str(tmp_path / "x"), "-o", "window_size=32"]) == 2, "-o needs --attention"


def test_train_tiny_continues_the_shipped_model_with_a_technique(tmp_path):
    """``train-tiny --from shipped --attention``: long-context training of an existing model, then
    passkeys at the trained length and twice it, greedy under the technique; ``--max-seconds``
    stops a run at equal wall time; an existing folder is never overwritten."""
    import json

    from longctx import cli
    from longctx.eval import WholeRows
    out = tmp_path / "sliding"
    args = ["train-tiny", str(out), "--from", "shipped", "--attention", "sliding", "-o", "window_size=64",
            "--seq-len", "256", "--batch-size", "1"]
    assert cli.main([*args, "--steps", "5", "--max-seconds", "0.001"]) == 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["steps"] == 1 and record["planned_steps"] == 5, "--max-seconds stops after the step that reaches it"
    assert set(record["passkey"]) == {"256", "512"} and all(0 <= v <= 1 for v in record["passkey"].values())
    assert record["tokens_per_second"] > 0 and record["peak_memory_mb"] > 0 and len(record["times"]) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["longctx_attention"] == {"technique": "sliding", "options": {"window_size": 64}}
    assert cli.main([*args, "--steps", "1"]) == 2, "an existing model folder is not overwritten"
    assert cli.main(["train-tiny", str(tmp_path / "y"), "--max-seconds", "5"]) == 2, "--max-seconds needs --from"

    # WholeRows decodes greedily under the technique: a window as long as the row is the model itself.
    runner, tokenizer = WholeRows.load(out)
    runner.options = {"window_size": 10_000}
    ids = tokenizer.encode("The pass key is 12345. Remember it. The pass key is")
    tokens, row = list(runner.generate(ids, 4)), list(ids)
    for _ in range(4):
        row.append(int(mx.argmax(runner.model(mx.array([row]))[0, -1])))
    assert tokens == row[len(ids):]
