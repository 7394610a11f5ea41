"""What a registry entry is: a ``Task`` (a lab) and a ``Technique`` (an attention method), backend-free."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from longctx.checks import prefill_chunks
from longctx.techniques.tasks import TASKS

BYTES = 4  # float32


def constant(backend: str, module: str, name: str):
    """A tiling constant of a technique's array code, read from that code (``longctx.mlx.<module>``
    or ``longctx.torch.<module>``), so a memory estimate cannot drift from the tile it bounds."""
    package = "longctx.torch" if backend == "torch" else "longctx.mlx"
    return getattr(importlib.import_module(f"{package}.{module}"), name)


def causal_pairs(L: int, o: dict) -> float:
    """Visible (query, key) pairs of causal attention over ``L`` positions."""
    return L * (L + 1) / 2


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
    layer_options: Callable[[dict, int], dict] = lambda o, i: o  # layer i's cache options
    compress_after_prefill: bool = False  # the caches compress once the prompt is in (not a continued one)
    evaluate: Callable[[int], dict] | None = None  # `longctx eval`'s strategy options for a window w;
    #   None: not in its suite
    aliases: tuple[str, ...] = ()  # other names create_efficient_attention takes (the seeds' kinds)
    whole_blocks: str | None = None  # the option whose multiple a sequence must be (padded to it in a model)

    @property
    def code(self) -> str | None:
        """The module (file) of its array code in each backend package."""
        return self.module or (TASKS[self.task].module if self.task else None)

    @property
    def chapter(self) -> str:
        return TASKS[self.task].chapter if self.task else "task7-benchmark.md"

    def resolve(self, package: str, name: str):
        """The class ``name`` of this technique in ``package`` (``longctx.mlx`` or ``longctx.torch``):
        from the strategies' module (``qwen3_long``, which holds the course's caches), else its own."""
        for module in ("qwen3_long", self.code):
            found = getattr(importlib.import_module(f"{package}.{module}"), name, None) if module else None
            if found is not None:
                return found
        raise ValueError(f"technique {self.name!r}: no class {name!r} in {package}.{self.code}")
