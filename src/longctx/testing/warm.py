"""Graded pytest runs from one warm process: imports paid once, a fresh fork per run.

A graded run (``pytest labs/week3 ...``) spends 4-6 s importing MLX, mlx-lm,
torch and transformers before its first test. The project's tests grade the
reference, the mirror, the stubs and 165 planted bugs: one cold process each
costs more in imports than in tests. ``WarmPytest`` starts one server
(``python -m longctx.testing.warm``) that imports those libraries and then
forks a child per run: the child starts from the same clean state a new
process would (nothing a previous run loaded, compiled or cached survives),
runs ``pytest.main(args)`` in the requested folder and environment, and exits.

The server itself never computes: MLX's stream threads and torch's OpenMP
pool start at the first operation, and a thread does not survive ``fork``;
a child of a process that had computed would wait forever on a stream thread
that is not there. Import only.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# What every graded run imports: loaded once by the server, inherited by each child.
PRELOAD = ("longctx", "numpy", "pytest", "hypothesis", "rich", "mlx.core", "mlx.nn", "mlx_lm", "mlx_lm.models.qwen3",
           "mlx_lm.models.cache", "torch", "transformers", "transformers.models.qwen3.modeling_qwen3",
           "longctx.testing.harness", "longctx.testing.oracles", "longctx.models", "longctx.techniques")


class WarmPytest:
    """``run(args, cwd, env, timeout) -> (exit code, output)``: ``python -m pytest *args`` as it
    would run in a new process, without paying the imports again. Close it when done."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "longctx.testing.warm"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the warm pytest server did not start (it said {ready!r})")

    def run(self, args: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> tuple[int, str]:
        log = Path(cwd) / f".warm-{time.monotonic_ns()}.log"
        request = {"args": [str(a) for a in args], "cwd": str(cwd), "env": env or {}, "log": str(log),
                   "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the warm pytest server died (exit {self.proc.poll()})")
        code = json.loads(line)["code"]
        out = log.read_text(errors="replace") if log.exists() else ""
        log.unlink(missing_ok=True)
        return code, out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _child(request: dict) -> None:
    """In the fork: become ``python -m pytest *args`` in ``cwd`` with ``env``, output to ``log``."""
    code = 70
    try:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdin = open(os.devnull)
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        sys.argv = [sys.executable, "-m", "pytest", *request["args"]]
        import pytest
        # Plugins the server imported (hypothesis, anyio) cannot have their asserts rewritten: say nothing of it.
        code = int(pytest.main([*request["args"], "-W", "ignore::pytest.PytestAssertRewriteWarning"]))
    except BaseException as error:  # noqa: BLE001 -- whatever happens, the child reports and exits
        import traceback
        traceback.print_exception(error)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, timeout: float) -> int:
    """The child's exit code (``-signal`` if killed); killed after ``timeout`` seconds, as
    ``subprocess.run(timeout=...)`` would."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.02)


def serve() -> None:
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        out.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        out.write(json.dumps({"code": _wait(pid, request["timeout"])}) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
