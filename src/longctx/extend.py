"""``longctx extend MODEL OUT``: a model folder that reads ``factor`` times more tokens (Task 9).

The folder is the model's, with ``rope_scaling`` (Hugging Face's keys) in its
``config.json``: ``mlx_lm.load(OUT)`` and ``AutoModelForCausalLM.from_pretrained(OUT)``
run the extended model with no longctx code. ``max_position_embeddings``
becomes ``factor x T0`` (``original_max_position_embeddings`` keeps ``T0``),
except for ``dynamic``, whose NTK base grows from ``max_position_embeddings``
itself in both loaders, so it stays ``T0``.

* ``linear``, ``dynamic``, ``yarn``, ``llama3``: the method's formula with
  transformers' defaults (Llama 3: low 1, high 4).
* ``longrope`` needs ``search``: LongRoPE's evolutionary search (long factors
  at ``factor x T0`` tokens, then short factors at ``T0``) on held-out rows of
  the training mix that training never drew (``longctx.data.mix.heldout_rows``).
  ``n_hat`` stays 0: the loaders have no key for it.
* ``finetune_steps``: then the paper's short fine-tune at the new length
  (``longctx.models.train.finetune``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from longctx.checks import check_choice, check_nonnegative_int, check_positive_int
from longctx.data.mix import heldout_rows
from longctx.techniques.rope import ROPE_METHODS, check_rope_scaling, rope_scaling_for


def default_backend() -> str:
    """MLX on an Apple GPU; elsewhere the torch mirror, whose CPU attention is several times MLX's."""
    try:
        import mlx.core as mx
        if mx.metal.is_available():
            return "mlx"
    except ImportError:
        pass
    import importlib.util
    return "torch" if importlib.util.find_spec("torch") else "mlx"


def extend(model_path, out, *, method: str, factor: float, search: bool = False, finetune_steps: int = 0,
           backend: str | None = None, rows: int = 4, population: int = 32, generations: int = 16,
           seed: int = 0, log=print) -> Path:
    """Write ``out``: the model at ``model_path`` extended ``factor`` times by ``method``."""
    method = check_choice("method", method, ROPE_METHODS)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"factor must be a number > 1, got {factor!r}")
    finetune_steps = check_nonnegative_int("finetune_steps", finetune_steps)
    if method == "longrope" and not search:
        raise ValueError("method 'longrope' needs search=True (--search): its factors are searched, not given")
    if search and method != "longrope":
        raise ValueError(f"search is LongRoPE's: use method='longrope', got method={method!r}")
    model_path, out = Path(model_path), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out must be a new or empty folder, got {str(out)!r}, which holds files (nothing is "
                         "overwritten)")
    config = json.loads((model_path / "config.json").read_text())
    if (config.get("rope_scaling") or config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ValueError(f"{model_path} is already scaled ({config.get('rope_scaling')}); extend the original model")
    T0, head_dim = config["max_position_embeddings"], config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"])
    target = int(round(factor * T0))
    record = {"base": str(model_path), "method": method, "factor": factor, "original_max_position_embeddings": T0,
              "target_length": target}
    if method == "longrope":
        scaling = _search(model_path, target, T0, backend or default_backend(), rows=check_positive_int("rows", rows),
                          population=population, generations=generations, seed=seed, record=record, log=log)
    else:
        scaling = rope_scaling_for(method, factor, T0)
    check_rope_scaling(scaling, head_dim)
    staging = out.with_name(out.name + ".partial")  # nothing half-written under `out`
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_path, staging, ignore=shutil.ignore_patterns("README.md", "*.png", "train.json"))
    config["rope_scaling"] = scaling
    if method != "dynamic":
        config["max_position_embeddings"] = target
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    if finetune_steps:
        from longctx.models.train import finetune
        log(f"fine-tuning {finetune_steps} steps at {target} tokens with {method}")
        finetune(model_path, staging, scaling, seq_len=target, steps=finetune_steps, seed=seed, log=log)
        record["finetune"] = json.loads((staging / "finetune.json").read_text())
    record["rope_scaling"] = scaling
    (staging / "extend.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        out.rmdir()  # empty, checked above
    staging.rename(out)
    return out


def _search(model_path, target: int, T0: int, backend: str, *, rows: int, population: int, generations: int,
            seed: int, record: dict, log) -> dict:
    from longctx.models import load_trained
    model, tokenizer = load_trained(backend, model_path)
    if backend == "mlx":
        from longctx.mlx.rope_scaling import search_longrope
    else:
        from longctx.torch.rope_scaling import search_longrope
    options = dict(population=check_positive_int("population", population), parents=max(1, population // 2),
                   mutations=max(1, population // 4), crossovers=max(1, population // 4),
                   generations=check_positive_int("generations", generations), start_tokens=(0,), seed=seed)
    long, short = {}, {}
    log(f"LongRoPE search on {backend}: long factors at {target} tokens")
    scaling = search_longrope(model, target, sequences=heldout_rows(tokenizer, target, rows, seed), record=long,
                              **options)
    log(f"long factors {scaling['long_factor']} (perplexity {long['best']:.3f}; seeds "
        + ", ".join(f"{k} {v:.3f}" for k, v in long["seeds"].items()) + f"); short factors at {T0} tokens")
    scaling = search_longrope(model, T0, sequences=heldout_rows(tokenizer, T0, rows, seed + 1), rope_scaling=scaling,
                              record=short, **options)
    record["search"] = {"backend": backend, "rows": rows, **options, "long": long, "short": short}
    return scaling


__all__ = ["default_backend", "extend"]
