"""The registry: every task and every long-context technique, declared once, backend-free.

Like transformers' ``ROPE_INIT_FUNCTIONS`` or mlx-lm's one-file-per-model
lookup, this package is the only table: one module per technique
(``sliding.py``, ``memory.py``, ...), each holding what the technique is
besides array code (its ``TECHNIQUE`` entry, argument checks, memory and FLOP
formulas, prefill plan), found by ``_discover``; ``tasks.py`` lists the labs
and their public names. The graded harness (task names), ``longctx bench``
(defaults, the CLI's ``--window``, memory and FLOP formulas),
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
chapter and its module here with one ``TECHNIQUE`` (book: "Adding a technique").
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from longctx.checks import check_choice, check_positive_int
from longctx.techniques.base import BYTES, Technique, constant  # noqa: F401  (the entry types)
from longctx.techniques.tasks import TASKS, Task  # noqa: F401


def _discover() -> dict[str, Technique]:
    """Every module of this package that declares a ``TECHNIQUE``, the baseline first, then by task."""
    found = [getattr(importlib.import_module(f"{__name__}.{m.name}"), "TECHNIQUE", None)
             for m in pkgutil.iter_modules(__path__) if m.name not in ("base", "tasks")]
    return {t.name: t for t in sorted(filter(None, found), key=lambda t: (t.task or 0, t.name))}


TECHNIQUES = _discover()


def public_names() -> dict[str, str]:
    """Each public name of ``longctx.mlx`` and ``longctx.torch`` -> the module that defines it."""
    return {name: t.module for t in TASKS.values() for name in t.exports}


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


def register_task(t: Task) -> Task:
    """Add a lab (a plugin's, or a toy's): the graded harness names its row, and its ``exports``
    become public names of ``longctx.mlx`` and ``longctx.torch``."""
    if t.number in TASKS:
        raise ValueError(f"task {t.number} is already registered ({TASKS[t.number].title!r})")
    TASKS[t.number] = t
    return t


def attention_kind(kind: str) -> Technique:
    """The technique ``create_efficient_attention`` builds for ``kind``: a registry name or an alias,
    one with an attention class or ``full``."""
    kinds = {name: t for t in TECHNIQUES.values() if t.attention or t.name == "full"
             for name in (t.name, *t.aliases)}
    return kinds[check_choice("kind", kind, tuple(kinds))]


def module_heads(d_model, n_heads, n_kv_heads=None) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, head_dim)`` of an attention module of width ``d_model``: the heads
    divide it, the kv heads divide the heads (GQA), the head dim is even (RoPE turns pairs)."""
    d, H = check_positive_int("d_model", d_model), check_positive_int("n_heads", n_heads)
    Hkv = H if n_kv_heads is None else check_positive_int("n_kv_heads", n_kv_heads)
    if d % H or (d // H) % 2:
        raise ValueError(f"n_heads must divide d_model into even head dims, got d_model={d}, n_heads={H}")
    if H % Hkv:
        raise ValueError(f"n_kv_heads must divide n_heads ({H}), got {Hkv}")
    return H, Hkv, d // H


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
    options = {**t.strategy, **options}
    t.validate({**options, "chunk_size": chunk_size})
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
