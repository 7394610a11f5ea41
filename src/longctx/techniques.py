"""The registry: every task and every long-context technique, declared once, backend-free.

Like transformers' ``ROPE_INIT_FUNCTIONS`` or mlx-lm's one-file-per-model
lookup, this is the only table. The graded harness (task names), ``longctx
bench`` (defaults, the CLI's ``--window``, memory and FLOP formulas),
``benchmark_long_context`` in both backends, ``LongContextQwen3`` in both
backends (strategy options and their validation) and the project tests read
it; none keeps a list of its own.

A technique names the array code it runs by the public names of its backend
package (``longctx.mlx`` / ``longctx.torch``, the same names in both), so
the benchmark and the integration look it up instead of branching on it:

* ``attention``: a class constructed with the technique's options that maps
  ``(q, k, v)`` to the output (the benchmark calls it on random inputs);
* ``cache``: the class of the per-layer cache ``LongContextQwen3`` builds for
  the strategy, from the strategy's options.

Adding a technique is its MLX file, its torch file, its graded tests, its
chapter and one ``Technique`` here (book: "Adding a technique").
"""
from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from longctx.checks import (check_choice, check_levels, check_memory_options, check_positive_int, memory_windows,
                            prefill_chunks, resolve_memory_options)

BYTES = 4  # float32
HIERARCHICAL_TILE = 1 << 24  # scores per level and span in Task 2 (both backends: ``hierarchical_span``)


def constant(backend: str, module: str, name: str):
    """A tiling constant of a technique's array code, read from that code (``longctx.mlx.<module>``
    or ``longctx.torch.<module>``), so a memory estimate cannot drift from the tile it bounds."""
    package = "longctx.torch" if backend == "torch" else "longctx.mlx"
    return getattr(importlib.import_module(f"{package}.{module}"), name)


@dataclass(frozen=True)
class Task:
    number: int
    title: str
    chapter: str  # the book page, book/src/<chapter>
    module: str  # the lab module, labs/week3/<module>.py


TASKS = {t.number: t for t in (
    Task(1, "Sliding-window attention", "task1-sliding.md", "sliding"),
    Task(2, "Hierarchical (dilated) attention", "task2-hierarchical.md", "hierarchical"),
    Task(3, "Ring attention", "task3-ring.md", "ring"),
    Task(4, "Context compression", "task4-compression.md", "compression"),
    Task(5, "Streaming with attention sinks", "task5-streaming.md", "streaming"),
    Task(6, "Adaptive context", "task6-adaptive.md", "adaptive"),
    Task(7, "Long-context benchmark", "task7-benchmark.md", "benchmark"),
    Task(8, "Qwen3 integration", "qwen3-integration.md", "qwen3_long"),
    Task(9, "Position extension (LongRoPE)", "task9-position-extension.md", "rope_scaling"),
    Task(10, "Memory layers (Focused Transformer)", "task10-memory.md", "memory"),
    Task(11, "Linear attention", "task11-linear.md", "linear"),
    Task(12, "Global + local sparse attention (Longformer, BigBird)", "task12-sparse.md", "sparse"),
)}


def _pairs_causal(L: int, o: dict) -> float:
    return L * (L + 1) / 2


def _pairs_sliding(L: int, o: dict) -> float:
    w = min(o["window_size"], L)
    return w * (w + 1) / 2 + (L - w) * w  # rows before the window fills, then w keys each


@dataclass(frozen=True)
class Technique:
    """One technique. ``memory(L, H, D, options, backend)`` is the peak bytes beyond ``q, k, v``
    and the output (B = 1, float32) as written arithmetic (``backend``: ``"mlx"``, ``"torch"``, or
    ``"native"``: MLX with the installed reference's compiled CPU kernels, ``longctx.native``);
    ``flops(L, H, D, options)`` the useful multiply-adds x 2 of the visible (query, key) pairs, or
    None where that is not defined."""
    name: str
    task: int | None  # None: the baseline
    summary: str
    options: dict  # defaults for the attention benchmark
    memory: Callable[[int, int, int, dict, str], int]
    flops: Callable[[int, int, int, dict], float | None] = lambda L, H, D, o: None
    attention: str | None = None  # a class of the technique's module: cls(**options)(q, k, v)
    strategy: dict | None = None  # LongContextQwen3 defaults; None: not a strategy
    cache: str | None = None  # the strategy's cache class: in each backend's qwen3_long, else the module
    module: str | None = None  # its array code, longctx.mlx.<module> and longctx.torch.<module> (default: the task's)
    from_window: Callable[[int], dict] = lambda w: {}  # options from `longctx bench --window`
    subquadratic: bool = True  # among the spec's 50k-200k cases
    validate: Callable[[dict], None] = field(default=lambda o: None)
    # How LongContextQwen3 runs the strategy (read there, never branched on by name):
    fit: Callable[[dict, int, int], dict] = lambda o, layers, positions: o  # options for this model's
    #   (num_layers, max_position_embeddings), checked
    plan: Callable[[int, int, dict], list] = lambda n, chunk, o: [(s, e, False) for s, e in prefill_chunks(n, chunk)]
    #   the prompt's forwards: (start, end, flush the cache to memory after it)
    layer_options: Callable[[dict, int], dict] = lambda o, i: o  # MLX: layer i's cache options
    compress_after_prefill: bool = False  # the caches compress once the prompt is in (not a continued one)

    @property
    def chapter(self) -> str:
        return TASKS[self.task].chapter if self.task else "task7-benchmark.md"

    @property
    def code(self) -> str | None:
        """The module (file) of its array code in each backend package."""
        return self.module or (TASKS[self.task].module if self.task else None)

    def resolve(self, package: str, name: str):
        """The class ``name`` of this technique in ``package`` (``longctx.mlx`` or ``longctx.torch``):
        from the strategies' module (``qwen3_long``, which holds the course's caches), else its own."""
        for module in ("qwen3_long", self.code):
            found = getattr(importlib.import_module(f"{package}.{module}"), name, None) if module else None
            if found is not None:
                return found
        raise ValueError(f"technique {self.name!r}: no class {name!r} in {package}.{self.code}")


def _full_memory(L, H, D, o, backend):
    # MLX's SDPA materialises the scores and their softmax; torch's causal SDPA is a flash kernel.
    return H * L * BYTES if backend == "torch" else 2 * H * L * L * BYTES


def _sliding_memory(L, H, D, o, backend):
    w = min(o["window_size"], L)
    if backend == "native":  # the compiled kernel's tiles are a few KiB per thread, outside MLX's allocator
        return 0
    tile = min(constant(backend, "sliding", "TILE_ELEMENTS"), H * L * (w + 128))  # 128: the largest query block
    if backend == "torch":  # one step of SDPA tiles (its scores stay inside the fused kernel)
        return 2 * tile * BYTES
    return 6 * tile * BYTES  # two tiles in flight (scores, weights, their keys); the output is written in place


def _hierarchical_memory(L, H, D, o, backend):
    w0 = min(o["levels"][0], L)
    if backend == "torch":
        return len(o["levels"]) * 2 * H * L * (w0 + D) * BYTES  # per level: scores, weights, output, lse
    levels, dilations = check_levels(o["levels"], o.get("dilations"))
    m = max(-(-w // r) for w, r in zip(levels, dilations))  # keys per kept row
    span = hierarchical_span(levels, dilations, H)
    # per level, one span at a time: scores, weights, output, lse; the output written in place
    return len(levels) * 2 * H * min(span, L) * (m + D) * BYTES


def hierarchical_span(levels, dilations, rows: int) -> int:
    """Positions per tile of ``HierarchicalAttention`` (both backends): a multiple of every
    segment size, with about ``HIERARCHICAL_TILE`` scores per level for ``rows = B * Hq``
    query heads. A span's queries see only that span's keys, so spans run one at a time."""
    lcm = math.lcm(*levels)
    m = max(-(-w // r) for w, r in zip(levels, dilations))  # keys per kept row
    return lcm * max(1, HIERARCHICAL_TILE // (rows * lcm * m))


def _ring_memory(L, H, D, o, backend):
    n = -(-L // o["ring_size"])
    return 4 * H * n * (min(o["block_size"], L) + D) * BYTES  # a tile of scores + a shard's state


def _streaming_memory(L, H, D, o, backend):
    c = min(o["chunk_size"], L)
    held = o["sink_tokens"] + o["window"] + c
    return (3 * H * c * held + 4 * H * held * D) * BYTES  # a chunk's scores, the cache; the output in place


def _compressed_memory(L, H, D, o, backend):
    w = min(o["observation_window"], L)
    return (3 * H * w * L + 3 * H * L) * BYTES  # the window's scores, then the per-key scores


def _memory_memory(L, H, D, o, backend):
    c = min(o["context_length"], L)
    return 4 * H * c * L * BYTES  # one window's scores against itself and the memory, weights, the mask


def _memory_pairs(L: int, o: dict) -> float:
    c, k = o["context_length"], o["top_k"]
    pairs = 0.0
    for s in range(0, L, c):
        n = min(c, L - s)
        pairs += n * (n + 1) / 2 + n * (s if k is None else min(k, s))  # local causal + kept memory entries
    return pairs


def _linear_memory(L, H, D, o, backend):
    c = min(o["chunk_size"], L)
    seg = min(L, constant(backend, "linear", "SEGMENT_CHUNKS") * c)  # one evaluated segment of chunks
    return (H * seg * (3 * c + 8 * D) + 3 * H * (seg // c + 1) * D * D) * BYTES  # one segment, written in place


def _linear_flops(L, H, D, o):
    c = min(o["chunk_size"], L)
    return 4.0 * H * L * D * D + 2.0 * H * L * (c + 1) * D  # the state's update and read; the causal chunk


def _longformer_memory(L, H, D, o, backend):
    ncol = constant(backend, "sparse", "BLOCK") + o["window"]  # a query block's band keys
    return 8 * min(constant(backend, "sparse", "TILE"), H * L * ncol) * BYTES  # tiles of scores, weights, band keys; the output in place


def _longformer_pairs(L: int, o: dict) -> float:
    """Visible (query, key) pairs of causal Longformer: a local row its window plus the global
    keys before it, a global row its whole past."""
    w = o["window"]
    glob = sorted({g for g in o["global_tokens"] if g < L})
    pairs = _pairs_sliding(L, {"window_size": w})
    for g in glob:
        pairs += (g + 1) - min(g + 1, w)  # g's own row: the whole past
        pairs += max(0, L - g - w) - sum(1 for h in glob if h >= g + w)  # local rows p >= g + w see g too
    return pairs


def _bigbird_memory(L, H, D, o, backend):
    b, k = o["block_size"], 5 + o["num_random_blocks"]
    tile = min(constant(backend, "sparse", "TILE"), H * L * k * b)
    return (8 * tile + 2 * tile * D // b) * BYTES  # tiles of scores, weights, gathered blocks; output in place


def _bigbird_pairs(L: int, o: dict) -> float:
    """Visible (query, key) pairs of causal BigBird on ``ceil(L / b)`` blocks."""
    b, r = o["block_size"], o["num_random_blocks"]
    n = -(-L // b)
    pairs = b * (b + 1) / 2 + (n > 1) * (b * (n - 1) * b + b * (b + 1) / 2)  # the global query blocks
    for i in range(1, n - 1):
        past = len({0, i - 2, i - 1} - {-1, i}) + min(r, max(0, i - 3))  # whole earlier blocks
        pairs += past * b * b + b * (b + 1) / 2
    return pairs


def hierarchical_pairs(L: int, levels, heads: int, dilations=None) -> int:
    """Causal (query, key) pairs the LongNet levels keep, over all heads: a segment whose head
    keeps ``c`` positions has ``c (c + 1) / 2`` of them."""
    levels, dilations = check_levels(levels, dilations)
    pairs = 0
    for w, r in zip(levels, dilations):
        for h in range(heads):
            offset = h // -(-heads // r)
            for s0 in range(0, L, w):
                c = len(range(offset, min(w, L - s0), r))
                pairs += c * (c + 1) // 2
    return pairs


def _memory_layer(o: dict, i: int) -> dict:
    """Layer ``i``'s ``MemoryKVCache`` options (MLX: a cache per layer): one outside
    ``memory_layers`` keeps no memory."""
    layer = {k: v for k, v in o.items() if k != "memory_layers"}
    return layer if o["memory_layers"] is None or i in o["memory_layers"] else {**layer, "memory_size": 0}


def _check_levels(o):
    check_levels(o["levels"], o.get("dilations"))


def _check_window(o):
    check_positive_int("window_size", o["window_size"])


TECHNIQUES = {t.name: t for t in (
    Technique("full", None, "causal attention, the baseline (the backend's fused SDPA)", {},
              _full_memory, lambda L, H, D, o: 4.0 * H * D * _pairs_causal(L, o),
              strategy={}, subquadratic=False),
    Technique("sliding", 1, "each query sees its last window_size keys", {"window_size": 1024},
              _sliding_memory, lambda L, H, D, o: 4.0 * H * D * _pairs_sliding(L, o),
              attention="SlidingWindowAttention", strategy={"window_size": 4096}, cache="SlidingKVCache",
              from_window=lambda w: {"window_size": w}, validate=_check_window),
    Technique("hierarchical", 2, "LongNet's dilated levels mixed by their softmax denominators",
              {"levels": [1024, 4096, 16384], "dilations": None}, _hierarchical_memory,
              lambda L, H, D, o: 4.0 * D * hierarchical_pairs(L, o["levels"], H, o.get("dilations")),
              attention="HierarchicalAttention", strategy={"levels": [2048, 8192, 32768], "dilations": None},
              cache="HierarchicalKVCache", from_window=lambda w: {"levels": [w, 4 * w, 16 * w]},
              validate=_check_levels),
    Technique("ring", 3, "exact attention over shards passed around a ring (simulated in one process)",
              {"ring_size": 4, "block_size": 1024}, _ring_memory,
              lambda L, H, D, o: 4.0 * H * D * _pairs_causal(L, o), attention="RingAttention",
              from_window=lambda w: {"block_size": max(w, 256)}, subquadratic=False),
    Technique("streaming", 5, "attention sinks plus a window of recent entries, chunk by chunk",
              {"sink_tokens": 4, "window": 1024, "chunk_size": 1024}, _streaming_memory,
              strategy={"sink_tokens": 4, "window": 4096}, cache="SinkKVCache",
              from_window=lambda w: {"window": w, "chunk_size": w}),
    Technique("compressed", 4, "a KV cache compressed by importance (SnapKV, H2O, key norm, StreamingLLM)",
              {"compression_ratio": 0.9, "method": "snapkv", "observation_window": 32}, _compressed_memory,
              strategy={"compression_ratio": 0.5, "method": "snapkv", "sink_tokens": 4, "recent_tokens": 32,
                        "observation_window": 32, "pool_kernel": 5}, cache="QueryRecordingCache",
              compress_after_prefill=True),
    Technique("memory", 10, "windows of context_length attending to a memory of earlier windows (FoT, LongLLaMA)",
              {"context_length": 512, "top_k": None}, _memory_memory,
              lambda L, H, D, o: 4.0 * H * D * _memory_pairs(L, o), attention="MemoryAttention",
              strategy={"memory_layers": None, "memory_size": 65536, "last_context_length": 256, "top_k": None,
                        "context_length": None}, cache="MemoryKVCache",
              from_window=lambda w: {"context_length": w}, subquadratic=False, validate=check_memory_options,
              fit=resolve_memory_options, layer_options=_memory_layer,
              plan=lambda n, chunk, o: memory_windows(n, o["context_length"], o["last_context_length"], chunk)),
    Technique("linear", 11, "causal linear attention, phi = elu + 1: a D x D state instead of a cache",
              {"chunk_size": 64}, _linear_memory, _linear_flops, attention="LinearAttention"),
    Technique("longformer", 12, "Longformer: a causal window plus global tokens every query sees",
              {"window": 512, "global_tokens": (0,), "causal": True}, _longformer_memory,
              lambda L, H, D, o: 4.0 * H * D * _longformer_pairs(L, o), attention="LongformerAttention",
              from_window=lambda w: {"window": w}),
    Technique("bigbird", 12, "BigBird: blocks of a window, two global blocks and seeded random blocks",
              {"block_size": 64, "num_random_blocks": 3, "seed": 0, "causal": True}, _bigbird_memory,
              lambda L, H, D, o: 4.0 * H * D * _bigbird_pairs(L, o), attention="BigBirdAttention",
              from_window=lambda w: {"block_size": max(1, w // 3)}),
)}


class Selection(Sequence):
    """The names of the techniques that ``keep``, read from ``TECHNIQUES`` at each use (a technique
    registered later is in it too)."""

    def __init__(self, keep: Callable[[Technique], bool]):
        self.keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name, t in TECHNIQUES.items() if self.keep(t))

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


STRATEGIES = Selection(lambda t: t.strategy is not None)
SUBQUADRATIC = Selection(lambda t: t.subquadratic)


def register(t: Technique) -> Technique:
    """Add a technique (a course's own, or a plugin's): every reader of the registry sees it."""
    if t.name in TECHNIQUES:
        raise ValueError(f"technique {t.name!r} is already registered")
    TECHNIQUES[t.name] = t
    return t


def technique(name) -> Technique:
    return TECHNIQUES[check_choice("technique", name, tuple(TECHNIQUES))]


def bench_options(name, options: dict | None = None) -> dict:
    """The attention benchmark's options for ``name``: its defaults, overridden by ``options``."""
    t = technique(name)
    options = dict(options or {})
    unknown = set(options) - set(t.options)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for technique {name!r}; it takes {sorted(t.options)}")
    return {**t.options, **options}


def estimate_memory(name: str, length: int, *, heads: int = 8, head_dim: int = 64, backend: str = "mlx",
                    **options) -> int:
    """Peak bytes ``name`` needs at ``length`` (B = 1, float32), inputs included: q, k, v and the
    output, plus what the technique materialises at once (an upper bound within a small factor of
    the measured peak; the graded and project tests check both)."""
    L = check_positive_int("length", length)
    H, D = check_positive_int("heads", heads), check_positive_int("head_dim", head_dim)
    check_choice("backend", backend, ("mlx", "native", "torch"))
    return 4 * H * L * D * BYTES + technique(name).memory(L, H, D, bench_options(name, options), backend)


def useful_flops(name: str, length: int, options: dict, heads: int, head_dim: int) -> float | None:
    """FLOPs of the visible (query, key) pairs (2 x 2 per pair and dim: QK^T and PV), or None."""
    return technique(name).flops(length, heads, head_dim, bench_options(name, options))


def check_strategy(strategy, options: dict) -> tuple[str, int, dict]:
    """``(strategy, chunk_size, options with defaults)`` for ``LongContextQwen3``; unknown names raise."""
    strategy = check_choice("context_strategy", strategy, STRATEGIES)
    t = TECHNIQUES[strategy]
    options = dict(options)
    chunk_size = check_positive_int("chunk_size", options.pop("chunk_size", 2048))
    unknown = set(options) - set(t.strategy)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for context_strategy={strategy!r}; "
                         f"it takes {sorted(t.strategy) + ['chunk_size']}")
    if strategy == "compressed" and chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2 for 'compressed' (a lone token is a decode step), got {chunk_size}")
    options = {**t.strategy, **options}
    t.validate(options)
    return strategy, chunk_size, options


def check_benchmark(techniques, lengths, repeats, memory_limit, model) -> tuple[dict, list[int], int, int | None]:
    """``benchmark_long_context``'s arguments, checked for both backends: ``(techniques as
    {name: options}, lengths, repeats, memory_limit)``. ``techniques``: names or ``{name:
    options}``, None for the sub-quadratic ones; attention runs get the benchmark defaults,
    model runs (``model`` given) the strategy's own (``LongContextQwen3`` fills them in)."""
    if techniques is None:
        techniques = tuple(SUBQUADRATIC)
    if isinstance(techniques, str) or not isinstance(techniques, (list, tuple, dict)) or not techniques:
        raise ValueError(f"techniques must be a non-empty list of names or a dict of name -> options, "
                         f"got {techniques!r}")
    items = techniques.items() if isinstance(techniques, dict) else ((t, {}) for t in techniques)
    chosen = {}
    for name, options in items:
        t = technique(name)
        if model is not None and t.strategy is None:
            raise ValueError(f"technique {name!r} has no LongContextQwen3 strategy: it is benchmarked on "
                             "attention inputs (model=None)")
        chosen[name] = dict(options) if model is not None else bench_options(name, options)
    iterable = hasattr(lengths, "__iter__") and not isinstance(lengths, str)
    lengths = [check_positive_int("length", L) for L in lengths] if iterable else None
    if not lengths:
        raise ValueError(f"lengths must be a non-empty list of integers >= 1, got {lengths!r}")
    repeats = check_positive_int("repeats", repeats)
    memory_limit = None if memory_limit is None else check_positive_int("memory_limit", memory_limit)
    return chosen, lengths, repeats, memory_limit


def estimate_model_memory(config, weight_bytes: int, strategy: str, length: int, **options) -> int:
    """Peak bytes of a ``LongContextQwen3`` prefill of ``length`` tokens: the weights, the cache
    the strategy holds (float32), one chunk's scores and the prompt's logits. ``config``: mlx-lm's
    ``model.args`` or transformers' ``model.config`` (the same field names)."""
    o = {**TECHNIQUES[check_choice("context_strategy", strategy, STRATEGIES)].strategy, **options}
    chunk = min(o.get("chunk_size", 2048), length)
    held = {"sliding": o.get("window_size", 0) + chunk,
            "streaming": o.get("sink_tokens", 0) + o.get("window", 0) + chunk}.get(strategy, length)
    held = min(held, length)
    c = config
    cache = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * held * BYTES
    scores = 3 * c.num_attention_heads * chunk * held * BYTES
    return weight_bytes + cache + scores + length * c.vocab_size * BYTES


# ---------------------------------------------------------------- benchmark rows (Task 7, both backends)
ERROR = "relative error vs exact attention"
PASSKEY = "passkey accuracy"


@dataclass
class BenchmarkResult:
    """One technique at one length. ``skipped`` (a reason) is empty when it ran; a skipped row
    has no time, speed, memory or quality, but always the memory estimate."""
    technique: str
    length: int
    median_ms: float | None
    tokens_per_second: float | None
    peak_memory_bytes: int | None
    quality: float | None
    quality_metric: str
    memory_estimate_bytes: int
    skipped: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def skipped_result(name: str, length: int, estimate: int, memory_limit: int, metric: str) -> BenchmarkResult:
    return BenchmarkResult(name, length, None, None, None, None, metric, estimate,
                           f"needs ~{estimate / 2**30:.1f} GiB > limit {memory_limit / 2**30:.1f} GiB")


def default_memory_limit() -> int:
    """Half the machine's physical memory: what a benchmark may take without swapping."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
