"""The registry (``longctx.techniques``): every technique declared once, read by everything."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx import techniques as registry
from longctx.techniques import TASKS, TECHNIQUES

SMALL = {"full": {}, "sliding": {"window_size": 48}, "hierarchical": {"levels": [32, 128]},
         "ring": {"ring_size": 3, "block_size": 40}, "streaming": {"sink_tokens": 4, "window": 40, "chunk_size": 24},
         "compressed": {"compression_ratio": 0.75, "method": "snapkv", "observation_window": 8},
         "memory": {"context_length": 40, "top_k": 8}, "linear": {"chunk_size": 16},
         "longformer": {"window": 24, "global_tokens": (0, 3)}, "bigbird": {"block_size": 8, "num_random_blocks": 2}}


def test_every_technique_and_task_has_its_files_and_chapter():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    summary = (root / "book/src/SUMMARY.md").read_text()
    for t in TASKS.values():
        assert (root / "solutions/week3" / f"{t.module}.py").exists(), t
        assert (root / "src/longctx/torch" / f"{t.module}.py").exists(), t
        assert (root / "labs/week3" / f"test_{t.module}.py").exists(), t
        assert f"({t.chapter})" in summary, f"{t.chapter} is not in SUMMARY.md"
    assert set(SMALL) == set(TECHNIQUES), "this test names every technique"
    for t in TECHNIQUES.values():
        assert t.task is None or t.task in TASKS
        assert f"({t.chapter})" in summary


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_the_named_classes_exist_in_both_backends(backend):
    import importlib
    package = importlib.import_module(f"longctx.{backend}")
    for t in TECHNIQUES.values():
        if t.attention:
            cls = t.resolve(package.__name__, t.attention)
            cls(**registry.bench_options(t.name))
            assert getattr(package, t.attention) is cls, f"{backend}: {t.attention} is not a public name"
        if t.cache:
            t.resolve(package.__name__, t.cache)  # raises naming the class when it is not there


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_each_lab_exports_what_the_registry_says(backend):
    """``Task.exports`` is where ``longctx.mlx`` / ``longctx.torch`` find a public name: each is
    defined there (in its ``__all__`` where the module has one) and loads from the package."""
    import importlib
    package = importlib.import_module(f"longctx.{backend}")
    for t in TASKS.values():
        module = importlib.import_module(f"{package.__name__}.{t.module}")
        for name in t.exports:
            assert name in getattr(module, "__all__", [name]), f"{backend}.{t.module}: {name} is not in __all__"
            assert getattr(package, name) is getattr(module, name)
    assert sorted(dir(package)) == sorted(name for t in TASKS.values() for name in t.exports)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_memory_estimates_grow_as_the_technique_does(backend):
    """Full attention's scores grow as L^2 where they are materialised (MLX); everything else linearly."""
    for name, options in SMALL.items():
        est = [registry.estimate_memory(name, L, heads=2, head_dim=16, backend=backend, **options)
               for L in (1 << 15, 1 << 16)]
        ratio = est[1] / est[0]
        if name == "full" and backend == "mlx":
            assert ratio > 3.9, f"full attention materialises L x L scores: 2L needs ~4x, got {ratio:.2f}"
        else:
            assert ratio < 2.05, f"{backend} {name}: memory linear in L, so 2L needs ~2x, got {ratio:.2f}"
    assert registry.estimate_memory("full", 4096, heads=8, head_dim=64) >= 8 * 4096 * 64 * 4 * 4, \
        "q, k, v and the output count"


def test_useful_flops_count_the_visible_pairs():
    """Against a mask count: causal L(L+1)/2 pairs, sliding sum(min(i + 1, w)), LongNet by its oracle."""
    from longctx.testing.oracles import dilated_pairs, sliding_mask
    L, H, D = 301, 4, 8
    assert registry.useful_flops("full", L, {}, H, D) == 4 * H * D * L * (L + 1) / 2
    for w in (1, 7, 300, 400):
        assert registry.useful_flops("sliding", L, {"window_size": w}, H, D) == 4 * H * D * sliding_mask(L, L, w).sum()
    levels = [16, 64]
    pairs = sum(dilated_pairs(H, L, L, w, max(1, w // levels[0])).sum() for w in levels)
    assert registry.useful_flops("hierarchical", L, {"levels": levels}, H, D) == 4 * D * pairs
    from longctx.mlx.sparse import bigbird_random_blocks
    from longctx.testing.oracles import bigbird_counts, longformer_mask
    for w, g in ((7, (0,)), (7, (0, 5, 100, 103, 300)), (400, (3,)), (1, (0, 1, 2))):
        assert registry.useful_flops("longformer", L, {"window": w, "global_tokens": g}, H, D) == \
            4 * H * D * longformer_mask(L, L, w, g, causal=True).sum()
    for n, b, r in ((1, 4, 2), (2, 4, 1), (9, 4, 2), (12, 3, 3)):
        blocks = bigbird_random_blocks(n, r, 0, causal=True)
        assert registry.useful_flops("bigbird", n * b, {"block_size": b, "num_random_blocks": r}, H, D) == \
            4 * H * D * (bigbird_counts(1, n, b, blocks, causal=True) > 0).sum()
    assert registry.useful_flops("streaming", L, {}, H, D) is None


@pytest.mark.parametrize("call, name", [
    (lambda: registry.technique("magic"), "technique"),
    (lambda: registry.bench_options("sliding", {"window": 3}), "window"),
    (lambda: registry.estimate_memory("sliding", 0), "length"),
    (lambda: registry.estimate_memory("sliding", 10, backend="jax"), "backend"),
    (lambda: registry.check_strategy("ring", {}), "context_strategy"),
    (lambda: registry.check_strategy("sliding", {"window_size": 0}), "window_size"),
    (lambda: registry.check_strategy("hierarchical", {"levels": []}), "levels"),
    (lambda: registry.check_strategy("sliding", {"levels": [4]}), "levels"),
    (lambda: registry.check_strategy("compressed", {"chunk_size": 1}), "chunk_size"),
    (lambda: registry.check_benchmark(["ring"], [64], 1, None, model=object()), "ring")])
def test_bad_names_and_options_raise_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_strategy_defaults_fill_in_and_options_override():
    strategy, chunk, options = registry.check_strategy("streaming", {"window": 64, "chunk_size": 16})
    assert (strategy, chunk, options) == ("streaming", 16, {"sink_tokens": 4, "window": 64})
    assert tuple(registry.STRATEGIES) == tuple(n for n, t in TECHNIQUES.items() if t.strategy is not None)
    assert "ring" not in registry.STRATEGIES and "full" in registry.STRATEGIES


def test_the_torch_mirror_stands_alone():
    """``import longctx.torch`` (and using it) never imports MLX or mlx-lm; no import cycle."""
    code = ("import sys, longctx.torch\n"
            "from longctx.torch import AdaptiveContextManager, LongContextQwen3, benchmark_long_context\n"
            "AdaptiveContextManager(64).manage_context([], 'hi')\n"
            "benchmark_long_context(['sliding'], [64], heads=1, head_dim=8, repeats=1)\n"
            "import longctx.eval, longctx.bench, longctx.techniques\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_no_import_cycle_in_the_package():
    """Imports between longctx's own modules (at module level or inside functions) form no cycle."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    files = {**{f"longctx.{'.'.join(p.relative_to(root / 'src/longctx').with_suffix('').parts)}": p
                for p in (root / "src/longctx").rglob("*.py")},
             **{f"longctx.mlx.{p.stem}": p for p in (root / "solutions/week3").glob("*.py")}}
    files = {name.removesuffix(".__init__"): p for name, p in files.items()}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 64), st.integers(0, 64), st.integers(1, 80))
def test_memory_windows_are_longllamas(n, context_length, last, chunk_size):
    """Every token once, in order; the prefix in windows of context_length from the start, each
    flushed after its last chunk; the last ``last_context_length`` tokens one local window."""
    from longctx.techniques.memory import memory_windows
    last = min(last, context_length)
    pieces = memory_windows(n, context_length, last, chunk_size)
    assert [a for a, _, _ in pieces] == [0] + [b for _, b, _ in pieces[:-1]] and pieces[-1][1] == n
    prefix = max(n - last, 0)
    flushed = [b for _, b, to_memory in pieces if to_memory]
    assert flushed == [min(s + context_length, prefix) for s in range(0, prefix, context_length)]
    assert all(b <= prefix for _, b, to_memory in pieces if to_memory)
    assert not any(to_memory for a, _, to_memory in pieces if a >= prefix)
