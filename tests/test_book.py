"""The book is valid mdBook (checked without mdbook, which no registry here ships):
every SUMMARY entry exists, every {{#include}} and image resolves, and every
``python,runnable`` block runs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
SRC = BOOK / "src"
CHAPTERS = sorted(SRC.glob("*.md"))


def summary_links():
    return re.findall(r"\]\(([^)]+\.md)\)", (SRC / "SUMMARY.md").read_text())


def test_book_toml_points_at_src():
    text = (BOOK / "book.toml").read_text()
    assert re.search(r'^src\s*=\s*"src"', text, re.M)
    assert "[book]" in text


def test_summary_entries_exist_and_cover_every_chapter():
    links = summary_links()
    assert links, "SUMMARY.md lists no chapters"
    for link in links:
        assert (SRC / link).is_file(), f"SUMMARY.md links {link}, which does not exist"
    orphans = {p.name for p in CHAPTERS} - set(links) - {"SUMMARY.md"}
    assert not orphans, f"chapters missing from SUMMARY.md: {sorted(orphans)}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_includes_and_images_resolve(chapter):
    text = chapter.read_text()
    for target in re.findall(r"\{\{#include ([^}]+)\}\}", text):
        path, _, anchor = target.strip().partition(":")
        file = (chapter.parent / path).resolve()
        assert file.is_file(), f"{chapter.name}: include {path} does not exist"
        if anchor and not anchor[0].isdigit():
            body = file.read_text()
            assert f"ANCHOR: {anchor}" in body and f"ANCHOR_END: {anchor}" in body, \
                f"{chapter.name}: anchor {anchor} not found in {path}"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (chapter.parent / image).is_file(), f"{chapter.name}: image {image} does not exist"


def runnable_blocks():
    for chapter in CHAPTERS:
        for i, block in enumerate(re.findall(r"```python,runnable\n(.*?)```", chapter.read_text(), re.S)):
            yield pytest.param(block, id=f"{chapter.name}-{i}")


@pytest.mark.parametrize("code", list(runnable_blocks()))
def test_runnable_blocks_run(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_lab_module_has_a_chapter():
    text = "\n".join(p.read_text() for p in CHAPTERS)
    for module in (BOOK.parent / "solutions" / "week3").glob("[!_]*.py"):
        assert f"solutions/week3/{module.name}" in text, f"no chapter names solutions/week3/{module.name}"


def test_recorded_tables_are_their_json():
    """The training chapter's tables are included from Markdown rendered from recorded JSON: the two agree."""
    import importlib.util
    import json

    from longctx.bench import backward_markdown
    figures = BOOK / "src" / "figures" / "training"
    for path in figures.rglob("backward.json"):
        assert (path.parent / "backward.md").read_text() == backward_markdown(json.loads(path.read_text())["rows"])
    spec = importlib.util.spec_from_file_location("train_techniques", BOOK.parent / "scripts" / "train_techniques.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    record = json.loads((figures / "long-training.json").read_text())
    assert (figures / "long-training.md").read_text() == script.table(record)
