"""The labs: one ``Task`` each, with its book chapter, its module and its public names."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    number: int
    title: str
    chapter: str  # the book page, book/src/<chapter>
    module: str  # the lab module, labs/week3/<module>.py
    exports: tuple[str, ...] = ()  # its public names in longctx.mlx and longctx.torch


TASKS = {t.number: t for t in (
    Task(1, "Sliding-window attention", "task1-sliding.md", "sliding", ("SlidingWindowAttention",)),
    Task(2, "Hierarchical (dilated) attention", "task2-hierarchical.md", "hierarchical",
         ("HierarchicalAttention", "dilated_attention")),
    Task(3, "Ring attention", "task3-ring.md", "ring",
         ("RingAttention", "RingState", "merge_states", "ring_attention_distributed", "ring_shard")),
    Task(4, "Context compression", "task4-compression.md", "compression",
         ("CompressedContext", "CompressedKVCache", "ContextCompressor")),
    Task(5, "Streaming with attention sinks", "task5-streaming.md", "streaming", ("SinkKVCache", "StreamingProcessor")),
    Task(6, "Adaptive context", "task6-adaptive.md", "adaptive", ("AdaptiveContextManager", "ContextOverflowError")),
    Task(7, "Long-context benchmark", "task7-benchmark.md", "benchmark", ("BenchmarkResult", "benchmark_long_context")),
    Task(8, "Qwen3 integration", "qwen3-integration.md", "qwen3_long", ("LongContextQwen3",)),
    Task(9, "Position extension (LongRoPE)", "task9-position-extension.md", "rope_scaling",
         ("ScaledRoPE", "rope_frequencies", "search_longrope")),
    Task(10, "Memory layers (Focused Transformer)", "task10-memory.md", "memory",
         ("MemoryAttention", "MemoryKVCache", "crossbatch_attention", "crossbatch_selector", "gated_memory_attention",
          "memory_attention", "retrieve")),
    Task(11, "Linear attention", "task11-linear.md", "linear", ("LinearAttention", "linear_attention")),
    Task(12, "Global + local sparse attention (Longformer, BigBird)", "task12-sparse.md", "sparse",
         ("BigBirdAttention", "LongformerAttention", "bigbird_attention", "longformer_attention")),
    Task(13, "Drop-in attention modules", "training.md", "nn",
         ("DilatedAttention", "FlashAttention", "create_efficient_attention")),
)}
