"""Make the learner stubs in ``labs/week3`` from the reference in ``solutions/week3``.

In a solution, the lines from ``# BEGIN SOLUTION`` to ``# END SOLUTION`` are
what learners write. The stub keeps everything else (imports, signatures,
docstrings, shape comments, given helpers) and puts in their place::

    raise NotImplementedError("Task 1: _blocked -- see the book chapter ...")

``# BEGIN STRETCH`` / ``# END STRETCH`` mark an optional exercise (the fused
GPU kernels): the stub raises ``NotImplementedError("Stretch, Task 1: ...")``
there, the code around it falls back to the ops path, and its graded tests
run only where the kernel can (they are reported on their own row).
``# BEGIN REFERENCE`` / ``# END REFERENCE`` mark what only the installed
reference does (the dispatch to ``longctx.native``'s compiled kernels): the
stub drops those lines, so the graded tests judge the learner's own code.

The task number and chapter come from the module docstring's first line
(``Task 1: ... (book chapter "Sliding-window attention")``). ``--check``
fails when a stub differs from what its solution generates.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
MARKERS = {BEGIN: (END, "Task {task}"), "# BEGIN STRETCH": ("# END STRETCH", "Stretch, Task {task}"),
           "# BEGIN REFERENCE": ("# END REFERENCE", None)}  # None: the lines are dropped, nothing raises
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
    out, closing = [], None  # closing: the END marker awaited inside a cut block
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if stripped in MARKERS:
            if closing:
                raise ValueError(f"{name}:{number}: {stripped} inside another")
            closing, label = MARKERS[stripped]
            inner = [q for first, last, q in spans if first <= number <= last]
            where = inner[-1] if inner else name
            indent = line[: len(line) - len(line.lstrip())]
            if label is not None:
                out.append(f'{indent}raise NotImplementedError("{label.format(task=task.group(1))}: {where} -- '
                           f'see the book chapter \'{chapter.group(1)}\'")\n')
        elif stripped in (end for end, _ in MARKERS.values()):
            if stripped != closing:
                raise ValueError(f"{name}:{number}: {stripped} without its BEGIN")
            closing = None
        elif not closing:
            out.append(line)
    if closing:
        raise ValueError(f"{name}: {next(b for b, (e, _) in MARKERS.items() if e == closing)} is never closed")
    return HEADER.format(task=task.group(1), folder=folder, name=name) + "".join(out)


def lab_modules(solutions: Path) -> list[Path]:
    """The reference's lab files: those whose docstring starts ``Task N:`` (a helper module of the
    reference without one gets no stub)."""
    return sorted(p for p in solutions.glob("*.py") if not p.name.startswith("_")
                  and (ast.get_docstring(ast.parse(p.read_text())) or "").startswith("Task "))


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
