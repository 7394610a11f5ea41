"""``--log mlflow`` / ``--log tensorboard`` for ``longctx bench`` and ``longctx eval``: one real run each.

The JSON and PNGs a command writes stay the record; a run mirrors them into
the tool people browse results in:

* **MLflow** (``pip install 'longctx[mlflow]'``): a run in experiment
  ``longctx-<command>`` with the command's configuration as parameters, every
  measure as a metric stepped by its length (``passkey.sliding`` at step
  1024), and the JSON and PNGs as artifacts. The store is
  ``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///OUT/mlflow.db`` with the
  artifacts in ``OUT/mlartifacts`` (MLflow 3 keeps its plain-file store only
  in maintenance mode); browse it with ``mlflow ui --backend-store-uri`` and
  that URI.
* **TensorBoard** (``pip install 'longctx[tensorboard]'``): an event file in
  ``OUT/tensorboard/<command>-<time>``: the same scalars (``/`` for ``.``),
  the parameters and the JSON as text, the PNGs as images; ``tensorboard
  --logdir OUT/tensorboard``.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

LOGGERS = ("mlflow", "tensorboard")


def log_run(to: str, command: str, params: dict, metrics: Iterable[tuple[str, float, int]], files: list[Path],
            out: Path) -> str:
    """Log one run; returns the MLflow run id or the TensorBoard run folder."""
    metrics = [(k, float(v), int(step)) for k, v, step in metrics if v is not None and math.isfinite(float(v))]
    params = {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in params.items()}
    out = Path(out).resolve()
    if to == "mlflow":
        return _mlflow(command, params, metrics, files, out)
    if to == "tensorboard":
        return _tensorboard(command, params, metrics, files, out)
    raise ValueError(f"to must be one of {LOGGERS}, got {to!r}")


def _mlflow(command, params, metrics, files, out) -> str:
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise SystemExit("--log mlflow needs the extra: pip install 'longctx[mlflow]'") from None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out}/mlflow.db"
    client, name = MlflowClient(uri), f"longctx-{command}"
    experiment = client.get_experiment_by_name(name)
    experiment_id = (experiment.experiment_id if experiment else
                     client.create_experiment(name, artifact_location=(out / "mlartifacts").as_uri()))
    run = client.create_run(experiment_id, run_name=f"{command}-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"mlflow.source.name": f"longctx {command}"})
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, step) for k, v, step in metrics[i:i + 1000]])
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _tensorboard(command, params, metrics, files, out) -> str:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("--log tensorboard needs the extra: pip install 'longctx[tensorboard]'") from None
    import matplotlib.image
    folder = out / "tensorboard" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    with SummaryWriter(log_dir=str(folder)) as writer:
        writer.add_text("params", "\n".join(f"- {k}: {v}" for k, v in params.items()))
        for k, v, step in metrics:
            writer.add_scalar(k.replace(".", "/"), v, global_step=step)
        for f in files:
            if f.suffix == ".png":
                writer.add_image(f.stem, matplotlib.image.imread(f)[..., :3], dataformats="HWC")
            else:
                writer.add_text(f.name, "```\n" + f.read_text()[:200_000] + "\n```")
    return str(folder)


def bench_metrics(rows: list[dict]) -> list[tuple[str, float, int]]:
    """``backend.technique.measure`` at step ``length``, for every bench row."""
    measures = ("median_ms", "tokens_per_second", "peak_memory_bytes", "quality")
    return [(f"{r['backend']}.{r['technique']}.{m}", r[m], r["length"]) for r in rows for m in measures
            if r.get(m) is not None]


def eval_metrics(results: dict) -> list[tuple[str, float, int]]:
    """The evaluation suite's curves as stepped metrics: accuracy by prompt length (passkey,
    needle averaged over depths), by characters (copy), by ratio in % (compression), mean
    -log p by position (perplexity), accuracy by the asked pair (lost in the middle)."""
    out = [(f"passkey.{s}", acc, L) for s, row in results["passkey"].items() for L, acc in row.items()]
    for s, rows in results["needle"].items():
        out += [(f"needle.{s}", sum(r) / len(r), L) for L, r in zip(results["needle_lengths"], rows)]
    out += [(f"copy.{s}", acc, c) for s, row in results["copy"].items() for c, acc in row.items()]
    out += [(f"compression.{m}", acc, round(100 * float(r))) for m, row in results["compression"].items()
            for r, acc in row.items()]
    for name, curve in results["perplexity"].items():
        key = "perplexity." + "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
        out += [(key, nll, start) for start, nll in zip(curve["starts"], curve["nll"])]
    lost = results["lost_in_the_middle"]
    out += [("lost_in_the_middle", acc, pos) for pos, acc in zip(lost["positions"], lost["accuracy"])]
    return [(k, v, int(step)) for k, v, step in out]


__all__ = ["LOGGERS", "bench_metrics", "eval_metrics", "log_run"]
