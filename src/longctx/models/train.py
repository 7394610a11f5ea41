"""Train the small Qwen3 that ships with longctx (``longctx train-tiny``), with MLX on the CPU.

mlx-lm's own ``qwen3.Model`` is trained from a seed on a length curriculum
(``CURRICULUM``, then ``MIX``, ``longctx.data.mix``): rows of 64 tokens of
``induction`` examples whose loss counts only the copied tokens, where an
induction head forms; rows of 256 tokens, half of them those, half the task mix;
then ``seq_len``-token rows. Every row is examples packed back to back, each starting with
``<|endoftext|>``: passkey retrieval (Landmark Attention's format),
needle-in-a-haystack in the shipped text, key-value recall, copying
(``longctx.data.tasks``), repeats and the shipped text, at random lengths,
depths and keys.

It is written in the Hugging Face layout (``config.json``,
``model.safetensors``, the tokenizer, and a model card ``README.md`` with
the loss curve and its scores), so ``mlx_lm.load(path)`` and
``AutoModelForCausalLM.from_pretrained(path)`` read it. A few MB.
"""
from __future__ import annotations

import contextlib
import json
import time
from functools import partial
from pathlib import Path

import numpy as np

from longctx.data import tasks
from longctx.data.mix import MIX, batch, repeat

CONFIG = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=128, intermediate_size=384,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32", hidden_act="silu",
              attention_bias=False, attention_dropout=0.0, initializer_range=0.02, use_cache=True)
# Retrieval is copying from far back: an induction head (a previous-token head, then a head that
# finds the earlier occurrence of the current token and copies what followed). It forms abruptly,
# after a plateau at ln(vocab) where neither half helps without the other. The first stage makes the
# plateau short and the same on every seed (the book's chapter "A trained model to measure on" has
# the measurements): 64-token rows (attention spread over few positions) of `induction` examples (a
# random gap between the two copies, so no positional shortcut copies them) whose loss counts only
# the copied tokens. The second stage carries the head to 256-token distances while the tasks come
# in (long enough for it: 400 steps left a retrained model copying 48 characters 20% of the time,
# 1000 steps 50%); the last trains on `MIX` at `seq_len`.
CURRICULUM = ((64, 4, {"induction": 1.0}),
              (256, 5, {"induction": 0.5, **{kind: share / 2 for kind, share in MIX.items()}}))


COPY_FORMED = 0.5  # held-out copy loss below which the model copies (ln(vocab) = 6.2 before the head forms)


def copy_verdict(copy_loss: float) -> tuple[bool, str]:
    """Whether a model whose final held-out copy loss is ``copy_loss`` can copy, said for a person."""
    if copy_loss < COPY_FORMED:
        return True, (f"the model copies: held-out copy loss {copy_loss:.2f} < {COPY_FORMED} (an induction head "
                      "formed), so retrieval can be measured on it")
    return False, (f"no induction head formed: held-out copy loss {copy_loss:.2f} (>= {COPY_FORMED}; ln(vocab) = 6.2 "
                   "means none at all). The model will not retrieve. Train again with another --seed, or more "
                   "--short-steps; the book's chapter \"A trained model to measure on\" says why this happens")


def plan(short_steps: int, steps: int, seq_len: int) -> list[tuple[int, int, dict]]:
    """The stages ``(row length, steps, mix)``: ``short_steps`` shared over the ``CURRICULUM`` lengths
    below ``seq_len`` by their weights (the remainder to the first), then ``steps`` at ``seq_len``."""
    stages = [(n, w, mix) for n, w, mix in CURRICULUM if n < seq_len]
    total = sum(w for _, w, _ in stages)
    out = [(n, short_steps * w // total, mix) for n, w, mix in stages]
    out[0] = (out[0][0], short_steps - sum(k for _, k, _ in out[1:]), out[0][2])
    return [stage for stage in out if stage[1]] + [(seq_len, steps, MIX)]


def train(path, *, steps: int = 1400, batch_size: int = 8, seq_len: int = 512, short_steps: int = 1800,
          lr: float = 3e-3, seed: int = 0, log=print, on_step=None, attention: str | None = None,
          attention_options: dict | None = None) -> Path:
    """The ``plan``: ``short_steps`` on the curriculum's shorter rows, then ``steps`` on
    ``batch_size`` x ``seq_len`` rows of ``MIX``; every step ``batch_size * seq_len`` tokens. AdamW at
    ``lr`` (50 warm-up steps, constant, then cosine to lr/20 over the last stage). Writes the model
    folder (weights, config, tokenizer, ``train.json``) to ``path``; ``longctx.eval.model_card``
    scores it and writes its card.

    ``attention`` (a technique with an attention class, ``longctx.mlx.nn.technique_attention``) trains
    with it in place of full attention in every layer; ``config.json`` and ``train.json`` record it
    under ``longctx_attention`` (``mlx_lm.load`` alone would run the model with full attention)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from longctx.models.checkpoint import save_tokenizer
    model, config, tokenizer, record = train_model(steps=steps, batch_size=batch_size, seq_len=seq_len,
                                                   short_steps=short_steps, lr=lr, seed=seed, log=log,
                                                   on_step=on_step, attention=attention,
                                                   attention_options=attention_options)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(tokenizer, path)
    (path / "train.json").write_text(json.dumps(record))
    return path


def train_model(*, steps: int = 1400, batch_size: int = 8, seq_len: int = 512, short_steps: int = 1800,
                lr: float = 3e-3, seed: int = 0, log=print, on_step=None, attention: str | None = None,
                attention_options: dict | None = None):
    """``train``'s model, in memory: ``(model, config, tokenizer, record)`` (the record is ``train.json``)."""
    from longctx.checks import check_positive_int
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("short_steps", short_steps)):
        check_positive_int(name, value)
    if seq_len < 256:
        raise ValueError(f"seq_len must be >= 256 (a passkey prompt alone is ~150 tokens), got {seq_len}")
    model, config, tokenizer = new_model(seq_len, seed)
    rng = np.random.default_rng(seed)
    stages = plan(short_steps, steps, seq_len)
    technique = contextlib.nullcontext()
    if attention is not None:
        from longctx.mlx.nn import technique_attention
        from longctx.techniques import attention_kind, bench_options
        attention_options = bench_options(attention_kind(attention).name, attention_options)
        config["longctx_attention"] = {"technique": attention_kind(attention).name, "options": attention_options}
        technique = technique_attention(model, attention, **attention_options)
    with technique:  # (the techniques' tiles are evaluated as they go: no mx.compile around them)
        losses, copy_losses, seconds = fit(model, tokenizer, stages, batch_size * seq_len,
                                           schedule(lr, short_steps, steps), rng, log, on_step,
                                           compile=attention is None)
    record = {"longctx_attention": config.get("longctx_attention"), "steps": steps, "short_steps": short_steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
              "seed": seed, "mix": MIX, "stages": stages, "seconds": round(seconds),
              "losses": [round(x, 4) for x in losses], "copy_losses": [(i, round(x, 4)) for i, x in copy_losses]}
    return model, config, tokenizer, record


def schedule(lr: float, short_steps: int, steps: int):
    """``train``'s learning rate: 50 warm-up steps (fewer when ``short_steps`` is smaller: the
    warm-up ends before the last stage's cosine starts), constant to the last stage, then cosine to
    lr/20 over its ``steps``."""
    import mlx.optimizers as optim
    warmup = min(50, short_steps)
    return optim.join_schedules([optim.linear_schedule(lr / warmup, lr, warmup), lambda _: lr,
                                 optim.cosine_decay(lr, steps, lr / 20)], [warmup, short_steps])


def copy_score(model, rows: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """The loss and the greedy accuracy of ``model`` on the weighted tokens of ``rows`` (``batch``'s
    rows and weights; on ``induction`` rows: held-out copying)."""
    import mlx.core as mx
    import mlx.nn as nn
    logits, targets, w = model(mx.array(rows[:, :-1])), mx.array(rows[:, 1:]), mx.array(weights[:, 1:])
    loss = (nn.losses.cross_entropy(logits, targets) * w).sum() / w.sum()
    accuracy = ((mx.argmax(logits, axis=-1) == targets) * w).sum() / w.sum()
    return float(loss), float(accuracy)


def new_model(seq_len: int, seed: int):
    """mlx-lm's ``qwen3.Model`` of ``CONFIG``, initialised from ``mx.random.seed(seed)``, for the
    tiny tokenizer: ``(model, config, tokenizer)``."""
    import mlx.core as mx
    from mlx_lm.models.qwen3 import Model, ModelArgs

    from longctx.models.checkpoint import tiny_tokenizer
    tokenizer = tiny_tokenizer()
    bos, eos = tokenizer.convert_tokens_to_ids(tasks.BOS), tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = {**CONFIG, "vocab_size": len(tokenizer), "max_position_embeddings": seq_len,
              "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": bos}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model, config, tokenizer


def fit(model, tokenizer, stages, tokens_per_step: int, schedule, rng: np.random.Generator, log=print,
        on_step=None, compile: bool = True):
    """Train ``model`` in place on ``stages`` (``(row length, steps, mix)``), every step
    ``tokens_per_step`` tokens, AdamW on ``schedule``, gradients clipped at 1; the loss is the mean
    cross-entropy over the tokens that ``batch`` weights (all but the unpredictable first copies of
    ``induction`` and ``repeat`` examples and ``copy``'s prompts). Every 50 steps (and at the end)
    the loss on the second half of held-out repeats: ~ln(vocab) until an induction head forms.
    ``on_step(step, total, loss, copy loss)`` after every step (a progress bar); training stops
    early when it returns something true. ``compile``: the step under ``mx.compile`` (not with a
    technique's attention, whose tiles are evaluated as they go). Returns ``(losses, [(step, copy
    loss)], seconds)``."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, rows, weights):
        losses = nn.losses.cross_entropy(model(rows[:, :-1]), rows[:, 1:]) * weights[:, 1:]
        return losses.sum() / weights[:, 1:].sum()

    step_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(rows, weights):
        loss, grads = step_fn(model, rows, weights)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss
    if compile:
        step = partial(mx.compile, inputs=state, outputs=state)(step)

    probe = mx.array([repeat(tokenizer, np.random.default_rng(10_000 + r), 100) for r in range(8)])

    def copy_loss() -> float:
        """Cross-entropy on the second half of held-out repeats: ~ln(vocab) until an induction head forms."""
        logits = model(probe[:, :-1])[:, 101:]
        return float(nn.losses.cross_entropy(logits, probe[:, 102:], reduction="mean"))

    total = sum(count for _, count, _ in stages)
    losses, copy_losses, start = [], [], time.perf_counter()
    for length, count, mix in stages:
        for _ in range(count):
            i = len(losses)
            rows, weights = batch(tokenizer, rng, max(1, tokens_per_step // length), length, mix, weights=True)
            loss = step(mx.array(rows), mx.array(weights))
            mx.eval(state)
            losses.append(float(loss))
            if i % 50 == 0 or i == total - 1:
                copy_losses.append((i, copy_loss()))
                log(f"step {i:5d}  rows of {length:4d}  loss {np.mean(losses[-50:]):.3f}  "
                    f"copy loss {copy_losses[-1][1]:.3f}  {time.perf_counter() - start:6.0f} s")
            if on_step is not None and on_step(i + 1, total, float(np.mean(losses[-50:])), copy_losses[-1][1]):
                return losses, copy_losses, time.perf_counter() - start
    return losses, copy_losses, time.perf_counter() - start


def finetune(base, path, rope_scaling: dict | None = None, *, seq_len: int, steps: int = 200, batch_size: int = 2,
             lr: float = 5e-4, seed: int = 0, log=print, on_step=None, attention: str | None = None,
             attention_options: dict | None = None, max_seconds: float | None = None) -> Path:
    """Continue training the model in ``base`` at ``seq_len``: ``steps`` steps of ``batch_size`` x
    ``seq_len`` tokens of ``MIX``, AdamW at ``lr`` (20 warm-up steps, then cosine to lr/10).

    ``rope_scaling``: position extension's short fine-tune (PI's 1000 steps, LongRoPE's 400,
    scaled to this model), with ``longctx.mlx.ScaledRoPE`` in every layer at length ``seq_len``
    (the factors of inference at this length: LongRoPE's long ones). ``attention``: long-context
    training with a technique in place of full attention (``technique_attention``, uncompiled);
    ``max_seconds`` stops at that wall time (equal-time comparisons). Writes the weights and
    ``finetune.json`` (losses, the wall time at every step, tokens/s, peak memory) to ``path``; the
    rest of the model folder is the caller's (``longctx extend``, ``longctx train-tiny --from``)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from longctx.checks import check_positive_int
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        check_positive_int(name, value)
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a number of seconds > 0, got {max_seconds!r}")
    model, tokenizer = load(str(base))
    if rope_scaling is not None:
        from longctx.mlx.rope_scaling import ScaledRoPE, model_rope
        head_dim, theta, _, _ = model_rope(model)
        rope = ScaledRoPE(head_dim, theta, rope_scaling)
        rope.seq_len = seq_len
        for layer in model.layers:
            layer.self_attn.rope = rope
    technique, record = contextlib.nullcontext(), {}
    if attention is not None:
        from longctx.mlx.nn import technique_attention
        from longctx.techniques import attention_kind, bench_options
        attention_options = bench_options(attention_kind(attention).name, attention_options)
        record["longctx_attention"] = {"technique": attention_kind(attention).name, "options": attention_options}
        technique = technique_attention(model, attention, **attention_options)
    mx.random.seed(seed)
    warmup = min(20, steps)
    schedule = optim.join_schedules([optim.linear_schedule(lr / warmup, lr, warmup),
                                     optim.cosine_decay(lr, max(1, steps - warmup), lr / 10)], [warmup])
    times, start = [], time.perf_counter()

    def timed(step, total, loss, copy):  # the wall time of every step; stop at max_seconds
        times.append(round(time.perf_counter() - start, 3))
        stop = on_step(step, total, loss, copy) if on_step is not None else False
        return stop or (max_seconds is not None and times[-1] >= max_seconds)
    mx.reset_peak_memory()
    with technique:
        losses, copy_losses, seconds = fit(model, tokenizer, [(seq_len, steps, MIX)], batch_size * seq_len, schedule,
                                           np.random.default_rng(seed), log, timed, compile=attention is None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    (path / "finetune.json").write_text(json.dumps({
        "base": str(base), "rope_scaling": rope_scaling, **record, "seq_len": seq_len, "steps": len(losses),
        "planned_steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(seconds),
        "max_seconds": max_seconds, "tokens_per_second": round(len(losses) * batch_size * seq_len / seconds),
        "peak_memory_mb": round(mx.get_peak_memory() / 2 ** 20), "times": times,
        "losses": [round(x, 4) for x in losses], "copy_losses": [(i, round(x, 4)) for i, x in copy_losses]}))
    return path


def heldout_loss(model, tokenizer, length: int, rows: int = 8, seed: int = 0) -> float:
    """The training loss (cross-entropy over the tokens ``batch`` weights) on ``rows`` held-out rows
    of ``MIX`` of ``length`` tokens (drawn from ``HELDOUT_SEED + seed``): the same rows for every
    model, so runs that saw different batches compare. Call it under ``technique_attention`` to
    score a model as it was trained."""
    import mlx.core as mx
    import mlx.nn as nn

    from longctx.data.mix import HELDOUT_SEED
    ids, weights = batch(tokenizer, np.random.default_rng(HELDOUT_SEED + seed), rows, length, MIX, weights=True)
    total = 0.0
    for row, w in zip(ids, weights):  # one row at a time: the memory of one forward pass
        losses = nn.losses.cross_entropy(model(mx.array(row[None, :-1])), mx.array(row[None, 1:]))
        total += float((losses * mx.array(w[None, 1:])).sum())
    return total / float(weights[:, 1:].sum())


def train_with_attention(base, path, attention: str, attention_options: dict | None = None, *, seq_len: int,
                         steps: int, batch_size: int = 2, seed: int = 0, max_seconds: float | None = None,
                         log=print, on_step=None) -> Path:
    """Long-context training of an existing model (the shipped one, say) with a technique in every
    layer (``longctx train-tiny --from MODEL --attention TECHNIQUE``): ``finetune`` at ``seq_len``.
    Writes a whole model folder (``config.json`` records ``longctx_attention``; no model card:
    ``mlx_lm.load`` alone runs full attention); ``longctx.eval.technique_passkey`` then asks it
    for passkeys."""
    import shutil

    path, base = Path(path), Path(base)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} exists and is not empty: give a new folder (nothing is overwritten)")
    staging = path.with_name(path.name + ".partial")  # nothing half-written under `path`
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base, staging, ignore=shutil.ignore_patterns("README.md", "*.png", "train.json", "finetune.json",
                                                                 "extend.json", "model.safetensors"))
    finetune(base, staging, seq_len=seq_len, steps=steps, batch_size=batch_size, seed=seed, log=log, on_step=on_step,
             attention=attention, attention_options=attention_options, max_seconds=max_seconds)
    record = json.loads((staging / "finetune.json").read_text())
    config = json.loads((base / "config.json").read_text())
    config["longctx_attention"] = record["longctx_attention"]
    config["max_position_embeddings"] = max(seq_len, config.get("max_position_embeddings", 0))
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    if path.exists():
        path.rmdir()  # empty, checked above
    staging.rename(path)
    return path
