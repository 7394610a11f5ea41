"""longctx.mlx: the MLX reference (this folder, solutions/week3, installed as longctx.mlx)."""
from .sliding import SlidingWindowAttention

__all__ = ["SlidingWindowAttention"]
