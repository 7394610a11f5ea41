"""Argument checks that the labs *give* (``longctx.checks``, outside the learner's TODOs): tested
here on both references, not graded, since a learner cannot break them. Each bad call raises a
``ValueError`` naming the argument."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx.testing.backends import make_backend

BACKENDS = ["mlx", "torch"]


def lab(backend: str, module: str):
    return importlib.import_module(f"longctx.{backend}.{module}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, key", [
    ({"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 512, "short_factor": [1.0] * 16,
      "long_factor": [1.0] * 15}, "long_factor"),
    ({"rope_type": "linear", "factor": 0.5}, "factor"),
    ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ({"rope_type": "ntk-by-parts", "factor": 4.0}, "rope_type"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 512, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0}, "high_freq_factor"),
])
def test_bad_rope_scalings_raise(backend, bad, key):
    m = lab(backend, "rope_scaling")
    with pytest.raises(ValueError, match=key):
        m.rope_frequencies(bad, 32, 10_000.0)
    with pytest.raises(ValueError, match=key):
        m.ScaledRoPE(32, 10_000.0, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_memory_arguments_raise(backend):
    from longctx.models import mlx_qwen3, torch_qwen3
    arrays = make_backend(backend)
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 3, 8)), rng.standard_normal((1, 1, 3, 8)), rng.standard_normal((1, 1, 3, 8))
    mk, mv = rng.standard_normal((1, 1, 4, 8)), rng.standard_normal((1, 1, 4, 8))
    xs = [arrays.asarray(x) for x in (q, k, v, mk, mv)]
    m = lab(backend, "memory")
    model = (mlx_qwen3 if backend == "mlx" else torch_qwen3)(0)
    LC = lab(backend, "qwen3_long").LongContextQwen3
    for options, name in (({"top_k": 0}, "top_k"), ({"memory_layers": [2]}, "memory_layers"),
                          ({"memory_layers": [-1]}, "memory_layers"), ({"last_context_length": -1},
                                                                       "last_context_length"),
                          ({"last_context_length": 600, "context_length": 512}, "last_context_length")):
        with pytest.raises(ValueError, match=name):
            LC(model, "memory", **options)
    with pytest.raises(ValueError, match="memory_keys"):
        m.memory_attention(*xs[:3], arrays.asarray(mk[..., :4]), xs[4])
    with pytest.raises(ValueError, match="top_k"):
        m.memory_attention(*xs, top_k=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_linear_attention_input_raises(backend):
    arrays = make_backend(backend)
    m = lab(backend, "linear")
    x = arrays.asarray(np.ones((1, 2, 6, 4)))
    _, state = m.linear_attention(x, x, x)
    for chunk in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            m.linear_attention(x, x, x, chunk_size=chunk)
    with pytest.raises(ValueError, match="state"):
        m.linear_attention(x, x, x, state=(state[0], state[0]))
    with pytest.raises(ValueError, match="state"):
        m.linear_attention(x, x, x, state=state[0])
    with pytest.raises(ValueError, match="Lq"):
        m.linear_attention_quadratic(x[:, :, :3], x, x)
    with pytest.raises(ValueError, match="Lq"):
        m.linear_attention(arrays.asarray(np.ones((1, 2, 7, 4))), x, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_sparse_attention_input_raises(backend):
    arrays = make_backend(backend)
    sparse = lab(backend, "sparse")
    x = arrays.asarray(np.ones((1, 2, 16, 4)))
    for window in (3, 0, -2, 2.0):
        with pytest.raises(ValueError, match="window"):
            sparse.longformer_attention(x, x, x, window)
    for globals_ in ((16,), (-1,), (0.5,)):
        with pytest.raises(ValueError, match="global_tokens"):
            sparse.longformer_attention(x, x, x, 4, globals_)
    with pytest.raises(ValueError, match="Lq"):
        sparse.longformer_attention(x[:, :, :3], x, x, 4)  # bidirectional needs Lq == Lk
    with pytest.raises(ValueError, match="block_size"):
        sparse.bigbird_attention(x, x, x, 5, 1, 0)  # 16 is not a multiple of 5
    for block in (0, -4):
        with pytest.raises(ValueError, match="block_size"):
            sparse.bigbird_attention(x, x, x, block, 1, 0)
    with pytest.raises(ValueError, match="num_random_blocks"):
        sparse.bigbird_attention(x, x, x, 4, -1, 0)
    with pytest.raises(ValueError, match="random_blocks"):
        sparse.bigbird_attention(x, x, x, 4, 1, 0, random_blocks=np.zeros((2, 3, 1), np.int64))
