"""The torch mirror of Task 11 against flash-linear-attention, the library people use.

fla's pure-torch references (``fla.ops.linear_attn.naive``) run on a CPU; its
package ``fla.ops`` imports the Triton kernels, so the reference file is loaded
by path (Triton is a GPU dependency; ``fla-core`` itself needs only einops).
fla takes features already mapped, in ``(B, T, H, D)``, and ``normalize=True``
divides by ``phi(q) . z``.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fla = pytest.importorskip("fla", reason="fla-core is a dev dependency")

from longctx.torch import linear  # noqa: E402


def naive():
    path = Path(list(fla.__path__)[0]) / "ops" / "linear_attn" / "naive.py"
    spec = importlib.util.spec_from_file_location("fla_linear_attn_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def features(q, k, v):
    """Our (B, H, T, D) inputs as fla's (B, T, H, D) features."""
    return (linear.feature_map(q).transpose(1, 2), linear.feature_map(k).transpose(1, 2), v.transpose(1, 2))


@pytest.mark.parametrize("L", [1, 37, 128])
def test_recurrent_reference_and_state(L):
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(2, 3, L, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ours, (S, z) = linear.linear_attention(q.float(), k.float(), v.float(), chunk_size=16)
    theirs, (S_fla, z_fla) = naive().naive_recurrent_linear_attn(*features(q, k, v), normalize=True,
                                                                 output_final_state=True)
    np.testing.assert_allclose(ours.double(), theirs.transpose(1, 2), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(S.double(), S_fla, rtol=1e-4, atol=1e-4)  # fla's S: (B, H, K, V), as ours
    np.testing.assert_allclose(z.double(), z_fla[:, 0], rtol=1e-4, atol=1e-4)  # fla's z: the last k cumsum


def test_recurrent_reference_from_a_state():
    """fla's ``initial_state=(S, z)`` continues a stream as our ``state=`` does."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=g, dtype=torch.float64) for _ in range(3))
    _, state = linear.linear_attention(q[:, :, :20].float(), k[:, :, :20].float(), v[:, :, :20].float())
    ours, _ = linear.linear_attention(q[:, :, 20:].float(), k[:, :, 20:].float(), v[:, :, 20:].float(), state=state)
    theirs, _ = naive().naive_recurrent_linear_attn(
        *features(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:]),
        initial_state=(state[0], state[1][:, None]), normalize=True)
    np.testing.assert_allclose(ours.double(), theirs.transpose(1, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("L", [64, 192])
def test_chunk_reference(L):
    """fla's chunked reference (chunks of 64, so ``L`` a multiple of 64) equals our chunked form."""
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(1, 4, L, 32, generator=g, dtype=torch.float64) for _ in range(3))
    theirs = naive().naive_chunk_linear_attn(*features(q, k, v), normalize=True)
    state = linear.empty_state(1, 4, 32, 32)
    ours, _ = linear.linear_attention_chunked(q.float(), k.float(), v.float(), state, 64)
    np.testing.assert_allclose(ours.double(), theirs.transpose(1, 2), rtol=1e-4, atol=1e-5)
