"""Task 1's float64 oracle: sliding-window attention: the classic mistakes' outputs."""
from __future__ import annotations

import numpy as np

from longctx.exact import attention, causal_mask, query_positions, sliding_mask


def sliding_mistakes(q, k, v, window: int, *, scale=None) -> dict[str, np.ndarray]:
    """What the classic Task 1 mistakes would output, for :func:`assert_close`'s diagnosis."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    p = query_positions(lq, lk)[:, None]
    j = np.arange(lk)[None, :]
    out = {
        "future positions leak through the causal mask (the band is two-sided)":
            attention(q, k, v, np.abs(j - p) < window, scale=scale),
        "window off by one: window_size + 1 keys visible":
            attention(q, k, v, sliding_mask(lq, lk, window + 1), scale=scale),
        "the window is ignored (plain causal attention)":
            attention(q, k, v, causal_mask(lq, lk), scale=scale),
        "missing the 1/sqrt(D) scale":
            attention(q, k, v, sliding_mask(lq, lk, window), scale=1.0),
        "the scale argument is ignored (used D ** -0.5)":
            attention(q, k, v, sliding_mask(lq, lk, window), scale=d ** -0.5),
    }
    if lq < lk:
        p0 = np.arange(lq)[:, None]  # the mistake: queries at positions 0 .. Lq-1
        out["position offset ignored (queries placed at 0 .. Lq-1, not the last Lq positions)"] = attention(
            q, k, v, (j <= p0) & (j > p0 - window), scale=scale)
    if window > 1:
        out["window off by one: window_size - 1 keys visible"] = attention(
            q, k, v, sliding_mask(lq, lk, window - 1), scale=scale)
    hq, hkv = q.shape[1], k.shape[1]
    if hkv not in (1, hq):
        perm = np.arange(hq) % hkv  # the mistake: kv head h % Hkv
        out["GQA heads mapped as h % Hkv instead of h // (Hq // Hkv)"] = np.concatenate(
            [attention(q[:, h:h + 1], k[:, perm[h]:perm[h] + 1], v[:, perm[h]:perm[h] + 1],
                       sliding_mask(lq, lk, window), scale=scale) for h in range(hq)], axis=1)
    return out
