# Learner stub for Task 12, generated from solutions/week3/sparse.py by `longctx stubs`.
# Replace each `raise NotImplementedError(...)` with your code; grade it with
#     pytest labs/week3 --task 12
"""Task 12: global + local sparse attention, Longformer and BigBird (book chapter "Task 12: Global + local attention").

Both keep a band of local keys and add a few *global* positions: a global key
is seen by every query, a global query sees every key. The work is gathered
by blocks, never masked out of an ``L x L`` matrix, so time and memory grow as
``L * (window + globals + random)``.

**Longformer** (Beltagy et al. 2020; Hugging Face's ``LongformerSelfAttention``):
query ``i`` sees the keys ``|i - j| <= window / 2`` (``window`` even), and every
global key. A global key inside the band is taken *out* of the band, so it is
counted once. A global query attends to every key, with its own projections
(``global_qkv``: HF's ``query_global``, ``key_global``, ``value_global``).
Causal variant (for decoders): ``window`` keys ending at the query, global keys
``g <= i``, a global query sees every ``j <= i``.

**BigBird** (Zaheer et al. 2020; HF's ``BigBirdBlockSparseAttention``, ITC):
``L = n b`` in blocks of ``b``. Query blocks ``0`` and ``n - 1`` are global
(they see everything, and every query sees them); a middle block ``i`` sees
blocks ``i - 1, i, i + 1`` (window, a block counted once when it is also
global) and ``r`` random blocks drawn from the rest, per head, seeded.
Causal variant: a window of blocks ``i - 2 .. i``, token-level causal inside,
random blocks from the past, key block 0 global. In **evaluation mode HF
draws no random blocks**: its random indices are all ``0``, so each middle
block attends to block 0 ``1 + r`` times (the first global block, weighted
``1 + r`` in the softmax) -- ``random_blocks=0`` reproduces it exactly.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from longctx.checks import check_attention, check_nonnegative_int, check_positive_int, check_scale
from longctx.techniques.bigbird import check_bigbird
from longctx.techniques.longformer import check_longformer
from longctx.tiles import RowWriter

BLOCK = 64  # query rows per Longformer band tile
TILE = 1 << 22  # score elements per step: bounds the peak memory of one call


def global_rows(q: mx.array, k: mx.array, v: mx.array, rows: np.ndarray, first_key: int, causal: bool,
                scale: float) -> tuple[mx.array, mx.array]:
    """Global queries against one run of keys: ``q (B, Hq, R, D)`` are the queries at absolute
    positions ``rows`` (sorted int array), ``k, v (B, Hkv, S, D)`` the keys at positions
    ``first_key .. first_key + S - 1``. Each row attends to all of them (``causal``: to those
    ``<= row``) in one float32 softmax, ``scale`` applied. Returns ``(out (B, Hq, R, D), lse (B,
    Hq, R))``, float32, ``lse`` the natural log of the softmax denominator (the row max
    included); a row that sees none of these keys has ``out = 0`` and ``lse = -inf``.
    ``_put_global_rows`` merges runs of keys by ``lse``, as ring attention merges blocks
    (Task 3). About 12 lines."""
    raise NotImplementedError("Task 12: global_rows -- see the book chapter 'Task 12: Global + local attention'")


def _band_keys(x: mx.array, lo: int, nb: int, block: int, ncol: int) -> mx.array:
    """Given: for query block ``b``, the rows of ``x (B, H, L, D)`` at positions ``lo + b * block
    + c``, ``0 <= c < ncol`` (zeros outside ``0 .. L-1``): ``(B, H, nb, ncol, D)``."""
    B, H, L, D = x.shape
    nt = -(-ncol // block)
    total = (nb + nt) * block
    a, b = max(lo, 0), min(L, lo + total)
    xp = mx.pad(x[:, :, a:b], [(0, 0), (0, 0), (a - lo, lo + total - b), (0, 0)])
    parts = [xp[:, :, t * block:(t + nb) * block].reshape(B, H, nb, block, D) for t in range(nt)]
    return mx.concatenate(parts, axis=3)[:, :, :, :ncol]


def longformer_attention(q: mx.array, k: mx.array, v: mx.array, window: int, global_tokens=(), causal: bool = False,
                         *, global_qkv=None, scale: float | None = None) -> mx.array:
    """Longformer: ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` -> ``(B, Hq, Lq, D)``, dtype of
    ``q``. Bidirectional: ``Lq == Lk``, ``window`` even (``window / 2`` keys each side);
    ``causal``: ``window`` keys ending at each query, and the queries may be the last ``Lq``
    positions (decode). ``global_tokens``: absolute positions; ``global_qkv``: ``(q, k, v)`` for
    the global queries' rows (HF's global projections), default ``(q, k, v)``.

    Given: the checks, ``_band_keys``, ``RowWriter`` (the output written tile by tile in place)
    and ``_put_global_rows``. Yours: cut the queries into blocks of ``BLOCK`` rows;
    block ``b`` reads ``ncol = BLOCK + left + right`` band keys starting at position ``P0 + b
    BLOCK - left`` (``P0 = Lk - Lq``); mask the band, positions outside ``0 .. Lk-1`` and the
    global keys; score the global keys separately (causal: ``g <= p``); one softmax over both
    (a shared row max), in float32; then overwrite the global queries' rows
    (``_put_global_rows``). About 44 lines."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    glob = check_longformer(window, global_tokens, causal, Lq, Lk, global_qkv, (q, k, v))
    scale = q.shape[-1] ** -0.5 if check_scale(scale) is None else scale
    raise NotImplementedError("Task 12: longformer_attention -- see the book chapter 'Task 12: Global + local attention'")


def bigbird_random_blocks(num_blocks: int, num_random_blocks: int, seed: int, *, heads: int = 1,
                          causal: bool = False) -> np.ndarray:
    """BigBird's random key blocks: ``(heads, num_blocks, num_random_blocks)`` int, ``-1`` where
    none. Global query blocks (``0``, ``num_blocks - 1``) get none. Middle block ``i`` draws,
    per head and without replacement (``np.random.default_rng(seed)``, heads then blocks in
    order), ``min(r, available)`` blocks among those no other rule already shows it: not a
    global block, not in its window (``i-1 .. i+1``; causal: ``i-2 .. i``, and only earlier
    blocks). About 8 lines."""
    n = check_positive_int("num_blocks", num_blocks)
    r = check_nonnegative_int("num_random_blocks", num_random_blocks)
    heads = check_positive_int("heads", heads)
    raise NotImplementedError("Task 12: bigbird_random_blocks -- see the book chapter 'Task 12: Global + local attention'")


def _gather_blocks(x: mx.array, idx: np.ndarray, block_size: int) -> mx.array:
    """Given: the key blocks each query head reads, from ``x (B, Hkv, L, D)`` (GQA: head ``h``
    reads kv head ``h // (heads // Hkv)``): ``idx (heads, m, K)`` block numbers (clipped to
    ``0 .. n-1``) -> ``(B, heads, m, K b, D)`` float32: row ``i`` of head ``h`` reads blocks
    ``idx[h, i]`` in order."""
    B, Hkv, L, D = x.shape
    heads, m, K = idx.shape
    n = L // block_size
    kv = np.arange(heads) // (heads // Hkv)
    flat = (kv[:, None, None] * n + np.clip(idx, 0, n - 1)).reshape(-1)
    blocks = mx.take(x.reshape(B, Hkv * n, block_size, D), mx.array(flat), axis=1)
    return blocks.astype(mx.float32).reshape(B, heads, m, K * block_size, D)


def _put_global_rows(out: mx.array, q, k, v, rows: np.ndarray, causal: bool, scale: float) -> mx.array:
    """Given: ``out[:, :, rows - P0]`` = the global queries' rows (``P0 = Lk - Lq``), from
    ``global_rows`` on runs of keys merged by their ``lse`` (an online softmax), so the
    scores alive are about ``TILE`` elements and K and V are read once, whatever ``Lk``."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    qr = q[:, :, mx.array(rows - (Lk - Lq))]
    run = max(1, TILE // (B * Hq * len(rows)))
    acc = lse = None
    for a in range(0, int(rows.max()) + 1 if causal else Lk, run):  # causal: no row sees past its own
        o, l = global_rows(qr, k[:, :, a:a + run], v[:, :, a:a + run], rows, a, causal, scale)
        if acc is None:
            acc, lse = o, l  # key 0 is in the first run: every row's lse is finite from here on
        else:
            new = mx.logaddexp(lse, l)
            acc = acc * mx.exp(lse - new)[..., None] + o * mx.exp(l - new)[..., None]
            lse = new
        mx.eval(acc, lse)
    out[:, :, mx.array(rows - (Lk - Lq))] = acc.astype(out.dtype)
    mx.eval(out)  # synchronously: in place
    return out


def bigbird_attention(q: mx.array, k: mx.array, v: mx.array, block_size: int, num_random_blocks: int, seed: int = 0,
                      causal: bool = False, *, random_blocks=None, scale: float | None = None) -> mx.array:
    """BigBird (ITC): ``q (B, Hq, L, D)``, ``k, v (B, Hkv, L, D)``, ``L`` a multiple of
    ``block_size`` -> ``(B, Hq, L, D)``, dtype of ``q``. ``random_blocks``: ``(Hq, n, r)`` key
    blocks (``-1``: none; duplicates count as often as they appear, like HF); None: drawn by
    ``bigbird_random_blocks(n, r, seed, heads=Hq, causal=causal)``; ``0``: HF's evaluation mode.

    Given: the checks, ``_gather_blocks`` and ``_put_global_rows``. Yours: per query block ``i``
    the key blocks ``[0, n-1, i-1, i, i+1, random...]`` (causal: ``[0, i-2, i-1, i,
    random...]``), a window entry kept only when inside ``0 .. n-1`` and not a global block, a
    random one when ``>= 0``;
    gather them, score ``(b, K b)`` tiles (causal: key position ``<=`` query position), one
    float32 softmax, ``@ v`` (into a ``RowWriter``); then the global query blocks' rows.
    About 25 lines."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    n, rand = check_bigbird(block_size, num_random_blocks, Lq, Lk, Hq, random_blocks)
    if rand is None:
        rand = bigbird_random_blocks(n, num_random_blocks, seed, heads=Hq, causal=causal)
    scale = q.shape[-1] ** -0.5 if check_scale(scale) is None else scale
    raise NotImplementedError("Task 12: bigbird_attention -- see the book chapter 'Task 12: Global + local attention'")


class LongformerAttention:
    """``longctx bench``'s wrapper: causal Longformer with ``global_tokens`` (default: the first)."""

    def __init__(self, window: int = 512, global_tokens=(0,), causal: bool = True):
        self.window, self.global_tokens, self.causal = window, tuple(global_tokens), causal

    def __call__(self, q, k, v):
        return longformer_attention(q, k, v, self.window, self.global_tokens, self.causal)


class BigBirdAttention:
    """``longctx bench``'s wrapper: causal BigBird, seeded random blocks. A length that is not a
    multiple of ``block_size`` is padded at the end: keys after the last query are invisible to
    every query of a causal pattern, so the real rows are exact."""

    def __init__(self, block_size: int = 64, num_random_blocks: int = 3, seed: int = 0, causal: bool = True):
        self.block_size, self.num_random_blocks, self.seed, self.causal = block_size, num_random_blocks, seed, causal

    def __call__(self, q, k, v):
        L, pad = q.shape[2], -q.shape[2] % self.block_size
        if pad and self.causal:
            q, k, v = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (q, k, v))
        return bigbird_attention(q, k, v, self.block_size, self.num_random_blocks, self.seed, self.causal)[:, :, :L]
