"""`longctx.caches`: every strategy's cache saved, loaded and copied, in MLX and torch; and the
serving engine's store (a crash in an upload leaves no half document), keys and rate limit."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import longctx  # noqa: F401  (fast BLAS before mlx.core)
from longctx.caches import copy_cache, load_cache, save_cache
from longctx.techniques import STRATEGIES

OPTIONS = {"sliding": {"window_size": 64}, "hierarchical": {"levels": (32, 128), "dilations": (1, 2)},
           "streaming": {"window": 64}, "compressed": {"compression_ratio": 0.5, "method": "snapkv"},
           "memory": {"last_context_length": 32, "memory_size": 256, "context_length": 128}}
DOC = [int(x) for x in np.random.default_rng(0).integers(3, 500, 301)]
QUESTION = [int(x) for x in np.random.default_rng(1).integers(3, 500, 9)]


@pytest.fixture(scope="module", params=["mlx", "torch"])
def backend(request):
    from longctx.models import load_trained
    model, _ = load_trained(request.param)
    module = __import__(f"longctx.{request.param}", fromlist=["LongContextQwen3"])
    return request.param, model, module.LongContextQwen3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_saved_loaded_or_copied_cache_continues_as_the_original(backend, strategy, tmp_path):
    name, model, LongContextQwen3 = backend
    long = LongContextQwen3(model, strategy, **OPTIONS.get(strategy, {}))
    doc = long.prefill(DOC)
    save_cache(tmp_path / "c.safetensors", doc, {"document": "d1"})
    loaded = long.make_cache()
    assert load_cache(tmp_path / "c.safetensors", loaded) == {"document": "d1"}
    answers = [list(long.generate(QUESTION, 12, cache=c))
               for c in (copy_cache(doc, long.make_cache()), loaded, copy_cache(doc, long.make_cache()))]
    # The third copy was made after two continuations: the original was never written to.
    assert answers[0] == answers[1] == answers[2]
    # And the whole prompt at once gives the same tokens where the strategy does not depend on the split.
    if strategy in ("full", "sliding", "hierarchical", "streaming"):
        assert answers[0] == list(LongContextQwen3(model, strategy, **OPTIONS.get(strategy, {}))
                                  .generate(DOC + QUESTION, 12))


def test_prefilling_in_two_calls_then_continuing_equals_one_prompt(backend):
    """``prefill`` then ``generate(cache=...)`` is ``generate`` on the joined prompt (full attention)."""
    name, model, LongContextQwen3 = backend
    long = LongContextQwen3(model, "full")
    doc = long.prefill(DOC[:150])
    long.prefill(DOC[150:], doc)  # continued in place
    assert list(long.generate(QUESTION, 10, cache=doc)) == list(long.generate(DOC + QUESTION, 10))


def test_a_cache_of_other_classes_is_refused(backend, tmp_path):
    name, model, LongContextQwen3 = backend
    sink = LongContextQwen3(model, "streaming", window=64)
    save_cache(tmp_path / "s.safetensors", sink.prefill(DOC[:50]))
    other = LongContextQwen3(model, "compressed").make_cache()
    with pytest.raises(ValueError, match="into must be (a )?fresh caches? of the saved classes"):
        load_cache(tmp_path / "s.safetensors", other)
    with pytest.raises(ValueError, match="path"):
        load_cache(tmp_path / "missing.safetensors", sink.make_cache())


def test_a_continued_cache_refuses_rope_scaling(backend):
    name, model, LongContextQwen3 = backend
    long = LongContextQwen3(model, "full", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="cache"):
        long.prefill(DOC[:10], long.make_cache())
    with pytest.raises(ValueError, match="cache"):
        next(long.generate(DOC[:10], 2, cache=long.make_cache()))


# ----- the serving engine's store ------------------------------------------------------------------
@pytest.fixture()
def engine_factory(tmp_path):
    pytest.importorskip("fastapi")
    from longctx.models import TRAINED
    from longctx.serve.engine import Engine
    made = []

    def make(**kw):
        made.append(Engine(TRAINED, kw.pop("strategy", "full"), data=tmp_path / "data", **kw))
        return made[-1]
    yield make
    for e in made:
        e.close()


def test_a_crash_in_an_upload_leaves_no_half_document(engine_factory, tmp_path, monkeypatch):
    import longctx.serve.engine as engine_module
    engine = engine_factory()
    kept = engine.add_document("k1", "kept", DOC[:40], "raw")

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(engine_module, "save_cache", crash)
    with pytest.raises(OSError):
        engine.add_document("k1", "lost", DOC[:60], "raw")
    assert [d.name for d in engine.documents.values()] == ["kept"]
    assert [p.name for p in (tmp_path / "data" / "documents").iterdir()] == [kept.id]
    assert any((tmp_path / "data" / "tmp").iterdir())  # the half-written one, outside documents/
    monkeypatch.undo()
    again = engine_factory()  # a restart clears it and finds the whole one
    assert list(again.documents) == [kept.id] and not any((tmp_path / "data" / "tmp").iterdir())
    answer = again.query(again.documents[kept.id], QUESTION, 6, {})
    assert answer.text == engine.query(kept, QUESTION, 6, {}).text and answer.cached_tokens == 40
    record = json.loads((tmp_path / "data" / "documents" / kept.id / "document.json").read_text())
    assert record["owner"] == "k1" and "cache" not in record


def test_the_streaming_decoder_holds_back_half_a_character():
    pytest.importorskip("fastapi")
    from transformers import AutoTokenizer

    from longctx.models import TRAINED
    from longctx.serve.engine import StreamingDecoder
    tokenizer = AutoTokenizer.from_pretrained(TRAINED)
    text = "naïve café → ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = StreamingDecoder(tokenizer)
    deltas = [decoder.add(t) for t in ids]
    assert "".join(deltas) + decoder.finish() == text
    assert not any("\ufffd" in d for d in deltas)


def test_keys_are_hashed_and_the_bucket_refills():
    from longctx.serve.security import Keys, RateLimiter, key_hash
    keys = Keys({key_hash("lc-a"): "a", key_hash("lc-b"): "b"})
    assert keys.identify("lc-a") == key_hash("lc-a")[:16] and keys.identify("lc-b") == key_hash("lc-b")[:16]
    assert keys.identify("lc-c") is None and keys.identify("") is None and keys.identify(None) is None
    assert Keys(None).identify(None) == "local"
    now = [0.0]
    limiter = RateLimiter(rate=30, burst=2, clock=lambda: now[0])  # one token every 2 s
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(2.0) and limiter.take("b") == 0.0
    now[0] = 1.0
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] = 2.0
    assert limiter.take("a") == 0.0 and limiter.take("a") == pytest.approx(2.0)
    now[0] = 100.0  # refills to the burst, not beyond
    assert [limiter.take("a") for _ in range(3)][2] > 0
    for bad in (0, -1, float("nan"), "60"):
        with pytest.raises(ValueError, match="rate"):
            RateLimiter(rate=bad, burst=1)


def test_a_keys_file_in_plain_text_is_hashed_with_a_warning(tmp_path):
    from longctx.serve.security import key_hash, new_key, read_keys
    path = tmp_path / "keys"
    path.write_text("# a comment\nlc-plain\n")
    key = new_key(path, "bob")
    with pytest.warns(UserWarning, match="plain text"):
        keys = read_keys(path)
    assert keys == {key_hash("lc-plain"): "key-2", key_hash(key): "bob"}
    path.write_text("sha256:nothex bob\n")
    with pytest.raises(ValueError, match="line 1"):
        read_keys(path)


def test_a_document_deleted_while_a_question_waits_is_gone(engine_factory):
    from longctx.serve.engine import DocumentGone
    engine = engine_factory()
    doc = engine.add_document("k1", "", DOC[:20], "raw")
    engine.delete_document(doc)
    with pytest.raises(DocumentGone, match=doc.id):
        engine.query(doc, QUESTION, 2, {})


def test_saved_caches_and_the_server_hold_on_the_oldest_mlx_lm_allowed(tmp_path):
    """The newest mlx-lm is the one installed (every other test runs on it); this runs the cache round
    trips and a served document's restart on the oldest that ``pyproject.toml`` allows, installed
    beside it (``pip install --target``, shadowing the newest through ``PYTHONPATH``)."""
    import re
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    oldest = re.search(r'"mlx-lm>=([0-9.]+)"', (root / "pyproject.toml").read_text()).group(1)
    target = tmp_path / "mlx-lm"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          f"mlx-lm=={oldest}"], capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.skip(f"mlx-lm=={oldest} could not be installed here (offline?): {pip.stderr[-300:]}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    version = subprocess.run([sys.executable, "-c", "import mlx_lm; print(mlx_lm.__version__)"], env=env,
                             capture_output=True, text=True).stdout.strip()
    assert version.split(".")[:2] == oldest.split(".")[:2], version
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                          "tests/test_caches.py", "tests/test_serve.py::test_documents_are_answered_as_mlx_lm_would_and_survive_a_restart",
                          "-k", "not oldest"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_a_document_kept_by_an_earlier_server_still_answers(engine_factory, tmp_path):
    """Servers before the int32 ids file kept the ids as ``ids.json``: a restart with another strategy
    (which prefills again from the ids) reads them, and the answer is the one a fresh upload gives."""
    engine = engine_factory()
    doc = engine.add_document("k1", "old", DOC[:40], "raw")
    folder = tmp_path / "data" / "documents" / doc.id
    (folder / "ids.json").write_text(json.dumps(DOC[:40]))
    (folder / "ids.i32").unlink()
    again = engine_factory(strategy="sliding", options={"window_size": 64})
    answer = again.query(again.documents[doc.id], QUESTION, 6, {})
    assert answer.text == again.query(again.add_document("k1", "new", DOC[:40], "raw"), QUESTION, 6, {}).text
