"""Graded tests, Task 13: drop-in attention modules, ``x (B, L, d_model) -> (B, L, d_model)``.

Run: ``pytest labs/week3 --task 13`` (your stubs), ``--impl solutions`` or ``--impl torch``.
Expected values: the module's own weights applied in float64 numpy (projections, RoPE from
``longctx.testing.oracles``, the technique's oracle attention, the output projection).
"""

import numpy as np
import pytest

from longctx.testing import assert_close, oracles

pytestmark = pytest.mark.task(13)


def formula(arrays, module, x, attention, rope=True):
    """The module in float64: its weights read back, each step written out."""
    W = {name: arrays.numpy(getattr(module, name).weight)
         for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    B, L, _ = x.shape
    H, Hkv, hd = module.n_heads, module.n_kv_heads, module.head_dim

    def heads(y, n):
        return y.reshape(B, L, n, hd).transpose(0, 2, 1, 3)
    q, k, v = heads(x @ W["q_proj"].T, H), heads(x @ W["k_proj"].T, Hkv), heads(x @ W["v_proj"].T, Hkv)
    if rope:
        inv_freq = 10_000.0 ** (-np.arange(0, hd, 2) / hd)
        q, k = oracles.rope(q, inv_freq), oracles.rope(k, inv_freq)
    return attention(q, k, v).transpose(0, 2, 1, 3).reshape(B, L, H * hd) @ W["o_proj"].T


@pytest.mark.parametrize("kind, options, attention", [
    ("full", {}, lambda q, k, v: oracles.attention(q, k, v, oracles.causal_mask(q.shape[2], q.shape[2]))),
    ("sliding", {"window_size": 5}, lambda q, k, v: oracles.sliding_window_attention(q, k, v, 5)),
    ("sliding_window", {"window_size": 1}, lambda q, k, v: oracles.sliding_window_attention(q, k, v, 1)),
])
@pytest.mark.parametrize("heads, kv_heads, rope", [(4, 2, True), (2, 2, False), (4, 1, True)])
def test_module_is_projections_rope_attention_projection(lab, arrays, kind, options, attention, heads, kv_heads,
                                                          rope):
    """GQA (kv heads shared by groups of query heads), RoPE on q and k only, the heads merged back
    in order, the output projection; two rows of a batch stay apart."""
    nn = lab("nn")
    module = nn.create_efficient_attention(kind, 32, heads, n_kv_heads=kv_heads, rope=rope, **options)
    x = np.random.default_rng(heads + 7 * kv_heads).standard_normal((2, 19, 32))
    got = arrays.numpy(module(arrays.asarray(x)))
    assert_close(got, formula(arrays, module, x, attention, rope), rtol=1e-4, atol=1e-4,
                 name=f"{kind} module, {heads} heads, {kv_heads} kv heads, rope={rope}")


def test_dilated_module_runs_longnets_levels(lab, arrays):
    """LongNet's ``DilatedAttention(d_model, num_heads, dilation_rate, segment_size)``: the levels
    ``segment_size * r ** i`` with dilations ``r ** i``, mixed as Task 2 mixes them."""
    module = lab("nn").DilatedAttention(32, 4, dilation_rate=2, segment_size=4)
    x = np.random.default_rng(1).standard_normal((1, 23, 32))
    got = arrays.numpy(module(arrays.asarray(x)))
    want = formula(arrays, module, x, lambda q, k, v: oracles.hierarchical_attention(q, k, v, [4, 8, 16], [1, 2, 4]))
    assert_close(got, want, rtol=1e-4, atol=1e-4, name="DilatedAttention(32, 4, 2, 4)")
