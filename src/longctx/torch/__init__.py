"""longctx.torch: the PyTorch mirror of longctx.mlx (same names, torch.Tensor in and out)."""
from .hierarchical import HierarchicalAttention, dilated_attention
from .ring import RingAttention, RingState, merge_states, ring_attention_distributed, ring_shard
from .sliding import SlidingWindowAttention

__all__ = ["HierarchicalAttention", "RingAttention", "RingState", "SlidingWindowAttention", "dilated_attention",
           "merge_states", "ring_attention_distributed", "ring_shard"]
