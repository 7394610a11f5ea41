"""Task 12 against Hugging Face's layers on random weights: ``LongformerSelfAttention`` and
``BigBirdBlockSparseAttention`` (bidirectional, both backends).

The layers' own projections make ``q, k, v`` (and Longformer's global ``q, k, v``); our
functions get those and must give HF's output. BigBird in evaluation mode draws no random
blocks (its indices are all 0: block 0 counts ``1 + r`` times), which ``random_blocks=0``
reproduces; in training mode (no dropout in this layer) it uses the blocks we hand it.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from transformers import BigBirdConfig, LongformerConfig  # noqa: E402
from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel  # noqa: E402
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

H, D = 4, 8


def heads(x, L):
    return x.view(x.shape[0], L, H, D).transpose(1, 2).numpy()


def ours(backend, name, q, k, v, *args, **kw):
    if backend == "mlx":
        import mlx.core as mx

        from longctx.mlx import sparse
        conv, back = mx.array, np.array
    else:
        from longctx.torch import sparse
        conv, back = torch.from_numpy, lambda t: t.numpy()
    kw = {k: tuple(conv(a) for a in v) if k == "global_qkv" else v for k, v in kw.items()}
    out = back(getattr(sparse, name)(conv(q), conv(k), conv(v), *args, **kw))
    return out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("L, window, globals_", [(16, 4, (0, 5)), (48, 8, (0, 1, 47)), (24, 6, ()),
                                                  (32, 16, (3, 4, 20))])
def test_longformer_equals_hugging_face(backend, L, window, globals_):
    torch.manual_seed(L + window)
    config = LongformerConfig(hidden_size=H * D, num_attention_heads=H, attention_window=[window],
                              attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(config, 0).eval()
    x = torch.randn(2, L, H * D)
    mask = torch.zeros(2, L)
    mask[:, list(globals_)] = 1  # HF's layer mask: 0 local, > 0 global, < 0 padding
    with torch.no_grad():
        want = layer(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                     is_global_attn=bool(globals_))[0].numpy()
        qkv = [heads(m(x), L) for m in (layer.query, layer.key, layer.value)]
        global_qkv = tuple(heads(m(x), L) for m in (layer.query_global, layer.key_global, layer.value_global))
    got = ours(backend, "longformer_attention", *qkv, window, globals_, global_qkv=global_qkv)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def bigbird(L, b, r):
    torch.manual_seed(L + b + r)
    config = BigBirdConfig(hidden_size=H * D, num_attention_heads=H, block_size=b, num_random_blocks=r,
                           attention_type="block_sparse", max_position_embeddings=4 * L)
    layer = BigBirdBlockSparseAttention(config, seed=0)
    x = torch.randn(2, L, H * D)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(2, L), b)
    with torch.no_grad():
        qkv = [heads(m(x), L) for m in (layer.query, layer.key, layer.value)]

    def run():
        with torch.no_grad():
            return layer(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                         to_blocked_mask=blocked)[0].numpy()
    return layer, qkv, run


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("n, b, r", [(9, 4, 2), (12, 2, 3), (8, 8, 1)])
def test_bigbird_evaluation_mode_equals_hugging_face(backend, n, b, r):
    """HF in ``eval()``: no random draw, every "random" block is block 0."""
    layer, qkv, run = bigbird(n * b, b, r)
    layer.eval()
    want = run()
    got = ours(backend, "bigbird_attention", *qkv, b, r, 0, random_blocks=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    drawn = ours(backend, "bigbird_attention", *qkv, b, r, 0)
    assert np.abs(drawn - want).max() > 1e-3, "real random blocks are not HF's evaluation mode"


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("n, b, r, seed", [(9, 4, 2, 0), (12, 2, 3, 5)])
def test_bigbird_random_blocks_equal_hugging_face_training_mode(backend, n, b, r, seed):
    """HF in ``train()`` with the blocks ``bigbird_random_blocks`` draws (one set per head)."""
    from longctx.mlx.sparse import bigbird_random_blocks
    layer, qkv, run = bigbird(n * b, b, r)
    blocks = bigbird_random_blocks(n, r, seed, heads=H)
    layer.train()
    layer._bigbird_block_rand_mask_with_head = lambda *a, **kw: [blocks[h, 1:-1] for h in range(H)]
    want = run()
    got = ours(backend, "bigbird_attention", *qkv, b, r, seed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
