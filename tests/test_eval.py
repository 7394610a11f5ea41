"""The task prompts, the evaluation suite and the trained model that ships with longctx."""
import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx import eval as suite
from longctx.data import tasks
from longctx.models import TRAINED, load_trained, tiny_tokenizer
from longctx.testing.oracles import qwen3_logits


@pytest.fixture(scope="module")
def shipped():
    return {"mlx": load_trained("mlx"), "torch": load_trained("torch")}


def wrap(backend, model, strategy="full", **options):
    if backend == "mlx":
        from longctx.mlx import LongContextQwen3
    else:
        from longctx.torch import LongContextQwen3
    return LongContextQwen3(model, strategy, **options)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(160, 900), depth=st.floats(0, 1), key=st.integers(10_000, 99_999))
def test_passkey_prompt_is_exact_and_holds_the_needle(length, depth, key):
    tok = tiny_tokenizer()
    p = tasks.passkey(tok, length, depth, key)
    assert len(p.ids) == length and p.answer == str(key)
    assert p.ids[0] == tok.convert_tokens_to_ids(tasks.BOS)
    needle = list(tok.encode(tasks.PASSKEY_NEEDLE.format(key, key), add_special_tokens=False))
    assert p.ids[p.needle_at:p.needle_at + len(needle)] == needle
    assert tok.decode(p.ids).endswith(tasks.PASSKEY_QUESTION)
    head = 1 + len(tok.encode(tasks.PASSKEY_PREFIX, add_special_tokens=False))
    room = length - head - len(tok.encode(tasks.PASSKEY_QUESTION, add_special_tokens=False)) - len(needle)
    filler = len(tok.encode(tasks.FILLER, add_special_tokens=False))
    assert abs(p.needle_at - head - depth * room) <= filler, "the needle sits at the filler boundary nearest depth"


@pytest.mark.parametrize("builder", ["needle", "kv_recall", "copy"])
def test_other_prompts_hold_their_answer(builder):
    tok, rng = tiny_tokenizer(), np.random.default_rng(0)
    p = {"needle": lambda: tasks.needle(tok, 300, 0.5, 12345, start=7),
         "kv_recall": lambda: tasks.kv_recall(tok, 20, 13, rng),
         "copy": lambda: tasks.copy(tok, 30, rng)}[builder]()
    text = tok.decode(p.ids)
    assert p.answer in text and p.score(" " + p.answer + ".") == 1.0 and p.score("nope") == 0.0
    assert p.score(p.answer) == 1.0 and p.score(" " + p.answer + "7") == 0.0, "a longer answer is wrong"
    if builder == "needle":
        assert len(p.ids) == 300 and text.endswith(tasks.NEEDLE_QUESTION)
    if builder == "kv_recall":
        asked = tok.decode(p.ids[p.needle_at:]).split(".")[0]
        assert asked.endswith(f" is {p.answer}") and text.count(asked.split(" is ")[0] + " is") == 2  # line, question


@pytest.mark.parametrize("call,name", [(lambda t: tasks.passkey(t, 100, 0.5, 12345), "length"),
                                       (lambda t: tasks.passkey(t, 400, 1.5, 12345), "depth"),
                                       (lambda t: tasks.passkey(t, 400, 0.5, 123), "key"),
                                       (lambda t: tasks.kv_recall(t, 5, 5, np.random.default_rng(0)), "asked")])
def test_bad_task_arguments_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call(tiny_tokenizer())


def test_shipped_model_loads_the_same_in_mlx_lm_and_transformers(shipped):
    (mlx_model, mlx_tok), (hf_model, hf_tok) = shipped["mlx"], shipped["torch"]
    config = json.loads((TRAINED / "config.json").read_text())
    assert config["model_type"] == "qwen3" and (TRAINED / "README.md").is_file() and (TRAINED / "loss.png").is_file()
    assert sum(p.stat().st_size for p in TRAINED.iterdir()) < 8 << 20, "the shipped model stays a few MB"
    ids = tasks.passkey(hf_tok, 300, 0.5, 31415).ids
    assert mlx_tok.encode("The pass key is") == hf_tok.encode("The pass key is")
    with torch.no_grad():
        hf = hf_model(torch.tensor(ids)[None]).logits[0].numpy()
    mlx = np.array(mlx_model(mx.array(ids)[None])[0])
    from safetensors.numpy import load_file
    oracle = qwen3_logits(load_file(TRAINED / "model.safetensors"), config, ids)
    assert np.abs(hf - oracle).max() < 1e-3 and np.abs(mlx - oracle).max() < 1e-3


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_greedy_answer_is_the_oracles_greedy_continuation(shipped, backend):
    """The suite's answer is the float64 oracle's argmax continuation, token for token."""
    model, tok = shipped[backend]
    config = json.loads((TRAINED / "config.json").read_text())
    from safetensors.numpy import load_file
    weights = load_file(TRAINED / "model.safetensors")
    p = tasks.passkey(tok, 200, 0.4, 27182)
    ids = list(p.ids)
    n = len(tok.encode(" " + p.answer, add_special_tokens=False)) + 1
    for _ in range(n):
        ids.append(int(qwen3_logits(weights, config, ids)[-1].argmax()))
    assert suite.greedy_answer(wrap(backend, model), tok, p) == tok.decode(ids[len(p.ids):])


def test_perplexity_by_position_is_the_oracle_nll(shipped):
    model, tok = shipped["mlx"]
    config = json.loads((TRAINED / "config.json").read_text())
    from safetensors.numpy import load_file
    ids = tasks.text(tok, 200, start=3)
    logits = qwen3_logits(load_file(TRAINED / "model.safetensors"), config, ids)[:-1]
    top = logits.max(-1, keepdims=True)
    want = (top[:, 0] + np.log(np.exp(logits - top).sum(-1))) - logits[np.arange(199), ids[1:]]
    starts, nll = suite.perplexity_by_position(wrap("mlx", model, chunk_size=64), tok, 200, bucket=50, start=3)
    assert starts.tolist() == [1, 51, 101, 151]
    np.testing.assert_allclose(nll, [want[s - 1:s + 49].mean() for s in starts], rtol=1e-4, atol=1e-4)


def test_suite_functions_agree_across_backends(shipped):
    """The same answers and perplexities through the MLX and the torch LongContextQwen3 (streaming)."""
    rng = np.random.default_rng(0)
    tok = shipped["mlx"][1]
    prompts = [tasks.passkey(tok, 300, 0.2, 31337), tasks.copy(tok, 20, rng), tasks.kv_recall(tok, 10, 3, rng),
               tasks.needle(tok, 250, 1.0, 42424)]
    got = {}
    for backend, (model, tok) in shipped.items():
        long = wrap(backend, model, "streaming", sink_tokens=4, window=64, chunk_size=32)
        got[backend] = ([suite.greedy_answer(long, tok, p) for p in prompts],
                        suite.perplexity_by_position(long, tok, 300, bucket=100)[1])
    assert got["mlx"][0] == got["torch"][0]
    np.testing.assert_allclose(got["mlx"][1], got["torch"][1], rtol=1e-4, atol=1e-4)


def test_the_shipped_model_retrieves_at_its_training_length_and_a_window_loses_what_it_cannot_see(shipped):
    """What the shipped model is for: the passkey at its training length (fresh keys and depths,
    not the model card's), and sliding-window attention failing once the needle is outside it."""
    model, tok = shipped["mlx"]
    assert model.args.max_position_embeddings == 512
    full = suite.passkey_accuracy(wrap("mlx", model), tok, 512, depths=[d / 7 for d in range(8)], trials=5, seed=7)
    assert full >= 0.85, full
    # A 64-token window holds the question and some filler: the needle, at depth <= 0.6, is >= 150 tokens back.
    far = dict(depths=(0.0, 0.3, 0.6), trials=5, seed=7)
    assert suite.passkey_accuracy(wrap("mlx", model), tok, 512, **far) >= 0.8
    assert suite.passkey_accuracy(wrap("mlx", model, "sliding", window_size=64), tok, 512, **far) <= 0.1


def test_eval_cli_writes_json_and_plots(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "longctx.cli", "eval", "--quick", "--out", str(tmp_path),
                           "--log", "mlflow"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "eval.json").read_text())
    assert set(data["passkey"]) == {"full", "sliding", "streaming", "hierarchical", "compressed"}
    assert all(0 <= a <= 1 for row in data["passkey"].values() for a in row.values())
    assert set(data["perplexity"]) == {"full", "sliding (window, no sinks)", "streaming, 0 sinks",
                                       "streaming, 4 sinks"}
    ext = data["extension"]
    assert list(ext["rows"]) == ["none", "linear x4", "dynamic x4", "yarn x4", "llama3 x4"]
    assert ext["lengths"] == [512, 1024] and all(len(r["nll_by_position"]) == 1024 for r in ext["rows"].values())
    assert ext["rows"]["linear x4"]["perplexity"] > 10 * ext["rows"]["yarn x4"]["perplexity"], \
        "PI without fine-tuning breaks the shipped model's local order (see the Task 9 chapter)"
    mem = data["memory"]
    assert mem["lengths"] == [1024] and list(mem["rows"]) == [
        "full", "sliding 512", "memory off, no fine-tune", "memory dense, no fine-tune",
        "memory top_k=128, no fine-tune", "memory top_k=32, no fine-tune"]
    assert all(len(r["passkey"]) == len(r["ms_per_token"]) == len(r["peak_mib"]) == 1 for r in mem["rows"].values())
    for name in ("eval-needle.png", "eval-perplexity.png", "eval-recall.png", "eval-extension.png", "eval-memory.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # --log mlflow: a run with the curves by length and the files, read back through MLflow's client.
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("longctx-eval").experiment_id])
    history = client.get_metric_history(run.info.run_id, "passkey.sliding")
    assert {m.step: m.value for m in history} == {int(L): a for L, a in data["passkey"]["sliding"].items()}
    needle = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "needle.full")}
    assert needle == pytest.approx({L: sum(r) / len(r) for L, r in zip(data["needle_lengths"], data["needle"]["full"])})
    assert run.data.params["quick"] == "True" and run.data.params["backend"] == "mlx"
    assert {"eval.json", "eval-needle.png", "eval-memory.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # And through TensorBoard (the path `--log tensorboard` takes), read back by its event reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from longctx.tracking import eval_metrics, log_run
    folder = log_run("tensorboard", "eval", {"quick": True}, eval_metrics(data), [tmp_path / "eval.json"], tmp_path)
    events = EventAccumulator(folder, size_guidance={"scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("passkey/full")} == pytest.approx(
        {int(L): a for L, a in data["passkey"]["full"].items()})


def test_train_memory_resumes_where_it_stopped_and_writes_a_memory_model(tmp_path):
    """Crossbatch training in two slices equals one run (seeded data per step, optimizer state
    saved); the folder loads with both loaders and runs with its memory.json."""
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    from longctx.mlx import LongContextQwen3
    from longctx.models import TRAINED
    from longctx.models.train_memory import memory_options, train_memory
    kw = dict(steps=3, docs=1, windows=2, extra_contexts=1, context_length=128, last_context_length=32,
              save_every=1, progress=False, log=lambda *a: None)
    whole = train_memory(TRAINED, tmp_path / "whole", **kw)
    staging = train_memory(TRAINED, tmp_path / "sliced", stop_after=2, **kw)
    assert staging.name == "sliced.partial" and not (tmp_path / "sliced").exists()
    sliced = train_memory(TRAINED, tmp_path / "sliced", **kw)
    a, b = (json.loads((p / "train_memory.json").read_text()) for p in (whole, sliced))
    assert a["losses"] == b["losses"] and len(a["losses"]) == 3
    wa, wb = (mx.load(str(p / "model.safetensors")) for p in (whole, sliced))
    assert all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa), \
        "a resumed run must end where one run does"
    base = mx.load(str(TRAINED / "model.safetensors"))
    changed = {k.split(".")[2] for k in wa if k.startswith("model.layers.") and not np.array_equal(
        np.array(wa[k]), np.array(base[k]))}
    assert changed == {"1"}, f"only the memory layer trains, changed: {changed}"
    model, tok = load(str(sliced))
    options = memory_options(sliced)
    assert options == {"memory_layers": [1], "context_length": 128, "last_context_length": 32, "top_k": None,
                       "memory_size": 65536}
    ids = tok.encode("The grass is green. " * 40)
    LongContextQwen3(model, "memory", **options).process_long_sequence(ids)
    AutoModelForCausalLM.from_pretrained(sliced)
    with pytest.raises(ValueError, match="out"):
        train_memory(TRAINED, sliced, **kw)


@pytest.mark.parametrize("short_steps, steps, seq_len", [(1800, 1400, 512), (2, 3, 256), (7, 1, 300), (1, 5, 4096)])
def test_the_training_plan_spends_exactly_the_steps_asked_on_rows_shorter_than_seq_len(short_steps, steps, seq_len):
    from longctx.models.train import CURRICULUM, MIX, plan
    stages = plan(short_steps, steps, seq_len)
    assert stages[-1] == (seq_len, steps, MIX)
    assert sum(k for _, k, _ in stages[:-1]) == short_steps and all(k > 0 for _, k, _ in stages)
    lengths = [n for n, _, _ in stages[:-1]]
    assert lengths == sorted(lengths) and all(n < seq_len for n in lengths)
    assert set(lengths) <= {n for n, _, _ in CURRICULUM}


def test_train_tiny_writes_a_loadable_model_with_its_card(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "longctx.cli", "train-tiny", str(tmp_path / "m"), "--steps", "3",
                           "--short-steps", "2", "--batch-size", "2", "--seq-len", "256"],
                          capture_output=True, text=True, timeout=900)
    # Five steps form no induction head: the model is written, and the command says so and exits 1.
    assert proc.returncode == 1 and "no induction head formed" in proc.stdout, proc.stdout + proc.stderr
    assert "another --seed" in proc.stdout
    log = json.loads((tmp_path / "m" / "train.json").read_text())
    assert len(log["losses"]) == 5 and all(np.isfinite(log["losses"]))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "passkey at 256 tokens" in card and "seed 0" in card
    model, tok = load_trained("torch", tmp_path / "m")
    assert model.config.max_position_embeddings == 256 and len(tok) == model.config.vocab_size


@pytest.mark.parametrize("max_len", [9, 65, 257])
def test_induction_examples_weight_exactly_the_tokens_a_copy_predicts(max_len):
    from longctx.data.mix import induction
    tok, rng = tiny_tokenizer(), np.random.default_rng(max_len)
    bos = tok.convert_tokens_to_ids(tasks.BOS)
    distances, gaps = set(), set()
    for _ in range(50):
        ids, weights = induction(tok, rng, max_len)
        assert len(ids) == len(weights) <= max_len and ids[0] == bos and bos not in ids[1:]
        n = sum(weights) + 1  # the copy: its first token (unweighted), then the weighted ones
        assert n >= 4 and weights[-(n - 1):] == [1] * (n - 1) and sum(weights[:-(n - 1)]) == 0
        assert ids[1:1 + n] == ids[-n:] and len(ids) - 1 - 2 * n >= 0  # the same ids, after a gap
        distances.add(len(ids) - 1 - n)
        gaps.add(len(ids) - 1 - 2 * n)
    if max_len > 9:  # no fixed offset copies them, and random ids sit between the copies
        assert len(distances) > 1 and len(gaps) > 1 and max(gaps) > 0


@pytest.mark.parametrize("kind", ["repeat", "copy", "passkey", "needle", "kv_recall", "text"])
def test_the_task_mix_weights_out_only_what_no_model_can_predict(kind):
    """A ``repeat``'s first copy (and the copy's first token) and ``copy``'s prompt, with its random
    string, get weight 0; what follows them is predictable by copying and gets 1, as does every
    token of the other kinds. The rows themselves do not depend on the weights."""
    from longctx.data.mix import MIX, batch, example
    tok, rng = tiny_tokenizer(), np.random.default_rng(7)
    for _ in range(6):
        ids, weights = example(tok, rng, 300, {kind: 1.0})
        ones = [i for i, w in zip(ids, weights) if w]
        assert len(ids) == len(weights) and set(weights) <= {0, 1} and weights == sorted(weights)
        if kind == "repeat":
            n = (len(ids) - 1) // 2
            assert ids[1:1 + n] == ids[1 + n:] and len(ones) == n - 1
        elif kind == "copy":
            text = tok.decode(ones)
            assert text.startswith(" ") and text.endswith(".") and len(text) > 5
            assert tok.decode(ids).endswith(" Again:" + text)
        else:
            assert weights == [1] * len(ids)
    rows = batch(tok, np.random.default_rng(5), 3, 256)
    again, weights = batch(tok, np.random.default_rng(5), 3, 256, MIX, weights=True)
    assert np.array_equal(rows, again) and weights.shape == rows.shape and 0.5 < weights.mean() < 1


def test_the_curriculums_first_stage_forms_an_induction_head():
    """The shipped model's shape, trained from a seed on the curriculum's first stage (at half the
    tokens per step, stopping once it copies), must learn to copy held-out random ids seen once
    before: the stage that makes the induction head form. A change to the stage, its data, the loss
    weights or the optimiser that breaks head formation fails here (~4 CPU minutes; seeds 0-2
    formed it between steps 700 and 900 of this size)."""
    from longctx.data.mix import HELDOUT_SEED, batch
    from longctx.models.train import CURRICULUM, copy_score, fit, new_model, schedule
    length, _, mix = CURRICULUM[0]
    model, _, tok = new_model(512, seed=0)
    rows, weights = batch(tok, np.random.default_rng(HELDOUT_SEED), 64, length, mix, weights=True)
    before, after = copy_score(model, rows, weights)[1], []

    def on_step(step, total, loss, copy_loss):
        if step % 100 == 0:
            after.append(copy_score(model, rows, weights)[1])
            return after[-1] > 0.9
    fit(model, tok, [(length, 1400, mix)], 2048, schedule(3e-3, 1400, 1), np.random.default_rng(0), lambda *_: None,
        on_step)
    assert before < 0.05 and after[-1] > 0.9, (before, after)


def test_training_is_deterministic_on_one_machine():
    """The same seed on the same machine gives the same weights, bit for bit (data from
    ``default_rng(seed)``, initialisation from ``mx.random.seed(seed)``, MLX's CPU kernels run the
    same way each time); another seed does not."""
    from mlx.utils import tree_flatten

    from longctx.models.train import train_model

    def weights(seed):
        model, *_ = train_model(steps=3, short_steps=4, batch_size=2, seq_len=256, seed=seed, log=lambda *_: None)
        return {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    a, b, c = weights(3), weights(3), weights(4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
