"""The Task 4 methods keep exactly what NVIDIA's kvpress keeps (``KnormPress``,
``SnapKVPress``, ``StreamingLLMPress``), for the oracle, the MLX reference and
the torch mirror.

kvpress pins ``transformers<5.3``, so it is not a dependency: ``.ci/run``
installs it with ``--no-deps`` and this file imports the three press modules
without the package ``__init__`` (which pulls in ``datasets``, ``peft`` ...).
"""
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch

from longctx import mlx as lmx
from longctx import torch as lt
from longctx.testing.inputs import make_qkv
from longctx.testing.oracles import attention_weights, compression_scores, kept_indices, n_kept


@pytest.fixture(scope="module")
def kvpress():
    spec = importlib.util.find_spec("kvpress")
    if spec is None:
        pytest.skip("kvpress is not installed: pip install --no-deps kvpress==0.5.5")
    root = Path(spec.submodule_search_locations[0])
    for name, path in (("kvpress", root), ("kvpress.presses", root / "presses")):
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    from kvpress.presses.knorm_press import KnormPress
    from kvpress.presses.snapkv_press import SnapKVPress
    from kvpress.presses.streaming_llm_press import StreamingLLMPress
    return SimpleNamespace(knorm=KnormPress, snapkv=SnapKVPress, streaming=StreamingLLMPress)


def kvpress_kept(press, q, k, v) -> np.ndarray:
    """Positions kvpress keeps, read back from the keys it returns (random rows are unique)."""
    B, Hq, L, D = q.shape
    module = SimpleNamespace(head_dim=D, config=SimpleNamespace(num_attention_heads=Hq,
                                                                num_key_value_heads=k.shape[1]))
    keys, values = torch.tensor(k, dtype=torch.float32), torch.tensor(v, dtype=torch.float32)
    attentions = torch.tensor(attention_weights(q, k), dtype=torch.float32)  # eager attention's weights
    kept, _ = press.compress(module, torch.zeros(B, L, 1), keys, values, attentions, {})
    match = (kept[:, :, :, None, :] == keys[:, :, None, :, :]).all(-1)  # (B, H, n, L)
    return np.sort(match.float().argmax(-1).numpy(), axis=-1)


CASES = [(37, 0.5, 1, 1, 5), (64, 0.2, 4, 2, 8), (100, 0.8, 2, 2, 16), (53, 0.65, 6, 3, 4)]


@pytest.mark.parametrize("L, ratio, Hq, Hkv, window", CASES)
@pytest.mark.parametrize("method", ["knorm", "snapkv", "streaming"])
def test_kept_sets_equal_kvpress(kvpress, method, L, ratio, Hq, Hkv, window):
    q, k, v = make_qkv(L, 2, Hq, Hkv, L, L, 8, std=1.5)
    if method == "knorm":
        press, kw = kvpress.knorm(compression_ratio=ratio), dict(sink_tokens=0, recent_tokens=0)
    elif method == "snapkv":
        press = kvpress.snapkv(compression_ratio=ratio, window_size=window, kernel_size=5)
        kw = dict(sink_tokens=0, recent_tokens=0, observation_window=window, pool_kernel=5)
    else:
        press, kw = kvpress.streaming(compression_ratio=ratio, n_sink=3), dict(sink_tokens=3, recent_tokens=window)
    want = kvpress_kept(press, q, k, v)

    oracle = kept_indices(compression_scores(method, k, q, observation_window=window), n_kept(L, ratio),
                          kw["sink_tokens"], kw["recent_tokens"])
    np.testing.assert_array_equal(oracle, want, err_msg="the float64 oracle")
    _, _, pos = lmx.ContextCompressor(ratio, method=method, **kw).compress_kv(
        mx.array(k, mx.float32), mx.array(v, mx.float32), mx.array(q, mx.float32))
    np.testing.assert_array_equal(np.array(pos), want, err_msg="longctx.mlx")
    _, _, pos = lt.ContextCompressor(ratio, method=method, **kw).compress_kv(
        torch.tensor(k, dtype=torch.float32), torch.tensor(v, dtype=torch.float32),
        torch.tensor(q, dtype=torch.float32))
    np.testing.assert_array_equal(pos.numpy(), want, err_msg="longctx.torch")
