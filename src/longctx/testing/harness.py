"""The graded-lab pytest plugin. ``labs/week3/conftest.py`` imports it whole.

* ``--impl labs|solutions|torch`` or ``--impl-dir DIR`` (``LONGCTX_IMPL`` sets
  the default) chooses which files are graded; tests get modules from the
  ``lab`` fixture and arrays from the ``arrays`` backend fixture, never by import.
* ``--task N`` grades one task (``@pytest.mark.task(N)``).
* Points: ``@pytest.mark.task(N, points=P)`` (default 1) is what a test
  function is worth, shared among its parametrized cases, so five bad-input
  cases weigh what one property test does. ``stretch=True`` puts a test on
  its task's stretch row (the fused GPU kernels: graded only where they run).
* A test stopped by a ``NotImplementedError`` raised in the graded folder's
  own files is a TODO: it counts as not passed, prints no traceback, and each
  stub shows once as ``TODO Task N: ...``. One raised inside MLX, torch or
  anything else is an ordinary failure. Skipped tests do not count.
* At the end: one rich table (task, passed, points, what the task measured)
  and ``results.json``.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

from longctx.techniques import TASKS
from longctx.testing.backends import make_backend


settings.register_profile("longctx", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
# The same examples without shrinking a failure to its smallest case: a verdict, not a lesson (the
# project grades its planted bugs with it: ``--hypothesis-profile longctx-verdict``).
settings.register_profile("longctx-verdict", settings.get_profile("longctx"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile("longctx")

_STATE = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("longctx", "graded labs")
    group.addoption("--impl", default=os.environ.get("LONGCTX_IMPL", "labs"),
                    choices=["labs", "solutions", "torch"],
                    help="what to grade: the learner stubs (labs, default), the MLX reference "
                         "(solutions) or the PyTorch mirror (torch); env LONGCTX_IMPL")
    group.addoption("--impl-dir", default=None, metavar="DIR",
                    help="grade the lab modules in DIR instead (e.g. a copy of your work)")
    group.addoption("--task", type=int, default=None, metavar="N", help="grade only task N")
    group.addoption("--results-json", default="results.json", metavar="PATH",
                    help="where to write the graded results (default: results.json)")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """A graded run is one process: its table and ``results.json`` add up every test it ran. The
    project's ``-n`` (pytest-xdist, in ``pyproject.toml``'s addopts) is for ``tests/``."""
    if getattr(config.option, "numprocesses", None):
        config.option.numprocesses = 0


def pytest_configure(config):
    config.addinivalue_line("markers", "task(n): the lab task a graded test belongs to")
    config.stash[_STATE] = {"verdicts": {}, "figures": defaultdict(dict), "cases": {}}


def pytest_collection_modifyitems(config, items):
    cases = config.stash[_STATE]["cases"]
    for item in items:  # parametrized cases of one test function share its points
        key = (item.path, getattr(item, "originalname", item.name))
        cases[key] = cases.get(key, 0) + 1
    wanted = config.getoption("task")
    if wanted is None:
        return
    keep, drop = [], []
    for item in items:
        (keep if _task_of(item) == wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _task_of(item) -> int | None:
    marker = item.get_closest_marker("task")
    return marker.args[0] if marker else None


def implementation_dir(config, labs_dir: Path) -> Path:
    """The folder whose modules are graded."""
    if config.getoption("impl_dir"):
        path = Path(config.getoption("impl_dir")).expanduser().resolve()
        if not path.is_dir():
            raise pytest.UsageError(f"--impl-dir: {path} is not a folder")
        return path
    impl = config.getoption("impl")
    if impl == "labs":
        return labs_dir
    if impl == "solutions":
        repo_copy = labs_dir.parent.parent / "solutions" / labs_dir.name
        if repo_copy.is_dir():
            return repo_copy
        return _package_folder("longctx.mlx")
    return _package_folder("longctx.torch")


def _package_folder(name: str) -> Path:
    """Where an installed package lives, without importing it (the harness sits below the backends)."""
    import importlib.util
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def backend_of(folder: Path) -> str:
    """``torch`` when the folder's modules import torch and not mlx, else ``mlx``."""
    text = "\n".join(p.read_text() for p in folder.glob("*.py"))
    if re.search(r"^\s*(import|from)\s+mlx\b", text, re.M):
        return "mlx"
    return "torch" if re.search(r"^\s*(import|from)\s+torch\b", text, re.M) else "mlx"


class Lab:
    """Loads lab modules by name from one folder, as submodules of a package made
    for that folder (so ``from .sliding import ...`` reaches the graded Task 1),
    never via ``sys.path``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.backend = backend_of(folder)
        self.package = f"longctx_graded_{len(sys.modules)}_{folder.name}"
        package = types.ModuleType(self.package)
        package.__path__ = [str(folder)]
        sys.modules[self.package] = package

    def __call__(self, name: str):
        if not (self.folder / f"{name}.py").exists():
            raise NotImplementedError(f"no {name}.py in {self.folder}")
        return importlib.import_module(f"{self.package}.{name}")


@pytest.fixture(scope="session")
def labs_dir() -> Path:
    """The learner stubs' folder; ``labs/week3/conftest.py`` overrides this."""
    return Path.cwd()


@pytest.fixture(scope="session")
def lab(request, labs_dir):
    """``lab("sliding")`` -> the graded implementation's ``sliding`` module."""
    loader = Lab(implementation_dir(request.config, Path(labs_dir)))
    request.config.stash[_STATE]["impl"] = str(loader.folder)
    request.config.stash[_STATE]["backend"] = loader.backend
    return loader


@pytest.fixture(scope="session")
def arrays(lab):
    """The backend face (``asarray``, ``numpy``, ``seconds``, ``peak_bytes``...) for the graded modules."""
    return make_backend(lab.backend)


@pytest.fixture(scope="session")
def tiny_models(arrays):
    """``make(**config) -> (model, forward(ids, cache) -> logits (L, vocab), new_full_cache())``:
    the seeded tiny Qwen3 (``longctx.models``) in the graded backend, mlx-lm's or transformers'."""
    from longctx import models
    made = {}

    def make(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in made:
            made[key] = _tiny(arrays.name, models, overrides)
        return made[key]
    return make


def _tiny(backend, models, overrides):
    if backend == "torch":
        import torch
        from transformers import DynamicCache
        model = models.torch_qwen3(0, **overrides)

        def forward(ids, cache=None):
            with torch.no_grad():
                ids = torch.as_tensor(np.asarray(ids))[None]
                return model(ids, past_key_values=cache, use_cache=cache is not None).logits[0]
        return model, forward, lambda: DynamicCache(config=model.config)
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    model = models.mlx_qwen3(0, **overrides)
    return model, lambda ids, cache=None: model(mx.array(np.asarray(ids))[None], cache=cache)[0], \
        lambda: make_prompt_cache(model)


@pytest.fixture(scope="session")
def tiny_model(tiny_models):
    """The default tiny Qwen3 (2 layers): ``(model, forward, new_full_cache)``."""
    return tiny_models()


@pytest.fixture(scope="session")
def shipped_model(arrays):
    """``(model, tokenizer)``: the trained model that ships with longctx (``longctx.models.TRAINED``),
    through the real loaders: ``mlx_lm.load`` or transformers' ``from_pretrained``."""
    from longctx.models import load_trained
    return load_trained(arrays.name)


@pytest.fixture
def record(request):
    """``record(label, text)``: a speed/memory figure for this task's row of the table."""
    figures = request.config.stash[_STATE]["figures"][_task_of(request.node)]
    return lambda label, text: figures.__setitem__(label, text)


def _row_of(item) -> str:
    marker = item.get_closest_marker("task")
    task = _task_of(item)
    return f"{task} stretch" if marker and marker.kwargs.get("stretch") else str(task)


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside an exception group (hypothesis reports distinct failures as one)."""
    inner = getattr(error, "exceptions", None)  # BaseExceptionGroup (Python 3.11+, or the backport)
    if isinstance(inner, (list, tuple)) and inner:
        return [leaf for e in inner for leaf in _leaves(e)]
    return [error]


def _todo(excinfo, folder: str | None) -> NotImplementedError | None:
    """The learner's ``NotImplementedError`` that stopped the test, if every error raised is one
    and each was raised by code in ``folder`` (its innermost frame is there), else None."""
    errors = _leaves(excinfo.value)
    for error in errors:
        if not isinstance(error, NotImplementedError):
            return None
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        path = Path(tb.tb_frame.f_code.co_filename).resolve() if tb is not None else None
        if folder and path != Path(__file__).resolve() and not (  # Lab: a module missing from the folder
                path and str(path).startswith(str(Path(folder).resolve()) + os.sep)):
            return None
    return errors[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    state = item.config.stash[_STATE]
    marker = item.get_closest_marker("task")
    share = state["cases"].get((item.path, getattr(item, "originalname", item.name)), 1)
    report.user_properties += [("task", _task_of(item)), ("row", _row_of(item)),
                               ("points", (marker.kwargs.get("points", 1) if marker else 1) / share)]
    todo = _todo(call.excinfo, state.get("impl")) if call.excinfo is not None else None
    if todo is not None:
        message = str(todo) or f"{item.name} is not implemented"
        if not message.startswith(("Task", "Stretch")):
            message = f"Task {_task_of(item)}: {message}"
        report.outcome = "failed"
        report.longrepr = f"TODO {message}"
        report.user_properties.append(("todo", message))
    # One verdict per test: the call phase, or a setup/teardown that did not pass; skipped tests do not count.
    if report.skipped:
        return
    if report.when == "call" or report.outcome != "passed":
        verdicts = state["verdicts"]
        if report.nodeid not in verdicts or report.outcome != "passed":
            verdicts[report.nodeid] = (dict(report.user_properties), report.outcome)


def pytest_report_teststatus(report, config):
    if dict(getattr(report, "user_properties", ())).get("todo"):  # collection reports have none
        return "todo", "T", "TODO"
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash[_STATE]
    verdicts = state["verdicts"]
    if not verdicts:
        return
    for line in sorted({props["todo"] for props, _ in verdicts.values() if props.get("todo")}):
        terminalreporter.write_line(f"TODO {line}", yellow=True, bold=True)

    rows: dict = {}
    for props, outcome in verdicts.values():
        row = rows.setdefault(props.get("row", str(props.get("task"))),
                              {"passed": 0, "total": 0, "points": 0.0, "max_points": 0.0, "todo": 0,
                               "task": props.get("task")})
        row["total"] += 1
        row["max_points"] += props.get("points", 1)
        if outcome == "passed":
            row["passed"] += 1
            row["points"] += props.get("points", 1)
        row["todo"] += bool(props.get("todo"))

    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"longctx graded labs: {state.get('impl', '?')} ({state.get('backend', '?')})")
    for column in ("Task", "Tests passed", "Points", "Status", "Measured"):
        table.add_column(column)
    results = {"impl": state.get("impl"), "backend": state.get("backend"), "tasks": {},
               "tests": {nodeid: outcome for nodeid, (_, outcome) in verdicts.items()}}
    for key in sorted(rows, key=lambda k: (rows[k]["task"] is None, rows[k]["task"] or 0, k)):
        row = rows[key]
        task = row.pop("task")
        status = "PASS" if row["passed"] == row["total"] else ("TODO" if row["todo"] else "FAIL")
        name = TASKS[task].title if task in TASKS else "unmarked"
        name += " (stretch)" if key.endswith("stretch") else ""
        figures = state["figures"].get(task, {}) if not key.endswith("stretch") else {}
        row["points"], row["max_points"] = round(row["points"], 2), round(row["max_points"], 2)
        table.add_row(f"{task} {name}", f"{row['passed']}/{row['total']}",
                      f"{row['points']:g}/{row['max_points']:g}",
                      {"PASS": "[green]PASS", "TODO": "[yellow]TODO", "FAIL": "[red]FAIL"}[status],
                      "\n".join(f"{k}: {v}" for k, v in figures.items()))
        results["tasks"][key] = {"name": name, **row, "status": status, "figures": figures}
    console = Console(width=120, record=True, file=open(os.devnull, "w"))
    console.print(table)
    for line in console.export_text().rstrip().splitlines():
        terminalreporter.write_line(line)
    path = Path(config.getoption("results_json"))
    path.write_text(json.dumps(results, indent=2))
    terminalreporter.write_line(f"graded results written to {path}")
