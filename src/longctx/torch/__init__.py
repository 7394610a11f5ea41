"""longctx.torch: the PyTorch mirror of longctx.mlx (same names, torch.Tensor in and out)."""
from longctx.blas import share_with_torch

share_with_torch()  # a preloaded multi-threaded OpenBLAS would slow torch down 3-30x: see longctx/blas.py

from .adaptive import AdaptiveContextManager, ContextOverflowError
from .benchmark import BenchmarkResult, benchmark_long_context
from .compression import CompressedContext, CompressedKVCache, ContextCompressor
from .hierarchical import HierarchicalAttention, dilated_attention
from .memory import (MemoryAttention, MemoryKVCache, crossbatch_attention, crossbatch_selector, gated_memory_attention,
                     memory_attention, retrieve)
from .linear import LinearAttention, linear_attention
from .qwen3_long import LongContextQwen3
from .rope_scaling import ScaledRoPE, rope_frequencies, search_longrope
from .ring import RingAttention, RingState, merge_states, ring_attention_distributed, ring_shard
from .sliding import SlidingWindowAttention
from .sparse import BigBirdAttention, LongformerAttention, bigbird_attention, longformer_attention
from .streaming import SinkKVCache, StreamingProcessor

__all__ = ["AdaptiveContextManager", "BenchmarkResult", "BigBirdAttention", "LinearAttention", "LongformerAttention",
           "bigbird_attention", "linear_attention", "longformer_attention", "CompressedContext", "CompressedKVCache",
           "ContextCompressor", "ContextOverflowError", "HierarchicalAttention", "LongContextQwen3", "MemoryAttention",
           "MemoryKVCache", "RingAttention", "RingState", "ScaledRoPE", "SinkKVCache", "SlidingWindowAttention",
           "StreamingProcessor", "benchmark_long_context", "crossbatch_attention", "crossbatch_selector",
           "dilated_attention", "gated_memory_attention", "memory_attention", "merge_states",
           "ring_attention_distributed", "ring_shard", "retrieve", "rope_frequencies", "search_longrope"]
