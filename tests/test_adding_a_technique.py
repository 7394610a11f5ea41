"""Adding a technique is its files and one registry entry (book chapter "Adding a technique").

A toy technique is declared here as a new technique would be: one file per backend
(``toy.py`` beside the course's modules of ``longctx.mlx`` and ``longctx.torch``) and
one ``Technique`` registered. Nothing else is edited, and ``longctx bench`` (its rows, its
help, its memory estimate), ``LongContextQwen3`` (the toy is a strategy too) and the
registry's table in the book all pick it up.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx import techniques as registry
from longctx.techniques.sliding import window_pairs

TOY = {"mlx": '''
import mlx.core as mx

from longctx.mlx.qwen3_long import SlidingKVCache


class ToyAttention:
    """Causal attention over the last ``width`` keys, with a dense mask (a toy: O(L^2))."""

    def __init__(self, width: int = 8):
        self.width = width

    def __call__(self, q, k, v):
        i, j = mx.arange(q.shape[2])[:, None], mx.arange(k.shape[2])[None]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                                    mask=(j <= i) & (j > i - self.width))


class ToyKVCache(SlidingKVCache):
    def __init__(self, width: int):
        super().__init__(width)
''', "torch": '''
import torch
import torch.nn.functional as F

from longctx.torch.qwen3_long import SlidingKVCache


class ToyAttention:
    """Causal attention over the last ``width`` keys, with a dense mask (a toy: O(L^2))."""

    def __init__(self, width: int = 8):
        self.width = width

    def __call__(self, q, k, v):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - self.width),
                                              enable_gqa=q.shape[1] != k.shape[1])


class ToyKVCache(SlidingKVCache):
    def __init__(self, width: int, *, num_layers: int):
        super().__init__(width, num_layers=num_layers)
'''}

TASK = registry.Task(99, "Toy window", "adding-a-technique.md", "toy", ("ToyAttention",))
TECHNIQUE = registry.Technique(
    "toy", 99, "a toy: causal attention over the last width keys, dense", {"width": 8},
    memory=lambda L, H, D, o, backend: 3 * H * L * L * registry.BYTES,  # the mask, the scores, their softmax
    flops=lambda L, H, D, o: 4.0 * H * D * window_pairs(L, {"window_size": o["width"]}),
    attention="ToyAttention", strategy={"width": 64}, cache="ToyKVCache", module="toy",
    from_window=lambda w: {"width": w})


@pytest.fixture
def toy(tmp_path, monkeypatch):
    import longctx.mlx
    import longctx.torch
    for backend, package in (("mlx", longctx.mlx), ("torch", longctx.torch)):
        folder = tmp_path / backend
        folder.mkdir()
        (folder / "toy.py").write_text(TOY[backend])
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])  # a file beside the others
    registry.register_task(TASK)
    registry.register(TECHNIQUE)
    yield TECHNIQUE
    del registry.TECHNIQUES["toy"], registry.TASKS[99]
    for backend in ("mlx", "torch"):
        sys.modules.pop(f"longctx.{backend}.toy", None)


def test_the_registry_and_the_cli_know_the_toy(toy, capsys):
    from longctx import cli
    assert "toy" in registry.SUBQUADRATIC and "toy" in registry.STRATEGIES
    assert registry.estimate_memory("toy", 1000, heads=2, head_dim=16) == 4 * 2 * 1000 * 16 * 4 + 3 * 2 * 1000 ** 2 * 4
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert re.search(r"\btoy\b", capsys.readouterr().out), "bench --help lists every registered technique"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TECHNIQUE)
    import longctx.mlx
    import longctx.torch
    for package in (longctx.mlx, longctx.torch):  # the lab's exports are public names of both backends
        assert package.ToyAttention.__module__ == f"{package.__name__}.toy" and "ToyAttention" in dir(package)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_longctx_bench_runs_the_toy(toy, backend, tmp_path, monkeypatch):
    from longctx import bench, cli
    rows = bench.run(backend, bench.techniques_for(["toy", "sliding"], 16), [64, 256], heads=2, head_dim=16,
                     repeats=1)
    toy_rows = {r["length"]: r for r in rows if r["technique"] == "toy"}
    sliding = {r["length"]: r for r in rows if r["technique"] == "sliding"}
    for L, r in toy_rows.items():
        assert r["median_ms"] > 0 and r["peak_memory_bytes"] <= r["memory_estimate_bytes"], r
        assert r["quality"] == pytest.approx(sliding[L]["quality"], abs=1e-5), "the toy is sliding window 16"
    monkeypatch.setattr(bench, "cache_rows", lambda *a, **k: [])  # the streaming-cache rows: not the toy's
    out = tmp_path / "out"
    assert cli.main(["bench", "--techniques", "toy", "--lengths", "64", "--backend", backend, "--repeats", "1",
                     "--heads", "2", "--dim", "16", "--window", "16", "--out", str(out)]) == 0
    written = json.loads((out / "bench.json").read_text())
    assert any(r["technique"] == "toy" for r in written["rows"]), "bench.json has the toy's row"


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_long_context_qwen3_runs_the_toy_strategy(toy, backend):
    """The toy's cache is the sliding window's: the same logits as ``sliding`` through both loaders."""
    import importlib
    from longctx.models import mlx_qwen3, torch_qwen3
    module = importlib.import_module(f"longctx.{backend}")
    model = (mlx_qwen3 if backend == "mlx" else torch_qwen3)(0)
    ids = list(np.random.default_rng(0).integers(3, 200, 90))
    got = module.LongContextQwen3(model, "toy", width=24, chunk_size=16).process_long_sequence(ids)
    want = module.LongContextQwen3(model, "sliding", window_size=24, chunk_size=16).process_long_sequence(ids)
    got, want = (np.array(x.tolist(), dtype=np.float64) for x in (got, want))
    assert np.allclose(got, want, atol=1e-5) and not np.allclose(got[:, 30:], module_full(module, model, ids)[:, 30:],
                                                                 atol=1e-3)
    with pytest.raises(ValueError, match="width"):
        module.LongContextQwen3(model, "toy", window_size=24)  # its options are its own


def module_full(module, model, ids):
    return np.array(module.LongContextQwen3(model, "full").process_long_sequence(ids).tolist(), dtype=np.float64)


def test_the_books_table_lists_the_toy(toy):
    """The registry's table in "Adding a technique" is printed from ``TECHNIQUES``, so the toy is in it."""
    import contextlib
    import io
    chapter = (Path(__file__).resolve().parents[1] / "book" / "src" / "adding-a-technique.md").read_text()
    block = re.search(r"```python,runnable\n(.*?)```", chapter, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(block, {})
    assert re.search(r"^toy\s+Task 99\s+runs ToyAttention", printed.getvalue(), re.M), printed.getvalue()


TOY_TEST = '''
import numpy as np
import pytest

from longctx.testing import oracles
from longctx.testing.compare import assert_close

pytestmark = pytest.mark.task(99)


@pytest.mark.parametrize("L, width", [(1, 1), (37, 8), (40, 64)])
def test_the_toy_is_a_sliding_window(lab, arrays, L, width):
    rng = np.random.default_rng(L)
    q, k, v = (rng.standard_normal((1, 2, L, 8)) for _ in range(3))
    got = lab("toy").ToyAttention(width)(*(arrays.asarray(x) for x in (q, k, v)))
    assert_close(arrays.numpy(got), oracles.sliding_window_attention(q, k, v, width), atol=1e-5, name="toy")
'''
TOY_CONFTEST = '''
from longctx.techniques import Task, register_task

register_task(Task(99, "Toy window", "adding-a-technique.md", "toy", ("ToyAttention",)))

from longctx.testing.harness import *  # noqa: E402,F401,F403  (the graded-lab plugin, as labs/week3's)
'''


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_the_graded_harness_grades_the_toy(tmp_path, backend):
    """A lab of the toy (its file, a graded test, the Task registered in its conftest) gets its own
    row in the graded table and results.json, passing as written and failing with a window one wider."""
    import subprocess
    folder = tmp_path / "lab"
    folder.mkdir()
    (folder / "test_toy.py").write_text(TOY_TEST)
    (folder / "conftest.py").write_text(TOY_CONFTEST)
    results = tmp_path / "results.json"

    def grade(source):
        (folder / "toy.py").write_text(source)
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--impl-dir",
                              str(folder), "--results-json", str(results), str(folder)],
                             cwd=folder, capture_output=True, text=True, timeout=600)
        return run, json.loads(results.read_text())["tasks"]["99"]
    run, row = grade(TOY[backend])
    assert run.returncode == 0 and row["name"] == "Toy window" and row["status"] == "PASS", run.stdout[-2000:]
    assert "Toy window" in run.stdout, "the graded table names the toy's row"
    run, row = grade(TOY[backend].replace("j > i - self.width", "j >= i - self.width"))
    assert run.returncode != 0 and row["status"] == "FAIL" and row["passed"] < row["total"], run.stdout[-2000:]
