"""Task 11, causal linear attention: what is not array code."""
from __future__ import annotations

from longctx.techniques.base import BYTES, Technique, constant


def check_linear_state(state, B: int, Hkv: int, D: int) -> tuple:
    """Task 11's state ``(S (B, Hkv, D, D), z (B, Hkv, D))``, float32, or ValueError naming ``state``."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"state must be a pair (S, z) as linear_attention returns it, got {type(state).__name__}")
    S, z = state
    if tuple(S.shape) != (B, Hkv, D, D) or tuple(z.shape) != (B, Hkv, D):
        raise ValueError(f"state must be (S {(B, Hkv, D, D)}, z {(B, Hkv, D)}) for these inputs, "
                         f"got S {tuple(S.shape)} and z {tuple(z.shape)}")
    if "float32" not in str(S.dtype) or "float32" not in str(z.dtype):
        raise ValueError(f"state must be float32 (it accumulates), got {S.dtype} and {z.dtype}")
    return tuple(state)


def memory(L, H, D, o, backend):
    c = min(o["chunk_size"], L)
    seg = min(L, constant(backend, "linear", "SEGMENT_CHUNKS") * c)  # one evaluated segment of chunks
    return (H * seg * (3 * c + 8 * D) + 3 * H * (seg // c + 1) * D * D) * BYTES  # one segment, written in place


def flops(L, H, D, o):
    c = min(o["chunk_size"], L)
    return 4.0 * H * L * D * D + 2.0 * H * L * (c + 1) * D  # the state's update and read; the causal chunk


TECHNIQUE = Technique("linear", 11, "causal linear attention, phi = elu + 1: a D x D state instead of a cache",
                      {"chunk_size": 64}, memory, flops, attention="LinearAttention")
