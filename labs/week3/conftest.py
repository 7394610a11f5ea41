"""Grading for the week 3 labs: ``pytest labs/week3 [--impl solutions|torch] [--task N]``.

The plugin (options, fixtures, TODO lines, the graded table) is
``longctx.testing.harness``; this file only says where the stubs live.
"""
from pathlib import Path

import pytest

from longctx.testing.harness import *  # noqa: F401,F403  (the plugin's hooks and fixtures)


@pytest.fixture(scope="session")
def labs_dir() -> Path:
    return Path(__file__).parent
