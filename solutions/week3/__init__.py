"""longctx.mlx: the MLX reference (this folder, solutions/week3, installed as longctx.mlx).

Names load on first use (PEP 562), so ``longctx.mlx.adaptive``, which is text
code with no arrays, imports without MLX: the torch mirror reuses it.
"""
import importlib
import sys

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


def lazy_names(package: str):
    """``__getattr__`` and ``__dir__`` for a package whose public names are ``_WHERE``'s, each
    loaded from the package's module of that name on first use (``longctx.torch`` too)."""
    def __getattr__(name: str):
        if name not in _WHERE:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_WHERE[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value
    return __getattr__, lambda: __all__


__getattr__, __dir__ = lazy_names(__name__)
