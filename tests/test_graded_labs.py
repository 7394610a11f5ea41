"""The graded suites, run as a learner runs them (``pytest labs/week3 ...``).

The reference and the mirror pass everything; the stubs pass nothing and every
test is a TODO; a copy of the reference passes through ``--impl-dir``; and
each planted bug (the classic mistakes, and correct-but-quadratic versions)
fails at least one graded test.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "week3" / "sliding.py"


def grade(tmp_path, *args) -> tuple[int, dict, str]:
    results = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "labs" / "week3"), "-q",
                           "-p", "no:cacheprovider", "--results-json", str(results), *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=900)
    data = json.loads(results.read_text()) if results.exists() else {}
    return proc.returncode, data, proc.stdout + proc.stderr


@pytest.mark.parametrize("impl", ["solutions", "torch"])
def test_reference_passes_everything(tmp_path, impl):
    code, data, out = grade(tmp_path, "--impl", impl)
    assert code == 0, out
    assert data["backend"] == ("torch" if impl == "torch" else "mlx")
    assert set(data["tests"].values()) == {"passed"}, out
    assert data["tasks"]["1"]["status"] == "PASS"


def test_copy_of_solutions_passes_through_impl_dir(tmp_path):
    copy = tmp_path / "mine"
    shutil.copytree(ROOT / "solutions" / "week3", copy)
    code, data, out = grade(tmp_path, "--impl-dir", str(copy))
    assert code == 0, out
    assert data["impl"] == str(copy)
    assert set(data["tests"].values()) == {"passed"}


def test_stubs_are_all_todo(tmp_path):
    code, data, out = grade(tmp_path)
    assert code != 0, "a run with unfinished stubs must fail"
    assert data["tasks"]["1"]["status"] == "TODO"
    assert data["tasks"]["1"]["todo"] == data["tasks"]["1"]["total"] > 0, out
    assert "Traceback" not in out and "Error" not in out.replace("NotImplementedError", ""), out
    assert out.count("TODO Task 1:") == 1, out


def test_task_option_selects_one_task(tmp_path):
    code, data, out = grade(tmp_path, "--impl", "solutions", "--task", "2")
    assert code == 5, out  # nothing is graded for a task with no tests yet
    code, data, out = grade(tmp_path, "--impl", "solutions", "--task", "1")
    assert code == 0 and list(data["tasks"]) == ["1"], out


QUADRATIC_MEMORY = '''
    def sliding_attention(self, q, k, v):
        check_attention(q, k, v)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        mask = self.create_sliding_mask(q.shape[2], k.shape[2] - q.shape[2])
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    __call__ = sliding_attention
'''

QUADRATIC_TIME = '''
    def sliding_attention(self, q, k, v):
        check_attention(q, k, v)
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        Lq, Lk = q.shape[2], k.shape[2]
        outs = []
        for s in range(0, Lq, 64):  # every key for every block: memory O(L), time O(L^2)
            e = min(Lq, s + 64)
            p = mx.arange(Lk - Lq + s, Lk - Lq + e)[:, None]
            j = mx.arange(Lk)[None]
            m = (j <= p) & (j > p - self.window_size)
            outs.append(mx.fast.scaled_dot_product_attention(q[:, :, s:e], k, v, scale=scale, mask=m))
        return mx.concatenate(outs, axis=2)

    __call__ = sliding_attention
'''

MUTANTS = {
    "window off by one (attention)": [("(c > r - window)", "(c >= r - window)")],
    "window off by one (mask)": [("(j > p - self.window_size)", "(j >= p - self.window_size)")],
    "future leaks (attention)": [("band = (c <= r)", "band = (c <= r + 1)")],
    "future leaks (mask)": [("return (j <= p)", "return (j <= p + 1)")],
    "missing scale": [("(scale * LOG2E)", "LOG2E")],
    "scale argument ignored": [("scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale",
                                "scale = q.shape[-1] ** -0.5")],
    "offset ignored (attention)": [("start = (Lk - Lq) - nprev * block", "start = -nprev * block")],
    "offset ignored (mask)": [("mx.arange(offset, offset + seq_len)[:, None]", "mx.arange(seq_len)[:, None]")],
    "GQA heads as h % Hkv": [("qf = qf.reshape(B, Hkv, rep, nb, block, D).transpose(0, 1, 3, 2, 4, 5)",
                              "qf = qf.reshape(B, rep, Hkv, nb, block, D).transpose(0, 2, 3, 1, 4, 5)")],
    "swapped axes in the output": [("return o[:, :, :Lq].astype(q.dtype)",
                                    "return o[:, :, :Lq].astype(q.dtype).swapaxes(1, 2)")],
    "no float32 accumulation": [(".astype(mx.float32)", ".astype(q.dtype)")],
    "no validation": [("        check_attention(q, k, v)\n", "")],
    "window not validated": [('self.window_size = check_positive_int("window_size", window_size)',
                              "self.window_size = window_size")],
    "quadratic memory (dense mask)": "QUADRATIC_MEMORY",
    "quadratic time (every key per block)": "QUADRATIC_TIME",
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_each_planted_bug_fails_a_graded_test(tmp_path, name):
    source = SOLUTION.read_text()
    edits = MUTANTS[name]
    if isinstance(edits, str):  # replace sliding_attention wholesale
        start = source.index("    def sliding_attention(")
        end = source.index("    __call__ = sliding_attention\n") + len("    __call__ = sliding_attention\n")
        source = source[:start] + globals()[edits].lstrip("\n") + source[end:]
    else:
        for old, new in edits:
            assert old in source, f"mutant {name!r} no longer applies: {old!r} is not in the solution"
            source = source.replace(old, new)
    folder = tmp_path / "mutant"
    folder.mkdir()
    (folder / "sliding.py").write_text(source)
    code, data, out = grade(tmp_path, "--impl-dir", str(folder))
    assert code != 0, f"planted bug {name!r} passed every graded test"
    failed = [t for t, outcome in data["tests"].items() if outcome != "passed"]
    assert failed, out
