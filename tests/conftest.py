"""The project's tests keep to a budget: no test over ``LIMIT_SECONDS`` except those named, each
with its reason, in ``pyproject.toml`` (``[tool.longctx.slow-tests]``). A run in which another
test takes longer fails, and says which."""
from __future__ import annotations

from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

LIMIT_SECONDS = 60
SLOW = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["longctx"]["slow-tests"]
_over: dict[str, float] = {}  # "nodeid (phase)" -> seconds, for tests over the limit and not named


def _named(nodeid: str) -> bool:
    return nodeid.split("[")[0] in SLOW


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call") and report.duration > LIMIT_SECONDS and not _named(report.nodeid):
        _over[f"{report.nodeid} ({report.when})"] = report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _over and not hasattr(config, "workerinput"):
        terminalreporter.section(f"tests over {LIMIT_SECONDS} s not named in pyproject.toml", red=True)
        for name, seconds in sorted(_over.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:6.1f} s  {name}")


def pytest_sessionfinish(session, exitstatus):
    if _over and exitstatus == 0 and not hasattr(session.config, "workerinput"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
