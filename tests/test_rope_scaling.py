"""Task 9 against the libraries people use: transformers' ``ROPE_INIT_FUNCTIONS`` and Qwen3, mlx-lm's
``initialize_rope`` (where it agrees and where it does not), ``LongContextQwen3(rope_scaling=...)``
against transformers' own forward, and ``longctx extend`` read by both loaders."""
import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from longctx.models import make_checkpoint, mlx_qwen3, torch_qwen3
from longctx.techniques.rope import ROPE_METHODS, check_rope_scaling
from longctx.testing import oracles

T0 = 64


def configs(pairs: int, T: int = T0, factor: float = 4.0) -> dict:
    ramp = np.linspace(0, 1, pairs)
    return {
        "linear": {"rope_type": "linear", "factor": factor},
        "dynamic": {"rope_type": "dynamic", "factor": factor},  # T0: max_position_embeddings, in both loaders
        "yarn": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T},
        "yarn-deepseek": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": T,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "llama3": {"rope_type": "llama3", "factor": factor, "original_max_position_embeddings": T,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        "longrope": {"rope_type": "longrope", "factor": factor, "original_max_position_embeddings": T,
                     "short_factor": list(1 + 0.1 * ramp), "long_factor": list(1 + (factor - 1) * ramp ** 2)},
    }


def hf_frequencies(scaling: dict, d: int, base: float, max_positions: int, seq_len=None):
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = Qwen3Config(head_dim=d, hidden_size=4 * d, num_attention_heads=4, max_position_embeddings=max_positions,
                         rope_parameters={**scaling, "rope_theta": base})
    inv_freq, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq.double().numpy(), factor


def test_each_rope_type_is_one_entry_and_one_function_per_backend():
    """A RoPE type is declared once (``ROPE_TYPES``: its keys, their check, its extension formula) and
    initialised by one function in each backend and in the oracle, under the names transformers uses."""
    import longctx.mlx.rope_scaling
    import longctx.torch.rope_scaling
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from longctx.techniques.rope import ROPE_TYPES, rope_scaling_for
    from longctx.testing.oracles import rope_scaling as oracle
    assert set(longctx.mlx.rope_scaling.SCALINGS) == set(longctx.torch.rope_scaling.SCALINGS) \
        == set(oracle.SCALINGS) == set(ROPE_TYPES)
    assert set(ROPE_TYPES) - {"default"} <= set(ROPE_INIT_FUNCTIONS), "the names are transformers'"
    assert set(ROPE_METHODS) == set(ROPE_TYPES) - {"default"}
    for name, kind in ROPE_TYPES.items():
        if kind.extend is not None:
            scaling = rope_scaling_for(name, 4.0, T0)
            assert check_rope_scaling(scaling, 32)["rope_type"] == name, "a formula's dict passes its own check"


@pytest.mark.parametrize("d, base, T", [(32, 10_000.0, 512), (128, 500_000.0, 8192), (64, 1e6, 4096)])
@pytest.mark.parametrize("kind", list(configs(4)))
def test_frequencies_are_transformers(d, base, T, kind):
    """Both backends give transformers' inverse frequencies and attention factor for the same dict."""
    from longctx.mlx.rope_scaling import rope_frequencies as mlx_frequencies
    from longctx.torch.rope_scaling import rope_frequencies as torch_frequencies
    scaling = configs(d // 2, T)[kind]
    ours = scaling if kind != "dynamic" else {**scaling, "original_max_position_embeddings": T}
    for seq_len in (None, T // 2, T, 3 * T):
        want, want_factor = hf_frequencies(dict(scaling), d, base, T, seq_len)
        for name, fn in (("mlx", mlx_frequencies), ("torch", torch_frequencies)):
            got, factor = fn(ours, d, base, seq_len)
            got = np.array(got, np.float64) if name == "mlx" else got.double().numpy()
            np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=f"{name} {kind} at seq_len {seq_len}")
            assert factor == pytest.approx(want_factor, rel=1e-7), (name, kind, seq_len)


def mlx_lm_rope(scaling, d=32, base=10_000.0, max_positions=4 * T0):
    from mlx_lm.models.rope_utils import initialize_rope
    return initialize_rope(d, base, False, scaling, max_position_embeddings=max_positions)


def rotations(scaling, L, offset, d=32, max_positions=4 * T0):
    """``(mlx-lm's module, longctx's ScaledRoPE)`` applied to the same ``x (1, 2, L, d)``."""
    from longctx.mlx.rope_scaling import ScaledRoPE
    x = mx.array(np.random.default_rng(L).standard_normal((1, 2, L, d)).astype(np.float32))
    ours = ScaledRoPE(d, 10_000.0, {"original_max_position_embeddings": max_positions, **scaling}
                      if scaling["rope_type"] == "dynamic" else scaling)
    return np.array(mlx_lm_rope(scaling, d, max_positions=max_positions)(x, offset=offset)), np.array(ours(x, offset=offset))


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "yarn-deepseek", "llama3", "longrope"])
def test_scaled_rope_agrees_with_mlx_lm(kind):
    """Where mlx-lm implements a method the same way (LongRoPE beyond T0, with max_position_embeddings
    = factor x T0), the rotations agree."""
    scaling = configs(16)[kind]
    max_positions = T0 if kind == "dynamic" else 4 * T0
    for L, offset in ((7, 0), (40, 3 * T0), (1, 5 * T0)):
        if kind == "longrope" and offset + L <= T0:
            continue  # below T0: the first disagreement, tested below
        theirs, ours = rotations(scaling, L, offset, max_positions=max_positions)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4, err_msg=f"{kind} L={L} offset={offset}")


def test_where_mlx_lm_and_transformers_disagree():
    """The configurations the chapter teaches. longctx follows transformers; each line checks that
    mlx-lm (0.32) really does the other thing, so the book's claims fail loudly when it changes."""
    base = configs(16)
    # 1. LongRoPE below T0: transformers uses short_factor, mlx-lm's SuScaledRoPE always long_factor.
    theirs, ours = rotations(base["longrope"], 10, 0)
    from longctx.mlx.rope_scaling import ScaledRoPE
    x = mx.array(np.random.default_rng(10).standard_normal((1, 2, 10, 32)).astype(np.float32))
    forced = ScaledRoPE(32, 10_000.0, base["longrope"])
    forced.seq_len = 4 * T0
    assert not np.allclose(ours, theirs, atol=1e-3)
    np.testing.assert_allclose(theirs, np.array(forced(x)), rtol=1e-4, atol=1e-4)
    # 2. LongRoPE's attention factor: mlx-lm ignores `attention_factor` and `factor`, using
    #    max_position_embeddings / original_max_position_embeddings.
    for extra in ({"attention_factor": 1.0}, {"factor": 2.0}):
        theirs, ours = rotations({**base["longrope"], **extra}, 5, 3 * T0)
        assert not np.allclose(ours, theirs, atol=1e-3), extra
    # 3. YaRN with `mscale` but no `mscale_all_dim`: transformers ignores mscale (0.1 ln s + 1), mlx-lm
    #    uses it (0.1 mscale ln s + 1); an explicit `attention_factor` and `truncate: false` are
    #    ignored by mlx-lm.
    for extra in ({"mscale": 0.707}, {"attention_factor": 1.0}, {"truncate": False}):
        theirs, ours = rotations({**base["yarn"], **extra}, 5, 3 * T0)
        assert not np.allclose(ours, theirs, atol=1e-3), extra
    # 4. YaRN without original_max_position_embeddings: transformers takes max_position_embeddings,
    #    mlx-lm 4096.
    no_original = {k: v for k, v in base["yarn"].items() if k != "original_max_position_embeddings"}
    from mlx_lm.models.rope_utils import initialize_rope
    x = mx.array(np.random.default_rng(0).standard_normal((1, 2, 5, 32)).astype(np.float32))
    theirs = np.array(initialize_rope(32, 10_000.0, False, no_original, max_position_embeddings=T0)(x, offset=300))
    ours = np.array(ScaledRoPE(32, 10_000.0, {**no_original, "original_max_position_embeddings": T0})(x, offset=300))
    assert not np.allclose(ours, theirs, atol=1e-3)


@pytest.mark.parametrize("kind", ["yarn", "longrope", "dynamic", "llama3"])
def test_long_context_qwen3_scaled_equals_transformers(kind):
    """``LongContextQwen3(model, strategy, rope_scaling=...)``, prefilled in chunks, equals transformers'
    one forward of a model whose config carries the same dict, in both backends and with the
    strategies that are exact at this length (full; sliding and streaming with room for all)."""
    from longctx.mlx import LongContextQwen3 as MLXQwen3
    from longctx.torch import LongContextQwen3 as TorchQwen3
    scaling = configs(8, T=32)[kind]
    ids = np.random.default_rng(0).integers(0, 256, 90).tolist()
    reference = torch_qwen3(0, max_position_embeddings=32, rope_parameters={**scaling, "rope_theta": 10_000.0})
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
    mlx_model, torch_model = mlx_qwen3(0, max_position_embeddings=32), torch_qwen3(0, max_position_embeddings=32)
    for strategy, options in (("full", {}), ("sliding", {"window_size": 128}),
                              ("streaming", {"sink_tokens": 4, "window": 100})):
        got = np.array(MLXQwen3(mlx_model, strategy, rope_scaling=scaling, chunk_size=16, **options)
                       .process_long_sequence(ids)[0])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"mlx {strategy}")
        got = TorchQwen3(torch_model, strategy, rope_scaling=scaling, chunk_size=16, **options) \
            .process_long_sequence(ids)[0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"torch {strategy}")
    for layer in mlx_model.layers:  # the caller's model is left as it was
        assert type(layer.self_attn.rope).__name__ == "RoPE"
    assert type(torch_model.model.rotary_emb).__name__ == "Qwen3RotaryEmbedding"


def test_generate_keeps_one_set_of_frequencies():
    """Greedy generation with a scaled RoPE continues exactly as a full forward of prompt + output
    with the frequencies of the whole call (LongRoPE crosses T0 during generation here)."""
    from longctx.mlx import LongContextQwen3
    from longctx.mlx.rope_scaling import ScaledRoPE
    scaling = configs(8, T=32)["longrope"]
    model = mlx_qwen3(0, max_position_embeddings=32)
    ids = np.random.default_rng(1).integers(0, 256, 28).tolist()
    out = list(LongContextQwen3(model, "full", rope_scaling=scaling).generate(ids, 8))
    rope = ScaledRoPE(16, 10_000.0, scaling)
    rope.seq_len = len(ids) + 8
    before = [layer.self_attn.rope for layer in model.layers]
    for layer in model.layers:
        layer.self_attn.rope = rope
    logits = np.array(model(mx.array([ids + out[:-1]]))[0])
    for layer, r in zip(model.layers, before):
        layer.self_attn.rope = r
    assert out == logits[len(ids) - 1:].argmax(-1).tolist()


SHORT = 256  # the training mix's rows (a passkey prompt alone is ~150 tokens) need this much


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """The tiny seeded checkpoint with a training length of 256 tokens."""
    path = make_checkpoint(tmp_path_factory.mktemp("short"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": SHORT}))
    return path


@pytest.mark.parametrize("method", ROPE_METHODS)
def test_extend_writes_a_folder_both_loaders_read(short_model, tmp_path, method):
    """``longctx extend`` writes rope_scaling with HF's keys: mlx_lm.load and from_pretrained give
    equal logits past the original length, and they are longctx's ScaledRoPE's."""
    import mlx_lm
    from transformers import AutoModelForCausalLM

    from longctx.extend import extend
    from longctx.mlx import LongContextQwen3
    out = extend(short_model, tmp_path / "out", method=method, factor=4, search=method == "longrope",
                 population=4, generations=1, rows=1, log=lambda *_: None)
    config = json.loads((out / "config.json").read_text())
    scaling = config["rope_scaling"]
    assert scaling["rope_type"] == method and not (tmp_path / "out.partial").exists()
    assert config["max_position_embeddings"] == (SHORT if method == "dynamic" else 4 * SHORT)
    if method == "longrope":
        assert len(scaling["long_factor"]) == 8 and "start_tokens" not in scaling
        assert json.loads((out / "extend.json").read_text())["search"]["long"]["evaluated"] == 4 + 1 * (1 + 1)  # population, 1 generation of 4 // 4 + 4 // 4
    ids = np.random.default_rng(2).integers(10, 500, 3 * SHORT).tolist()
    mlx_model, _ = mlx_lm.load(str(out))
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = np.array(mlx_model(mx.array([ids]))[0])
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    base, _ = mlx_lm.load(str(short_model))
    ours = np.array(LongContextQwen3(base, "full", rope_scaling=scaling).process_long_sequence(ids)[0])
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=2e-4)


def test_extend_rejects_bad_requests(short_model, tmp_path):
    from longctx.extend import extend
    for kwargs, word in (({"method": "longrope", "factor": 4}, "search"), ({"method": "yarn", "factor": 1},
                                                                           "factor"),
                         ({"method": "ntk", "factor": 4}, "method"),
                         ({"method": "yarn", "factor": 4, "search": True}, "search")):
        with pytest.raises(ValueError, match=word):
            extend(short_model, tmp_path / "x", **kwargs)
    for existing in (short_model, short_model / "config.json"):  # nothing is overwritten
        with pytest.raises(ValueError, match="out"):
            extend(short_model, existing, method="yarn", factor=4)
    assert (short_model / "model.safetensors").exists()


def test_finetune_continues_at_the_new_length(short_model, tmp_path):
    """``train-tiny --from`` (``finetune``): a few steps at 1024 tokens with YaRN write weights that
    moved, with the losses; the folder from ``extend --finetune-steps`` loads in both loaders."""
    from longctx.extend import extend
    out = extend(short_model, tmp_path / "ft", method="yarn", factor=4, finetune_steps=2, log=lambda *_: None)
    log = json.loads((out / "finetune.json").read_text())
    assert log["steps"] == 2 and len(log["losses"]) == 2 and log["seq_len"] == 4 * SHORT
    import mlx_lm
    before, _ = mlx_lm.load(str(short_model))
    after, _ = mlx_lm.load(str(out))
    w0, w1 = np.array(before.model.embed_tokens.weight), np.array(after.model.embed_tokens.weight)
    assert not np.allclose(w0, w1), "fine-tuning did not change the weights"


def test_oracle_is_transformers_on_a_grid():
    """The float64 oracle the graded tests use is itself transformers' formula (float32 rounding apart)."""
    for base in (10_000.0, 500_000.0):
        for kind, scaling in configs(16, T=512).items():
            ours = scaling if kind != "dynamic" else {**scaling, "original_max_position_embeddings": 512}
            for seq_len in (None, 300, 5000):
                want, want_factor = hf_frequencies(dict(scaling), 32, base, 512, seq_len)
                got, factor = oracles.rope_frequencies(check_rope_scaling(ours, 32), 32, base, seq_len)
                np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=f"{kind} base {base} seq_len {seq_len}")
                assert factor == pytest.approx(want_factor)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_scaled_ropes_cache_stays_bounded_while_decoding(backend):
    """Dynamic NTK's frequencies depend on each call's length: one entry per decoded token would
    grow without end, so ScaledRoPE keeps the last ``CACHED_LENGTHS`` (and still rotates as fresh)."""
    import importlib
    module = importlib.import_module(f"longctx.{backend}.rope_scaling")
    scaling = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 8}
    rope, fresh = module.ScaledRoPE(16, 10000.0, scaling), module.ScaledRoPE(16, 10000.0, scaling)
    x = np.random.default_rng(0).standard_normal((1, 2, 1, 16)).astype(np.float32)
    array = mx.array if backend == "mlx" else torch.tensor
    for offset in range(0, 3 * module.CACHED_LENGTHS + 5):
        out = rope(array(x), offset)
        fresh._cache.clear()
        assert np.allclose(np.array(out.tolist()), np.array(fresh(array(x), offset).tolist()), atol=1e-6)
    assert len(rope._cache) == module.CACHED_LENGTHS
