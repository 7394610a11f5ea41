"""Task 1, sliding-window attention: what is not array code."""
from longctx.checks import check_positive_int
from longctx.techniques.base import BYTES, Technique, constant


def window_pairs(L: int, o: dict) -> float:
    """Visible (query, key) pairs of causal attention over the last ``window_size`` keys."""
    w = min(o["window_size"], L)
    return w * (w + 1) / 2 + (L - w) * w  # rows before the window fills, then w keys each


def memory(L, H, D, o, backend):
    w = min(o["window_size"], L)
    if backend == "native":  # the compiled kernel's tiles are a few KiB per thread, outside MLX's allocator;
        return H * L * BYTES  # it writes each row's log-sum-exp (float32) for the backward
    tile = min(constant(backend, "sliding", "TILE_ELEMENTS"), H * L * (w + 128))  # 128: the largest query block
    if backend == "torch":  # one step of SDPA tiles (its scores stay inside the fused kernel)
        return 2 * tile * BYTES
    return 6 * tile * BYTES  # two tiles in flight (scores, weights, their keys); the output is written in place


TECHNIQUE = Technique(
    "sliding", 1, "each query sees its last window_size keys", {"window_size": 1024},
    memory, lambda L, H, D, o: 4.0 * H * D * window_pairs(L, o),
    attention="SlidingWindowAttention", strategy={"window_size": 4096}, cache="SlidingKVCache",
    aliases=("sliding_window",), from_window=lambda w: {"window_size": w}, evaluate=lambda w: {"window_size": w}, validate=lambda o: check_positive_int("window_size", o["window_size"]))
