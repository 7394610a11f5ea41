"""Issue 18: the sub-quadratic techniques hold O(tile) memory beyond q, k, v and the output (MLX and torch).

The tiles are made small here (the module constants, patched) so that a few
thousand tokens already span many tiles: the tiled paths are checked against
the float64 oracles on awkward sizes, and ``longctx bench --scaling``'s own
function must find the memory beyond the output flat from L to 4L. Times are
never asserted (that is the command's job, on a quiet machine).
"""
from __future__ import annotations

import numpy as np
import pytest

import longctx  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from longctx import bench, techniques  # noqa: E402
from longctx.mlx import benchmark, hierarchical, linear, sliding, sparse  # noqa: E402
from longctx.techniques import SUBQUADRATIC  # noqa: E402
from longctx.testing import oracles  # noqa: E402
from longctx.testing.compare import assert_close  # noqa: E402
from longctx.testing.inputs import make_qkv  # noqa: E402


@pytest.fixture
def small_tiles(monkeypatch):
    import longctx.torch.linear
    import longctx.torch.sliding
    import longctx.torch.sparse
    from longctx import native
    monkeypatch.setattr(native, "sliding_window", lambda *args: None)  # the ops path (test_native checks the kernel)
    monkeypatch.setattr(techniques.hierarchical, "HIERARCHICAL_TILE", 1 << 10)
    for module in (sliding, longctx.torch.sliding):
        monkeypatch.setattr(module, "TILE_ELEMENTS", 1 << 12)
    for module in (sparse, longctx.torch.sparse):
        monkeypatch.setattr(module, "TILE", 1 << 12)
    for module in (linear, longctx.torch.linear):
        monkeypatch.setattr(module, "SEGMENT_CHUNKS", 2)


def _mx(*arrays, dtype=mx.float32):
    return [mx.array(a.astype(np.float32)).astype(dtype) for a in arrays]


@pytest.mark.parametrize("Hq, Hkv, Lq, Lk, W, glob", [
    (4, 2, 301, 301, 37, ()), (2, 1, 77, 300, 64, (0, 5)), (3, 3, 250, 250, 1, (7,)), (2, 2, 90, 90, 500, ())])
def test_sliding_in_many_tiles_equals_the_oracle(small_tiles, Hq, Hkv, Lq, Lk, W, glob):
    q, k, v = make_qkv(0, 1, Hq, Hkv, Lq, Lk, 16)
    out = sliding.SlidingWindowAttention(W, global_tokens=glob)(*_mx(q, k, v))
    assert_close(np.array(out), oracles.sliding_window_attention(q, k, v, W, global_tokens=glob), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, W, glob", [
    (2, 4, 2, 301, 301, 37, ()), (2, 2, 1, 77, 300, 64, (0, 5)), (1, 3, 3, 250, 250, 1, (7,))])
def test_torch_sliding_in_many_sdpa_steps_equals_the_oracle(monkeypatch, B, Hq, Hkv, Lq, Lk, W, glob):
    """The torch mirror's SDPA band tiles, a few blocks per step, batch > 1 (one mask per block)."""
    import torch

    import longctx.torch.sliding as torch_sliding
    monkeypatch.setattr(torch_sliding, "TILE_ELEMENTS", 1 << 12)
    q, k, v = make_qkv(6, B, Hq, Hkv, Lq, Lk, 16)
    out = torch_sliding.SlidingWindowAttention(W, global_tokens=glob)(
        *(torch.tensor(x, dtype=torch.float32) for x in (q, k, v)))
    assert_close(out.numpy(), oracles.sliding_window_attention(q, k, v, W, global_tokens=glob), rtol=2e-5, atol=2e-5)


def test_sliding_in_many_tiles_keeps_fp16_with_large_logits(small_tiles):
    q, k, v = make_qkv(1, 1, 2, 2, 200, 200, 16, std=6.0)
    out = sliding.SlidingWindowAttention(33)(*_mx(q, k, v, dtype=mx.float16))
    q16, k16, v16 = (np.array(x.astype(mx.float32), dtype=np.float64) for x in _mx(q, k, v, dtype=mx.float16))
    assert out.dtype == mx.float16
    assert_close(np.array(out.astype(mx.float32)), oracles.sliding_window_attention(q16, k16, v16, 33),
                 rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("Hq, Hkv, Lq, Lk, levels, causal", [
    (4, 2, 203, 203, [4, 8, 16], True), (2, 1, 50, 203, [4, 12], True), (2, 2, 96, 96, [8, 16], False)])
def test_hierarchical_in_many_spans_equals_the_oracle(small_tiles, backend, Hq, Hkv, Lq, Lk, levels, causal):
    import torch

    from longctx.torch import HierarchicalAttention
    q, k, v = make_qkv(2, 1, Hq, Hkv, Lq, Lk, 16)
    if backend == "mlx":
        attend, inputs = hierarchical.HierarchicalAttention(levels, causal=causal), _mx(q, k, v)
    else:
        attend, inputs = HierarchicalAttention(levels, causal=causal), [torch.tensor(x, dtype=torch.float32)
                                                                        for x in (q, k, v)]
    assert attend.span(Hq) < Lk  # the tiled path runs
    out = attend(*inputs)
    assert_close(np.array(out) if backend == "mlx" else out.numpy(), oracles.hierarchical_attention(q, k, v, levels, causal=causal),
                 rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("Lq, Lk, window, glob, causal", [
    (250, 250, 20, (0, 3, 249), False), (61, 250, 17, (0, 100, 240), True)])
def test_longformer_in_many_tiles_equals_the_oracle(small_tiles, Lq, Lk, window, glob, causal):
    q, k, v = make_qkv(3, 1, 4, 2, Lq, Lk, 16)
    out = sparse.longformer_attention(*_mx(q, k, v), window, glob, causal)
    assert_close(np.array(out), oracles.longformer_attention(q, k, v, window, glob, causal), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_in_many_tiles_equals_the_oracle(small_tiles, causal):
    q, k, v = make_qkv(4, 1, 4, 2, 7 * 12, 7 * 12, 16)
    rand = sparse.bigbird_random_blocks(12, 2, 5, heads=4, causal=causal)
    out = sparse.bigbird_attention(*_mx(q, k, v), 7, 2, causal=causal, random_blocks=rand)
    assert_close(np.array(out), oracles.bigbird_attention(q, k, v, 7, rand, causal), rtol=2e-5, atol=2e-5)


def test_streaming_benchmark_run_writes_every_chunk():
    """The benchmark's streaming run (its output written chunk by chunk in place) against the
    same chunks concatenated."""
    q, k, v = _mx(*make_qkv(5, 1, 2, 2, 300, 300, 16))
    fn, rows = benchmark.attention_run("streaming", q, k, v, sink_tokens=2, window=40, chunk_size=32)
    cache, outs = benchmark.SinkKVCache(2, 40), []
    for s in range(0, 300, 32):
        keys, values = cache.update_and_fetch(k[:, :, s:s + 32], v[:, :, s:s + 32])
        outs.append(mx.fast.scaled_dot_product_attention(q[:, :, s:s + 32], keys, values, scale=0.25, mask="causal"))
    assert_close(np.array(fn()), np.array(mx.concatenate(outs, axis=2)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_memory_beyond_the_output_does_not_grow_with_L(small_tiles, backend):
    """``longctx bench --scaling``'s function, at a small size where every technique spans many tiles."""
    names = [n for n in SUBQUADRATIC if n != "compressed"]  # it keeps (1 - ratio) L entries by design
    # Window 96: BigBird's block is 32, a divisor of L (BigBirdAttention pads other lengths: a copy).
    rows = bench.scaling_rows(backend, bench.techniques_for(names, 96), 4096, heads=2, head_dim=32)
    assert [r["technique"] for r in rows] == names
    grew = {r["technique"]: (r["beyond_bytes"] / 2**20, r["beyond_4x_bytes"] / 2**20)
            for r in rows if not r["flat_memory"]}
    assert not grew, f"MiB beyond q, k, v and the output at L=4096 and 16384: {grew}"


@pytest.mark.parametrize("Hq, Hkv, Lq, Lk, w, r", [(4, 2, 50, 50, 16, 4), (6, 3, 7, 93, 12, 3), (3, 1, 61, 61, 64, 8),
                                               (2, 2, 1, 40, 8, 2)])
def test_torch_hierarchical_fused_blocks_equal_the_explicit_scores(monkeypatch, Hq, Hkv, Lq, Lk, w, r):
    """A causal level on the CPU runs torch's flash kernel, which ignores ``key_ok``: that is right
    only because every kept row's earlier keys are valid. Check it where padding exists (a partial
    last segment, head offsets, Lq < Lk): out and lse equal the explicit scores'."""
    import torch

    from longctx.torch import hierarchical as th
    q, k, v = (torch.tensor(x, dtype=torch.float32) for x in make_qkv(Lk + w, 1, Hq, Hkv, Lq, Lk, 16))
    fused = th.dilated_attention(q, k, v, w, r)
    explicit_blocks = th._block_attention
    monkeypatch.setattr(th, "_block_attention", lambda *args, fused: explicit_blocks(*args, fused=False))
    explicit = th.dilated_attention(q, k, v, w, r)
    assert_close(fused[0].numpy(), explicit[0].numpy(), rtol=2e-5, atol=2e-5)
    kept = explicit[1].isfinite()  # -inf: rows this level does not keep
    assert torch.equal(fused[1].isfinite(), kept)
    assert_close(fused[1][kept].numpy(), explicit[1][kept].numpy(), rtol=2e-5, atol=2e-5)


TILED = [("sliding", "sliding", "TILE_ELEMENTS"), ("linear", "linear", "SEGMENT_CHUNKS"),
         ("longformer", "sparse", "TILE"), ("bigbird", "sparse", "TILE")]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_the_memory_estimate_follows_the_tile_the_code_uses(monkeypatch, backend):
    """The registry's formulas read each module's tiling constant: retune a tile and the estimate
    (which decides the benchmark rows skipped) moves with it, and still bounds the measured peak."""
    import importlib
    package = importlib.import_module(f"longctx.{backend}")
    L, H, D = 4096, 2, 32
    before = {name: techniques.estimate_memory(name, L, heads=H, head_dim=D, backend=backend) for name, *_ in TILED}
    for name, module, const in TILED:
        module = importlib.import_module(f"{package.__name__}.{module}")
        monkeypatch.setattr(module, const, max(1, getattr(module, const) // 16))
    from longctx import native
    monkeypatch.setattr(native, "sliding_window", lambda *args: None)
    rows = bench.run(backend, bench.techniques_for([n for n, *_ in TILED], 96), [L], heads=H, head_dim=D, repeats=1)
    for r in rows:
        after = techniques.estimate_memory(r["technique"], L, heads=H, head_dim=D, backend=backend)
        assert after < before[r["technique"]], r["technique"]
        assert 0 < r["peak_memory_bytes"] <= 1.5 * after, r  # within the estimate's small factor at 1/16 the tile
