"""The baseline: causal attention by the backend's fused SDPA."""
from longctx.techniques.base import BYTES, Technique, causal_pairs


def memory(L, H, D, o, backend):
    # MLX's SDPA materialises the scores and their softmax; torch's causal SDPA is a flash kernel.
    return H * L * BYTES if backend == "torch" else 2 * H * L * L * BYTES


TECHNIQUE = Technique("full", None, "causal attention, the baseline (the backend's fused SDPA)", {},
                      memory, lambda L, H, D, o: 4.0 * H * D * causal_pairs(L, o), strategy={}, subquadratic=False,
                      evaluate=lambda w: {})
