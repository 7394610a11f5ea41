"""The evaluation suite (``longctx eval``): does a long-context strategy keep what matters?

Every function takes a ``LongContextQwen3`` (``longctx.mlx`` over an mlx-lm
model, e.g. ``mlx_lm.load(path)``, or ``longctx.torch`` over transformers)
and its tokenizer, so any strategy of any Qwen3 folder is evaluated the same
way. Prompts come from ``longctx.data.tasks``; answers are greedy.

* ``passkey_accuracy``: Landmark Attention's passkey retrieval.
* ``needle_grid``: needle-in-a-haystack accuracy over depth x length (a heatmap).
* ``perplexity_by_position``: mean negative log-likelihood of the shipped
  text, bucketed by position (where windowed attention loses its sinks).
* ``copy_accuracy``: repeat a random string.
* ``lost_in_the_middle``: key-value recall accuracy by the asked pair's
  position (Liu et al. 2023, "Lost in the Middle").
* ``extension_table``: Task 9, position extension: passkey, needle and
  held-out perplexity from 1x to 8x the training length for no scaling, PI,
  NTK, YaRN and Llama 3 (each at 4x), and for extended model folders
  (``longctx extend``: LongRoPE searched, fine-tuned).
* ``WholeRows``: greedy decoding for a model trained with a technique in its
  layers (``longctx train-tiny --attention``), which have no cache;
  ``technique_passkey`` asks such a model for passkeys.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longctx.checks import check_positive_int
from longctx.data import tasks
from longctx.data.tasks import greedy_answer
from longctx.techniques import TECHNIQUES
from longctx.techniques.compressed import COMPRESSION_METHODS


class WholeRows:
    """``generate(ids, n)`` for an mlx-lm model run under ``technique_attention(model, technique,
    **options)``: greedy decoding that runs the whole row again for every new token (the
    techniques' layers have no cache; fine for a tiny model and a few answer tokens). Takes the
    place of a ``LongContextQwen3`` in ``passkey_accuracy`` and the other greedy tasks."""

    def __init__(self, model, technique: str, options: dict | None = None):
        self.model, self.technique, self.options = model, technique, dict(options or {})

    @classmethod
    def load(cls, path):
        """The model folder written by ``train-tiny --attention``, run as it was trained."""
        from mlx_lm import load
        recorded = json.loads((Path(path) / "config.json").read_text()).get("longctx_attention")
        if not recorded:
            raise ValueError(f"{path} was not trained with a technique (no longctx_attention in its config.json)")
        model, tokenizer = load(str(path))
        return cls(model, recorded["technique"], recorded["options"]), tokenizer

    def generate(self, ids, max_new_tokens: int):
        import mlx.core as mx

        from longctx.mlx.nn import technique_attention
        ids = list(ids)
        with technique_attention(self.model, self.technique, **self.options):
            for _ in range(check_positive_int("max_new_tokens", max_new_tokens)):
                ids.append(int(mx.argmax(self.model(mx.array([ids]))[0, -1])))
                yield ids[-1]


def technique_passkey(path, *, trials: int = 2, seed: int = 0, log=print) -> dict:
    """Passkey retrieval of a model trained with a technique (``train-tiny --from --attention``) at
    its training length and twice it, greedy under the technique (``WholeRows``): written into its
    ``finetune.json`` under ``passkey`` and returned."""
    runner, tokenizer = WholeRows.load(path)
    record = json.loads((Path(path) / "finetune.json").read_text())
    record["passkey"] = {}
    for length in (record["seq_len"], 2 * record["seq_len"]):
        record["passkey"][str(length)] = passkey_accuracy(runner, tokenizer, length, trials=trials, seed=seed)
        log(f"passkey at {length} tokens: {record['passkey'][str(length)]:.0%}")
    (Path(path) / "finetune.json").write_text(json.dumps(record))
    return record["passkey"]


def _fractions(name: str, values) -> list[float]:
    values = [float(d) for d in values]
    if not values or any(not 0 <= d <= 1 for d in values):
        raise ValueError(f"{name} must be a non-empty list of numbers in [0, 1], got {values!r}")
    return values


def passkey_accuracy(long_model, tokenizer, length: int, *, depths=(0.1, 0.3, 0.5, 0.7, 0.9), trials: int = 2,
                     seed: int = 0) -> float:
    """Fraction of passkeys retrieved from prompts of ``length`` tokens, ``trials`` per depth."""
    rng = np.random.default_rng(seed)
    prompts = [tasks.passkey(tokenizer, length, d, int(rng.integers(10_000, 100_000)))
               for d in _fractions("depths", depths) for _ in range(check_positive_int("trials", trials))]
    return float(np.mean([p.score(greedy_answer(long_model, tokenizer, p)) for p in prompts]))


def needle_grid(long_model, tokenizer, lengths, depths=(0.0, 0.25, 0.5, 0.75, 1.0), *, trials: int = 2,
                seed: int = 0) -> np.ndarray:
    """Needle accuracy, ``(len(depths), len(lengths))``: the magic number at each depth of the text."""
    rng = np.random.default_rng(seed)
    depths = _fractions("depths", depths)
    grid = np.zeros((len(depths), len(lengths)))
    for j, length in enumerate(lengths):
        for i, d in enumerate(depths):
            for _ in range(check_positive_int("trials", trials)):
                p = tasks.needle(tokenizer, length, d, int(rng.integers(10_000, 100_000)),
                                 start=int(rng.integers(1000)))
                grid[i, j] += p.score(greedy_answer(long_model, tokenizer, p)) / trials
    return grid


def token_nll(long_model, ids: list[int]) -> np.ndarray:
    """``-log p(ids[t] | ids[:t])`` for t = 1 .. L-1 through the strategy's ``process_long_sequence``."""
    logits = _numpy(long_model.process_long_sequence(ids))[0, :-1].astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return log_z - logits[np.arange(len(ids) - 1), ids[1:]]


def perplexity_by_position(long_model, tokenizer, length: int, *, bucket: int = 128, start: int = 0):
    """``(bucket_starts, mean NLL per bucket)`` over ``length`` tokens of the shipped text."""
    nll = token_nll(long_model, tasks.text(tokenizer, length, start=start))
    starts = np.arange(1, length, check_positive_int("bucket", bucket))
    return starts, np.array([nll[s - 1:s - 1 + bucket].mean() for s in starts])


def copy_accuracy(long_model, tokenizer, chars: int, *, trials: int = 10, seed: int = 0) -> float:
    """Fraction of random ``chars``-character strings repeated exactly."""
    rng = np.random.default_rng(seed)
    prompts = [tasks.copy(tokenizer, chars, rng) for _ in range(check_positive_int("trials", trials))]
    return float(np.mean([p.score(greedy_answer(long_model, tokenizer, p)) for p in prompts]))


def lost_in_the_middle(long_model, tokenizer, pairs: int, positions=None, *, trials: int = 10,
                       seed: int = 0) -> tuple[list[int], np.ndarray]:
    """Key-value recall accuracy with the asked pair at each of ``positions`` (default: 5 spread
    from first to last) among ``pairs`` lines: ``(positions, accuracy per position)``."""
    pairs = check_positive_int("pairs", pairs)
    positions = list(positions) if positions is not None else sorted({round(f * (pairs - 1))
                                                                      for f in (0, 0.25, 0.5, 0.75, 1)})
    rng = np.random.default_rng(seed)
    accuracy = np.zeros(len(positions))
    for i, asked in enumerate(positions):
        for _ in range(check_positive_int("trials", trials)):
            p = tasks.kv_recall(tokenizer, pairs, asked, rng)
            accuracy[i] += p.score(greedy_answer(long_model, tokenizer, p)) / trials
    return positions, accuracy


def heldout_nll_by_position(long_model, rows) -> np.ndarray:
    """Mean ``-log p`` per position over held-out token ``rows`` (each through ``process_long_sequence``)."""
    return np.mean([token_nll(long_model, [int(t) for t in row]) for row in rows], axis=0)


def extension_rows(path, backend: str, factor: float = 4.0, compare=()) -> tuple[int, dict]:
    """``(T0, {row name: (model path, rope_scaling)})`` for Task 9's table: the base model (``path``,
    or the base an extended folder was made from) with no scaling and each formula at ``factor``,
    then ``path`` itself when it is extended, and each folder of ``compare``."""
    import json
    from pathlib import Path

    from longctx.techniques.rope import FORMULAS, rope_scaling_for, rope_scaling_from_config

    def read(folder):
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        scaling = rope_scaling_from_config(config)
        meta = json.loads((folder / "extend.json").read_text()) if (folder / "extend.json").exists() else {}
        if (folder / "finetune.json").exists():  # `extend --finetune-steps` or `train-tiny --from` into the folder
            meta["finetune"] = json.loads((folder / "finetune.json").read_text())
        return folder, config, scaling, meta

    folder, config, scaling, meta = read(path)
    extended = [read(f) for f in ([folder] if scaling["rope_type"] != "default" else []) + list(compare)]
    base = Path(meta.get("base", folder)) if scaling["rope_type"] != "default" else folder
    T0 = scaling.get("original_max_position_embeddings") or config["max_position_embeddings"]
    rows = {"none": (base, None)}
    rows.update({f"{m} x{factor:g}": (base, rope_scaling_for(m, factor, T0)) for m in FORMULAS})
    for f, c, s, m in extended:
        label = s["rope_type"] + (" searched" if "search" in m else "") + (
            f" + fine-tune {m['finetune']['steps']} steps" if "finetune" in m else "")
        rows[f"{label} ({f.name})"] = (f, s)
    return T0, rows


def extension_table(path, backend: str = "mlx", *, compare=(), trials: int = 2, lengths=None, depths: int = 10,
                    console=None) -> dict:
    """Task 9's table for the model at ``path``: for each of ``extension_rows``, passkey and needle
    accuracy at each of ``lengths`` (lists; default ``T0 .. 8 T0``; ``depths`` depths x ``trials``), held-out
    perplexity at ``min(4 T0, max(lengths))``, and the held-out negative log-likelihood by position
    at ``max(lengths)`` (rows of the training mix that training never drew:
    ``longctx.data.mix.heldout_rows``)."""
    from longctx.data.mix import heldout_rows
    from longctx.models import load_trained
    T0, rows = extension_rows(path, backend, compare=compare)
    lengths = list(lengths or [T0, 2 * T0, 4 * T0, 8 * T0])
    ppl_length = min(4 * T0, max(lengths))
    wrapper, models = _wrapper(backend), {}
    out = {"training_length": T0, "lengths": lengths, "ppl_length": ppl_length, "rows": {}}
    where = [(d + 0.5) / depths for d in range(check_positive_int("depths", depths))]
    for name, (folder, scaling) in rows.items():
        if folder not in models:
            models[folder] = load_trained(backend, folder)
        model, tokenizer = models[folder]
        long = wrapper(model, "full", rope_scaling=scaling, chunk_size=max(lengths))
        if console is not None:
            console.print(f"  position extension: {name}")
        ppl_rows = heldout_rows(tokenizer, ppl_length, 4, seed=100)
        out["rows"][name] = {
            "rope_scaling": scaling,
            "passkey": [passkey_accuracy(long, tokenizer, L, depths=where, trials=trials, seed=L) for L in lengths],
            "needle": [float(needle_grid(long, tokenizer, [L], where, trials=max(1, trials // 2), seed=L).mean())
                       for L in lengths],
            "perplexity": float(np.exp(np.mean([token_nll(long, [int(t) for t in r]).mean() for r in ppl_rows]))),
            "nll_by_position": np.round(heldout_nll_by_position(long, heldout_rows(tokenizer, max(lengths), 2,
                                                                                  seed=200)), 4).tolist()}
    return out


def _measured(fn, backend: str):
    """``(fn(), seconds, peak bytes)``; the peak is MLX's (or CUDA's) allocator high-water mark, None on a torch CPU."""
    import time
    if backend == "mlx":
        import mlx.core as mx
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
    else:
        import torch
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    if backend == "mlx":
        peak = max(0, mx.get_peak_memory() - before)
    else:
        peak = torch.cuda.max_memory_allocated() if cuda else None
    return value, seconds, peak


def memory_rows(path, memory_model=None) -> dict:
    """``{row name: (model folder, strategy, options)}`` for Task 10's table: full attention, a
    sliding window of the training length, and the memory layer (off, dense, top-k 128 and 32) on
    the model at ``path``; the same memory rows on ``memory_model`` (a ``longctx train-memory``
    folder, with its ``memory.json``; ``path`` itself when it has one)."""
    import json
    from pathlib import Path

    from longctx.models.train_memory import memory_options
    path = Path(path)
    T = json.loads((path / "config.json").read_text())["max_position_embeddings"]
    rows = {"full": (path, "full", {}), f"sliding {T}": (path, "sliding", {"window_size": T})}
    trained = memory_model or (path if memory_options(path) else None)
    for label, folder in (("no fine-tune", path if memory_options(path) is None else None),
                          ("crossbatch", trained)):
        if folder is None:
            continue
        o = {k: v for k, v in (memory_options(folder) or {}).items() if k != "top_k"}
        rows[f"memory off, {label}"] = (Path(folder), "memory", {**o, "memory_size": 0})
        rows[f"memory dense, {label}"] = (Path(folder), "memory", o)
        for k in (128, 32):
            rows[f"memory top_k={k}, {label}"] = (Path(folder), "memory", {**o, "top_k": k})
    return rows


def memory_table(path, backend: str = "mlx", *, memory_model=None, lengths=None, depths: int = 5, trials: int = 1,
                 console=None) -> dict:
    """Task 10's table: for each of ``memory_rows``, passkey and needle accuracy at each of
    ``lengths`` (default 2, 4, 8 and 16 times the training length T; ``depths`` depths x
    ``trials``), with the time per token of the passkey prompts and the peak memory, every row in
    this one process."""
    import json
    from pathlib import Path

    from longctx.models import load_trained
    T = json.loads((Path(path) / "config.json").read_text())["max_position_embeddings"]
    lengths = list(lengths or [2 * T, 4 * T, 8 * T, 16 * T])
    where = [(d + 0.5) / depths for d in range(check_positive_int("depths", depths))]
    wrapper, models = _wrapper(backend), {}
    out = {"training_length": T, "lengths": lengths, "depths": where, "trials": trials, "rows": {}}
    for name, (folder, strategy, options) in memory_rows(path, memory_model).items():
        if folder not in models:
            models[folder] = load_trained(backend, folder)
        model, tokenizer = models[folder]
        if console is not None:
            console.print(f"  memory layers: {name}")
        row = out["rows"][name] = {"strategy": strategy, "options": options, "model": str(folder), "passkey": [],
                                   "needle": [], "ms_per_token": [], "peak_mib": []}
        for L in lengths:
            long = wrapper(model, strategy, **options)
            accuracy, seconds, peak = _measured(
                lambda: passkey_accuracy(long, tokenizer, L, depths=where, trials=trials, seed=L), backend)
            row["passkey"].append(accuracy)
            row["ms_per_token"].append(round(1e3 * seconds / (L * len(where) * trials), 4))
            row["peak_mib"].append(None if peak is None else round(peak / 2**20, 1))
            row["needle"].append(float(needle_grid(long, tokenizer, [L], where, trials=trials, seed=L).mean()))
    return out


def memory_plot(table: dict, path) -> None:
    """Task 10's figure: passkey accuracy and time per token against length, one line per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    for name, row in table["rows"].items():
        style = "--" if "crossbatch" not in name else "-"
        ax1.plot(table["lengths"], row["passkey"], style, marker="o", label=name)
        ax2.plot(table["lengths"], row["ms_per_token"], style, marker="o", label=name)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(table["lengths"], table["lengths"])
        ax.set_xlabel(f"prompt length (tokens; the model's context is {table['training_length']})")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_ylabel("passkey accuracy")
    ax1.set_title("retrieval beyond the context")
    ax2.set_ylabel("ms per prompt token")
    ax2.set_title("cost")
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the suite (`longctx eval`)

def run_suite(path, out, console, *, backend: str = "mlx", quick: bool = False, window: int = 128,
              compare=(), memory_model=None) -> dict:
    """Every experiment on the model at ``path``, each strategy through ``LongContextQwen3``:
    a table, ``eval.json`` and one PNG per experiment in ``out``. Lengths are set from the
    model's training length ``T`` (``max_position_embeddings``, at most 512 here on a CPU)."""
    import json

    from longctx.models import load_trained
    model, tokenizer = load_trained(backend, path)
    wrapper = _wrapper(backend)
    config = model.args if backend == "mlx" else model.config
    T = min(512, getattr(config, "max_position_embeddings", 512))
    trials = 1 if quick else 4
    strategies = {name: t.evaluate(window) for name, t in TECHNIQUES.items()
                  if t.strategy is not None and t.evaluate is not None}
    lengths = [T // 2, T] if quick else [T // 2, T, 2 * T, 4 * T]
    results = {"model": str(path), "backend": backend, "training_length": T, "window": window, "trials": trials}

    def long(strategy, **options):
        return wrapper(model, strategy, **{**strategies.get(strategy, {}), **options})

    console.print(f"evaluating {path} ({backend}), training length {T}, window {window}")
    results["passkey"] = {s: {L: passkey_accuracy(long(s), tokenizer, L, trials=trials) for L in lengths}
                          for s in strategies}
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    grid_lengths = sorted({*lengths, T // 8, 3 * T // 4, 3 * T // 2})
    results["needle"] = {s: needle_grid(long(s), tokenizer, grid_lengths, depths, trials=trials).tolist()
                         for s in ("full", "sliding")}
    results["needle_lengths"], results["needle_depths"] = grid_lengths, depths  # the grid's rows and columns
    ppl_length = 2 * T if quick else 4 * T
    ppl = {"full": long("full"), "sliding (window, no sinks)": long("sliding"),
           "streaming, 0 sinks": long("streaming", sink_tokens=0), "streaming, 4 sinks": long("streaming")}
    results["perplexity"] = {}
    for name, m in ppl.items():
        starts, nll = perplexity_by_position(m, tokenizer, ppl_length, bucket=T // 8)
        results["perplexity"][name] = {"starts": starts.tolist(), "nll": nll.tolist()}
    results["copy"] = {s: {c: copy_accuracy(long(s), tokenizer, c, trials=3 * trials) for c in (16, 48)}
                       for s in strategies}
    pairs = 40
    positions, acc = lost_in_the_middle(long("full"), tokenizer, pairs, trials=5 * trials)
    results["lost_in_the_middle"] = {"pairs": pairs, "positions": positions, "accuracy": acc.tolist()}
    ratios = [0.5, 0.75, 0.9]
    results["compression"] = {method: {r: passkey_accuracy(long("compressed", method=method, compression_ratio=r),
                                                           tokenizer, T, trials=trials) for r in ratios}
                              for method in COMPRESSION_METHODS}
    results["extension"] = extension_table(path, backend, compare=compare, trials=1 if quick else 2,
                                           lengths=[T, 2 * T] if quick else None, depths=3 if quick else 10,
                                           console=console)
    results["memory"] = memory_table(path, backend, memory_model=memory_model, lengths=[2 * T] if quick else None,
                                     depths=2 if quick else 5, console=console)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    _plots(results, depths, grid_lengths, out)
    _table(results, console)
    console.print(f"wrote {out / 'eval.json'} and eval-*.png")
    return results


def _wrapper(backend: str):
    if backend == "mlx":
        from longctx.mlx import LongContextQwen3
    else:
        from longctx.torch import LongContextQwen3
    return LongContextQwen3


def _table(results: dict, console) -> None:
    from rich.table import Table
    table = Table(title=f"passkey accuracy (training length {results['training_length']}, "
                        f"window {results['window']})")
    lengths = list(next(iter(results["passkey"].values())))
    for column in ("strategy", *map(str, lengths), "copy 16 chars", "copy 48 chars"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for s, row in results["passkey"].items():
        table.add_row(s, *(f"{row[L]:.0%}" for L in lengths), *(f"{v:.0%}" for v in results["copy"][s].values()))
    console.print(table)
    table = Table(title="compressed cache: passkey accuracy at the training length, by method and ratio removed")
    ratios = list(next(iter(results["compression"].values())))
    for column in ("method", *map(str, ratios)):
        table.add_column(column)
    for method, row in results["compression"].items():
        table.add_row(method, *(f"{row[r]:.0%}" for r in ratios))
    console.print(table)
    ext = results["extension"]
    table = Table(title=f"position extension (trained to {ext['training_length']} tokens): passkey / needle "
                        f"accuracy by length, held-out perplexity at {ext['ppl_length']}")
    lengths = ext["lengths"]
    for column in ("RoPE", *(f"{L}" for L in lengths), f"ppl {ext['ppl_length']}"):
        table.add_column(column, justify="left" if column == "RoPE" else "right")
    for name, row in ext["rows"].items():
        table.add_row(name, *(f"{p:.0%} / {n:.0%}" for p, n in zip(row["passkey"], row["needle"])),
                      f"{row['perplexity']:.3f}")
    console.print(table)
    mem = results["memory"]
    table = Table(title=f"memory layers (context {mem['training_length']}): passkey / needle accuracy, ms per "
                        "token, peak MiB")
    for column in ("strategy", *(f"{L}" for L in mem["lengths"])):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name, row in mem["rows"].items():
        table.add_row(name, *(f"{p:.0%} / {n:.0%}  {ms:.2f} ms  {'-' if mib is None else f'{mib:.0f}'}"
                              for p, n, ms, mib in zip(row["passkey"], row["needle"], row["ms_per_token"],
                                                       row["peak_mib"])))
    console.print(table)
    lim = results["lost_in_the_middle"]
    console.print(f"lost in the middle ({lim['pairs']} pairs), accuracy by asked position: "
                  + ", ".join(f"{p}: {a:.0%}" for p, a in zip(lim["positions"], lim["accuracy"])))


def _plots(results: dict, depths, grid_lengths, out) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results["needle"]), figsize=(5 * len(results["needle"]), 3.6))
    for ax, (s, grid) in zip(np.atleast_1d(axes), results["needle"].items()):
        im = ax.imshow(np.array(grid), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(grid_lengths)), grid_lengths)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"needle in a haystack: {s}")
    fig.colorbar(im, ax=axes, label="accuracy")
    fig.savefig(out / "eval-needle.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in results["perplexity"].items():
        ax.plot(curve["starts"], np.exp(curve["nll"]), marker=".", label=name)
    ax.axvline(results["training_length"], color="gray", ls=":", label="training length")
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("perplexity of the bucket")
    ax.legend(fontsize=8)
    ax.set_title("perplexity by position on the shipped text")
    fig.tight_layout()
    fig.savefig(out / "eval-perplexity.png", dpi=110)
    plt.close(fig)
    extension_plot(results["extension"], out / "eval-extension.png")
    memory_plot(results["memory"], out / "eval-memory.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    lim = results["lost_in_the_middle"]
    ax1.plot(lim["positions"], lim["accuracy"], marker="o")
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_xlabel(f"position of the asked pair (of {lim['pairs']})")
    ax1.set_ylabel("key-value recall accuracy")
    ax1.set_title("lost in the middle (full attention)")
    for method, row in results["compression"].items():
        ax2.plot([float(r) for r in row], list(row.values()), marker="o", label=method)
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("compression ratio (fraction of the cache removed)")
    ax2.set_ylabel("passkey accuracy")
    ax2.set_title("which entries to keep")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eval-recall.png", dpi=110)
    plt.close(fig)


def extension_plot(ext: dict, path) -> None:
    """Task 9's figure: held-out perplexity by position (buckets of T0 / 4) and passkey by length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    T0 = ext["training_length"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    bucket = T0 // 4
    for name, row in ext["rows"].items():
        nll = np.array(row["nll_by_position"])
        starts = np.arange(0, len(nll), bucket)
        ax1.plot(starts + 1, np.exp([nll[s:s + bucket].mean() for s in starts]), marker=".", label=name)
        ax2.plot(ext["lengths"], row["passkey"], marker="o", label=name)
    ax1.axvline(T0, color="gray", ls=":")
    ax1.set_yscale("log")
    ax1.set_xlabel("position (tokens)")
    ax1.set_ylabel(f"held-out perplexity, buckets of {bucket}")
    ax1.set_title("beyond the training length (dotted)")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(ext["lengths"], ext["lengths"])
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("prompt length (tokens)")
    ax2.set_ylabel("passkey accuracy")
    ax2.set_title("retrieval")
    fig.legend(*ax2.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        return x.detach().float().cpu().numpy()
    import mlx.core as mx
    return np.array(x.astype(mx.float32))


def model_card(path) -> Path:
    """Score the model at ``path`` (through ``mlx_lm.load``) and write ``README.md`` and ``loss.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlx.utils import tree_flatten

    from longctx.mlx import LongContextQwen3
    from longctx.models import load_trained
    path = Path(path)
    log = json.loads((path / "train.json").read_text())
    config = json.loads((path / "config.json").read_text())
    model, tokenizer = load_trained("mlx", path)
    full = LongContextQwen3(model, "full")
    T = log["seq_len"]
    depths = [d / 9 for d in range(10)]
    scores = {f"passkey at {L} tokens (50 prompts, 10 depths)": passkey_accuracy(
        full, tokenizer, L, depths=depths, trials=5, seed=1) for L in sorted({max(256, T // 2), T})}
    scores[f"needle in the shipped text at {T} tokens (25 prompts)"] = float(
        needle_grid(full, tokenizer, [T], trials=5, seed=1).mean())
    scores["key-value recall, 40 pairs (25 prompts)"] = float(
        lost_in_the_middle(full, tokenizer, 40, trials=5, seed=1)[1].mean())
    scores["copy 48 characters (20 prompts)"] = copy_accuracy(full, tokenizer, 48, trials=20, seed=1)
    losses = np.array(log["losses"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(losses, alpha=0.3, label="training loss, per step")
    k = min(25, len(losses))
    ax.plot(np.arange(k - 1, len(losses)), np.convolve(losses, np.ones(k) / k, "valid"), label=f"mean of {k}")
    steps, copy = zip(*log["copy_losses"])
    ax.plot(steps, copy, marker=".", label="held-out repeats, second half")
    first = 0
    for length, count, _ in log["stages"]:
        ax.axvline(first, color="grey", lw=0.5)
        ax.text(first, 1.0, f" {length}", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
        first += count
    ax.set_xlabel("step (grey lines: the curriculum's row lengths)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path / "loss.png", dpi=100)
    plt.close(fig)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    shape = ", ".join(f"{k}={config[k]}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                                   "vocab_size", "rope_theta", "tie_word_embeddings"))
    rows = "\n".join(f"| {name} | {value:.0%} |" for name, value in scores.items())
    at_t = scores[f"passkey at {T} tokens (50 prompts, 10 depths)"]
    verdict = (f"it retrieves the passkey in {at_t:.0%} of prompts at its training length." if at_t >= 0.5 else
               f"**it does not retrieve** ({at_t:.0%} passkey at its training length; no induction head "
               "formed in this run), so retrieval effects cannot be shown on it.")
    mix = ", ".join(f"{k} {v:.0%}" for k, v in log["mix"].items())
    stages = "; ".join(f"{count} steps of {log['batch_size'] * T // length} x {length} tokens ("
                       + ", ".join(f"{k} {v:.0%}" for k, v in mix_.items()) + ")"
                       for length, count, mix_ in log["stages"])
    (path / "README.md").write_text(f"""# qwen3-tiny-longctx

A {n_params / 1e6:.2f}M-parameter Qwen3 (mlx-lm's `qwen3.Model`, Hugging Face layout) trained from
seed {log['seed']} by `longctx train-tiny` on a 2-core CPU in {log['seconds'] / 60:.0f} minutes, so the
longctx benchmark and evaluation suite measure a trained model, not random weights. What it can and
cannot do is in the scores below: {verdict}
Load it with `mlx_lm.load(path)` or `AutoModelForCausalLM.from_pretrained(path)`.

- **Architecture:** {shape}.
- **Tokenizer:** byte-level BPE, 512 entries, trained on the shipped public-domain texts
  (`longctx.models.tiny_tokenizer`), Qwen3's special tokens and ChatML template.
- **Data:** examples packed into rows of {T} tokens, each starting with `<|endoftext|>`: {mix}
  (`longctx.data.mix.MIX`; "repeat" is random ids then the same ids again, the rest are prompts from
  `longctx.data.tasks`: Landmark Attention's passkey format, the magic-number needle in the shipped
  text, key-value recall with up to 47 pairs, copying up to 99 characters), at random lengths, depths
  and keys. The loss counts every token except those no model can predict: the first copy of a
  repeat (and of an "induction" example: a repeat with random ids between the copies), and a copy
  prompt with its random string. Its predictions on those random ids are therefore untrained: a
  perplexity over rows that contain them measures its confidence on noise.
- **Training:** a length curriculum (the reason is in `train.py` and the book's chapter "A trained
  model to measure on"): {stages}. AdamW (lr {log['lr']}, weight decay 0.01, 50 warm-up steps, constant,
  then cosine to lr/20 over the last stage), gradient clipping 1.0; final loss {np.mean(losses[-50:]):.3f}
  (mean of the last 50 steps, over the tokens the loss counts).
- **The induction head:** the loss on the second half of held-out repeats (random ids seen once
  before) stays near (or above) ln(vocab) = 6.2 until the model learns to copy from earlier in the context, then
  falls. At the end: {log["copy_losses"][-1][1]:.2f}.
- **Training length:** {T} tokens (`max_position_embeddings`). Beyond it, full attention meets RoPE
  positions it never saw: the point of the book's long-context chapters.

![loss](loss.png)

## Scores (greedy, full attention, held-out seeds)

| task | accuracy |
| --- | --- |
{rows}

Regenerate: `longctx train-tiny PATH --seed {log['seed']}` (the same seed on the same machine gives the same weights).
""")
    return path


__all__ = ["copy_accuracy", "model_card", "extension_table", "greedy_answer", "lost_in_the_middle", "needle_grid",
           "passkey_accuracy", "perplexity_by_position", "run_suite", "token_nll"]
