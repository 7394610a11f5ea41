"""longctx.mlx: the MLX reference (this folder, solutions/week3, installed as longctx.mlx).

Names load on first use (PEP 562), so ``longctx.mlx.adaptive``, which is text
code with no arrays, imports without MLX: the torch mirror reuses it.
"""
import importlib

_WHERE = {
    "AdaptiveContextManager": "adaptive", "ContextOverflowError": "adaptive",
    "BenchmarkResult": "benchmark", "benchmark_long_context": "benchmark",
    "CompressedContext": "compression", "CompressedKVCache": "compression", "ContextCompressor": "compression",
    "HierarchicalAttention": "hierarchical", "dilated_attention": "hierarchical",
    "LinearAttention": "linear", "linear_attention": "linear",
    "LongContextQwen3": "qwen3_long",
    "MemoryAttention": "memory", "MemoryKVCache": "memory", "crossbatch_attention": "memory",
    "crossbatch_selector": "memory", "gated_memory_attention": "memory", "memory_attention": "memory",
    "retrieve": "memory",
    "ScaledRoPE": "rope_scaling", "rope_frequencies": "rope_scaling", "search_longrope": "rope_scaling",
    "RingAttention": "ring", "RingState": "ring", "merge_states": "ring", "ring_attention_distributed": "ring",
    "ring_shard": "ring",
    "SlidingWindowAttention": "sliding",
    "BigBirdAttention": "sparse", "LongformerAttention": "sparse", "bigbird_attention": "sparse",
    "longformer_attention": "sparse",
    "SinkKVCache": "streaming", "StreamingProcessor": "streaming",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'longctx.mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
