"""Make the learner stubs in ``labs/week3`` from the reference in ``solutions/week3``.

In a solution, the lines from ``# BEGIN SOLUTION`` to ``# END SOLUTION`` are
what learners write. The stub keeps everything else (imports, signatures,
docstrings, shape comments, given helpers) and puts in their place::

    raise NotImplementedError("Task 1: SlidingWindowAttention.sliding_attention -- see the book chapter ...")

The task number and chapter come from the module docstring's first line
(``Task 1: ... (book chapter "Sliding-window attention")``). ``--check``
fails when a stub differs from what its solution generates.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
HEADER = ('# Learner stub for Task {task}, generated from solutions/{folder}/{name} by `longctx stubs`.\n'
          '# Replace each `raise NotImplementedError(...)` with your code; grade it with\n'
          '#     pytest labs/{folder} --task {task}\n')


def _qualnames(tree: ast.Module) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function, outermost first."""
    spans = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    spans.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")
    visit(tree, "")
    return spans


def make_stub(source: str, name: str, folder: str = "week3") -> str:
    doc = ast.get_docstring(ast.parse(source)) or ""
    task = re.match(r"Task (\d+)", doc)
    chapter = re.search(r'book chapter "([^"]+)"', doc)
    if not task or not chapter:
        raise ValueError(f"{name}: the docstring must start 'Task N: ... (book chapter \"...\")'")
    spans = _qualnames(ast.parse(source))
    out, skipping = [], False
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if skipping:
                raise ValueError(f"{name}:{number}: {BEGIN} inside another")
            skipping = True
            inner = [q for first, last, q in spans if first <= number <= last]
            where = inner[-1] if inner else name
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("Task {task.group(1)}: {where} -- see the book '
                       f'chapter \'{chapter.group(1)}\'")\n')
        elif stripped == END:
            if not skipping:
                raise ValueError(f"{name}:{number}: {END} without {BEGIN}")
            skipping = False
        elif not skipping:
            out.append(line)
    if skipping:
        raise ValueError(f"{name}: {BEGIN} is never closed")
    return HEADER.format(task=task.group(1), folder=folder, name=name) + "".join(out)


def lab_modules(solutions: Path) -> list[Path]:
    return sorted(p for p in solutions.glob("*.py") if not p.name.startswith("_"))


def sync(root: Path, *, check: bool = False, folder: str = "week3") -> list[str]:
    """Write (or with ``check``, compare) every stub; returns the stale stubs' paths."""
    stale = []
    for solution in lab_modules(root / "solutions" / folder):
        stub = root / "labs" / folder / solution.name
        text = make_stub(solution.read_text(), solution.name, folder)
        if not stub.exists() or stub.read_text() != text:
            stale.append(str(stub.relative_to(root)))
            if not check:
                stub.write_text(text)
    return stale
