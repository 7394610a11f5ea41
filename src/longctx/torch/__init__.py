"""longctx.torch: the PyTorch mirror of longctx.mlx (same names, torch.Tensor in and out)."""
from .sliding import SlidingWindowAttention

__all__ = ["SlidingWindowAttention"]
