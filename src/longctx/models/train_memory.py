"""``longctx train-memory BASE OUT``: Focused Transformer's crossbatch fine-tune of memory layers (Task 10).

The batch is ``docs`` documents of ``windows`` consecutive windows of
``context_length`` tokens, laid out ``[doc1 w1, doc1 w2, .., doc2 w1, ..]`` as
FoT's ``cross_batch_attention`` expects. Every layer runs each window as its
own local context (RoPE at 0 .. C-1); in a memory layer, entry ``i`` also
attends in the same softmax to the un-rotated keys and the values of entries
``i - 1 .. i - extra_contexts`` (``crossbatch_attention``): the earlier windows
of its own document (positives) and, for its first windows, the last windows
of the previous document (negatives). Only the memory layers train; the loss is
next-token cross-entropy over every window.

Documents are passkey prompts (Landmark Attention's format) and magic-number
needles in the shipped text, with the answer, the key at a random depth, so it
is in an earlier window most of the time: to answer, the layer must find it in
the memory among windows of distracting filler. Each step's documents are drawn
from ``default_rng((seed, step))``: a resumed run sees exactly the data the
uninterrupted one would.

Writes a model folder (the base's, with the new weights), ``memory.json`` (the
options ``LongContextQwen3(model, "memory", **options)`` takes) and
``train_memory.json`` (the arguments and the losses). It trains in
``OUT.partial`` and checkpoints there every ``save_every`` steps; running the
same command again resumes from the last checkpoint.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from longctx.checks import check_nonnegative_int, check_positive_int
from longctx.data import tasks
from longctx.techniques.memory import check_memory_layers

MEMORY_MIX = {"passkey": 0.7, "needle": 0.3}


def document(tokenizer, rng: np.random.Generator, length: int) -> list[int]:
    """``length`` tokens: a passkey or needle prompt with its answer, the key at a random depth."""
    answer_room = 8
    kind = rng.choice(list(MEMORY_MIX), p=list(MEMORY_MIX.values()))
    key = int(rng.integers(10_000, 100_000))
    if kind == "passkey":
        p = tasks.passkey(tokenizer, length - answer_room, float(rng.random()), key)
    else:
        p = tasks.needle(tokenizer, length - answer_room, float(rng.random()), key, start=int(rng.integers(1000)))
    tail = list(tasks._encode(tokenizer, " " + p.answer + "."))
    ids = p.ids + tail
    return (ids + tasks.text(tokenizer, length, start=int(rng.integers(1000))))[:length]


def crossbatch_rows(tokenizer, rng: np.random.Generator, docs: int, windows: int, context_length: int):
    """``(docs * windows, context_length + 1)`` rows: each document's windows in order, each row
    one window and the token after it (the last window's target comes from the document's end)."""
    C = context_length
    rows = []
    for _ in range(docs):
        ids = document(tokenizer, rng, windows * C + 1)
        rows += [ids[w * C:(w + 1) * C + 1] for w in range(windows)]
    return np.array(rows, dtype=np.int32)


class CrossBatch:
    """A memory layer's stand-in for a cache while training: ``offset`` 0 (every window is a local
    context from position 0), nothing stored, and ``attend`` = ``crossbatch_attention``."""

    def __init__(self, rope, extra_contexts: int):
        self.rope, self.extra_contexts, self.offset = rope, extra_contexts, 0

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return "causal" if N > 1 else None

    def attend(self, queries, keys, values, scale, mask):
        from longctx.mlx.memory import crossbatch_attention
        from longctx.mlx.streaming import unrotate
        return crossbatch_attention(queries, keys, values, unrotate(self.rope, keys, 0), self.extra_contexts,
                                    scale=scale)


def train_memory(base, out, *, memory_layers=None, steps: int = 300, docs: int = 2, windows: int = 4,
                 extra_contexts: int = 3, context_length: int | None = None, last_context_length: int = 256,
                 lr: float = 1e-3, seed: int = 0, save_every: int = 50, stop_after: int | None = None, log=print,
                 progress: bool = True) -> Path:
    """Fine-tune ``memory_layers`` of the model at ``base`` with crossbatch; write the folder ``out``.
    ``stop_after``: stop at that step with a checkpoint in ``out.partial`` (the next call resumes);
    returns the staging folder then."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load

    from longctx.mlx.qwen3_long import LongContextQwen3
    steps, docs, windows = (check_positive_int(n, v) for n, v in (("steps", steps), ("docs", docs),
                                                                   ("windows", windows)))
    extra_contexts = check_nonnegative_int("extra_contexts", extra_contexts)
    save_every = check_positive_int("save_every", save_every)
    base, out = Path(base), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out must be a new or empty folder, got {str(out)!r}, which holds files (nothing is "
                         "overwritten)")
    model, tokenizer = load(str(base))
    layers = check_memory_layers(memory_layers, len(model.layers))
    C = check_positive_int("context_length", context_length or model.args.max_position_embeddings)
    options = {"memory_layers": list(layers), "context_length": C, "last_context_length": last_context_length,
               "top_k": None, "memory_size": 65536}
    wrapper = LongContextQwen3(model, "memory", **options)  # checks the options against the model
    args = {"base": str(base), "memory_layers": list(layers), "steps": steps, "docs": docs, "windows": windows,
            "extra_contexts": extra_contexts, "context_length": C, "lr": lr, "seed": seed}
    staging = out.with_name(out.name + ".partial")
    state_file = staging / "progress.json"
    resumed = state_file.exists() and json.loads(state_file.read_text())["args"] == args
    if not resumed:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(base, staging, ignore=shutil.ignore_patterns("README.md", "*.png", "train.json",
                                                                     "finetune.json", "extend.json"))
    model.freeze()
    for i in layers:
        model.layers[i].unfreeze()
    warmup = min(20, steps)
    schedule = optim.join_schedules([optim.linear_schedule(lr / warmup, lr, warmup),
                                     optim.cosine_decay(lr, max(1, steps - warmup), lr / 10)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0)
    losses, start_step, seconds = [], 0, 0.0
    if resumed:
        record = json.loads(state_file.read_text())
        start_step, losses, seconds = record["step"], record["losses"], record["seconds"]
        model.load_weights(str(staging / "model.safetensors"), strict=False)
        optimizer.init(model.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(staging / "optimizer.safetensors")).items()))
        log(f"resuming from step {start_step} of {steps}")
    caches = [CrossBatch(model.layers[i].self_attn.rope, extra_contexts) if i in layers else None
              for i in range(len(model.layers))]

    def loss_fn(model, rows):
        logits = model(rows[:, :-1], cache=caches)
        return nn.losses.cross_entropy(logits, rows[:, 1:], reduction="mean")

    step_fn = nn.value_and_grad(model, loss_fn)

    def save(step: int) -> None:
        mx.save_safetensors(str(staging / "model.safetensors"), dict(tree_flatten(model.parameters())),
                            metadata={"format": "pt"})
        mx.save_safetensors(str(staging / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        state_file.write_text(json.dumps({"args": args, "step": step, "losses": losses, "seconds": seconds}))

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    columns = (TextColumn("crossbatch"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=steps, completed=start_step, loss=float("nan"))
        for step in range(start_step, steps):
            if stop_after is not None and step >= stop_after:
                save(step)
                return staging
            t0 = time.perf_counter()
            rows = mx.array(crossbatch_rows(tokenizer, np.random.default_rng((seed, step)), docs, windows, C))
            with wrapper._attention_seam():
                loss, grads = step_fn(model, rows)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss)
            losses.append(round(float(loss), 4))
            seconds += time.perf_counter() - t0
            bar.update(task, advance=1, loss=float(np.mean(losses[-20:])))
            if not progress and (step % 50 == 0 or step == steps - 1):
                log(f"step {step:4d}  loss {np.mean(losses[-50:]):.3f}  {seconds:6.0f} s")
            if (step + 1) % save_every == 0 or step == steps - 1:
                save(step + 1)
    (staging / "memory.json").write_text(json.dumps(options, indent=1))
    (staging / "train_memory.json").write_text(json.dumps({**args, "seconds": round(seconds), "losses": losses}))
    for name in ("optimizer.safetensors", "progress.json"):
        (staging / name).unlink()
    if out.exists():
        out.rmdir()  # empty, checked above
    staging.rename(out)
    return out


def memory_options(path) -> dict | None:
    """The ``memory.json`` of a ``train-memory`` folder (``LongContextQwen3``'s options), or None."""
    file = Path(path) / "memory.json"
    return json.loads(file.read_text()) if file.exists() else None
