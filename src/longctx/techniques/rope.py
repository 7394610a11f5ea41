"""Task 9, position extension: the RoPE types, one entry each, backend-free.

Like transformers' ``ROPE_INIT_FUNCTIONS`` / ``ROPE_VALIDATION_FUNCTIONS``, a RoPE type is a
name and one function per job: here, its keys and their check (with Hugging Face's defaults
filled in) and, for a formula, the ``rope_scaling`` that ``longctx extend --method`` and
``longctx eval`` write. Each backend's ``SCALINGS`` has one initialisation function per name
(the learner writes them in Task 9) and the float64 oracle one more; a test checks that all
three name the same types. A new type is one ``RopeType`` here and one function in each.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

from longctx.checks import check_choice, check_nonnegative_int, check_positive_int


def _real(key: str, value, low: float = 0.0, *, inclusive: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    if not ok or value < low or (value == low and not inclusive):
        bound = f">= {low}" if inclusive else f"> {low}"
        raise ValueError(f"rope_scaling[{key!r}] must be a finite number {bound}, got {value!r}")
    return float(value)


def _require(s: dict, *keys: str) -> None:
    missing = [k for k in keys if s.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling for rope_type={s['rope_type']!r} needs {missing}, got {s!r}")


def _factor(s: dict) -> None:
    if s.get("factor") is not None:
        s["factor"] = _real("factor", s["factor"], 1.0, inclusive=True)


def _original_length(s: dict) -> None:
    check_positive_int("rope_scaling['original_max_position_embeddings']", s["original_max_position_embeddings"])


def _attention_factor(s: dict) -> None:
    if s.get("attention_factor") is not None:
        s["attention_factor"] = _real("attention_factor", s["attention_factor"])


# Each check: the dict (``rope_type`` set, no unknown keys) and head_dim -> checked, defaults filled in.

def _check_default(s: dict, head_dim: int) -> None:
    pass


def _check_linear(s: dict, head_dim: int) -> None:
    _require(s, "factor")
    _factor(s)


def _check_dynamic(s: dict, head_dim: int) -> None:
    _require(s, "factor", "original_max_position_embeddings")
    _factor(s)
    _original_length(s)


def _check_yarn(s: dict, head_dim: int) -> None:
    _require(s, "factor", "original_max_position_embeddings")
    _factor(s)
    _original_length(s)
    # HF: `get("beta_fast") or 32`, so 0 and None both mean the default
    s["beta_fast"] = _real("beta_fast", s.get("beta_fast") or 32)
    s["beta_slow"] = _real("beta_slow", s.get("beta_slow") or 1)
    for key in ("mscale", "mscale_all_dim"):
        if s.get(key) is not None:
            _real(key, s[key], 0.0, inclusive=True)
    s["truncate"] = bool(s.get("truncate", True))
    _attention_factor(s)


def _check_llama3(s: dict, head_dim: int) -> None:
    _require(s, "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
    _factor(s)
    _original_length(s)
    low, high = _real("low_freq_factor", s["low_freq_factor"]), _real("high_freq_factor", s["high_freq_factor"])
    if high <= low:
        raise ValueError(f"rope_scaling['high_freq_factor'] must be > low_freq_factor ({low}), got {high}")


def _check_longrope(s: dict, head_dim: int) -> None:
    _require(s, "original_max_position_embeddings", "short_factor", "long_factor")
    if s.get("attention_factor") is None:
        _require(s, "factor")  # (HF: max_position_embeddings / original; rope_scaling_from_config fills it)
    _factor(s)
    _original_length(s)
    _attention_factor(s)
    for key in ("short_factor", "long_factor"):
        values = s[key]
        if (not isinstance(values, (list, tuple)) or len(values) != head_dim // 2
                or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) and 0 < x < float("inf")
                           for x in values)):
            raise ValueError(f"rope_scaling[{key!r}] must be {head_dim // 2} finite numbers > 0 (one per "
                             f"rotated pair, head_dim {head_dim}), got {values!r:.120}")
        s[key] = [float(x) for x in values]
    s["start_tokens"] = check_nonnegative_int("rope_scaling['start_tokens']", s.get("start_tokens", 0))


@dataclass(frozen=True)
class RopeType:
    keys: tuple[str, ...]  # Hugging Face's keys (``RopeParameters``); longrope adds longctx's ``start_tokens``
    check: Callable[[dict, int], None]  # fills in defaults, raises ValueError naming the key
    extend: Callable[[float, int], dict] | None = None  # (factor, T0) -> the formula's keys; None: searched
    reads_length: bool = True  # the original length comes from the model config when absent


ROPE_TYPES = {
    "default": RopeType((), _check_default, reads_length=False),
    "linear": RopeType(("factor",), _check_linear, lambda factor, T0: {}, reads_length=False),
    "dynamic": RopeType(("factor", "original_max_position_embeddings"), _check_dynamic,
                        lambda factor, T0: {"original_max_position_embeddings": T0}),
    "yarn": RopeType(("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                      "mscale", "mscale_all_dim", "truncate"), _check_yarn,
                     lambda factor, T0: {"original_max_position_embeddings": T0}),
    "llama3": RopeType(("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
                       _check_llama3,  # transformers' defaults for an extension: low 1, high 4
                       lambda factor, T0: {"original_max_position_embeddings": T0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0}),
    "longrope": RopeType(("factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                          "long_factor", "start_tokens"), _check_longrope),
}
ROPE_METHODS = tuple(name for name in ROPE_TYPES if name != "default")  # `longctx extend --method`
FORMULAS = tuple(name for name, t in ROPE_TYPES.items() if t.extend is not None)  # set by a factor alone


def check_rope_scaling(rope_scaling, head_dim: int) -> dict:
    """A Hugging Face ``rope_scaling`` (``rope_parameters``) dict, checked and with HF's defaults filled
    in: ``{"rope_type": "default"}`` for None. ``type`` is read as ``rope_type``; ``rope_theta`` and
    ``partial_rotary_factor`` (config fields HF also keeps there) are dropped: the base is an argument.

    Where HF reads a length from the model config, the dict must carry it: ``dynamic`` needs
    ``original_max_position_embeddings`` (HF: ``config.max_position_embeddings``), and ``longrope``
    needs ``factor`` unless it gives ``attention_factor`` (HF: ``max_position_embeddings /
    original_max_position_embeddings``); ``rope_scaling_from_config`` fills both from a config."""
    head_dim = check_positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {head_dim}")
    if rope_scaling is None:
        return {"rope_type": "default"}
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict (Hugging Face's rope_scaling) or None, got {rope_scaling!r}")
    s = {k: v for k, v in rope_scaling.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    s["rope_type"] = rope_type = check_choice("rope_scaling['rope_type']",
                                              rope_scaling.get("rope_type", rope_scaling.get("type", "default")),
                                              tuple(ROPE_TYPES))
    kind = ROPE_TYPES[rope_type]
    unknown = set(s) - {"rope_type", *kind.keys}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in rope_scaling for rope_type={rope_type!r}; "
                         f"it takes {sorted(kind.keys)}")
    kind.check(s, head_dim)
    return s


def rope_scaling_from_config(config) -> dict:
    """The model's RoPE scaling as ``check_rope_scaling`` takes it, read the way transformers
    standardises a config: ``rope_scaling`` or ``rope_parameters`` (transformers >= 5), the original
    length from ``original_max_position_embeddings`` or else ``max_position_embeddings``, and a
    missing LongRoPE ``factor`` as ``max_position_embeddings / original``. ``config``: a dict,
    mlx-lm's ``model.args`` or a transformers config."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    scaling = dict(get("rope_scaling") or get("rope_parameters") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return {"rope_type": "default"}
    if rope_type not in ROPE_TYPES:
        return scaling  # check_rope_scaling names it
    max_positions = get("max_position_embeddings")
    if ROPE_TYPES[rope_type].reads_length:  # (HF's dynamic NTK: max_position_embeddings)
        scaling.setdefault("original_max_position_embeddings", get("original_max_position_embeddings") or max_positions)
    if rope_type == "longrope" and scaling.get("factor") is None and max_positions:
        scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    return scaling


def rope_scaling_for(method: str, factor: float, T0: int) -> dict:
    """The ``rope_scaling`` dict of a formula ``method`` (not ``longrope``: its factors are searched)
    for an extension by ``factor`` of a model trained to ``T0``, with transformers' defaults."""
    method = check_choice("method", method, FORMULAS)
    return {"rope_type": method, "factor": float(factor),
            **ROPE_TYPES[method].extend(float(factor), check_positive_int("T0", T0))}
