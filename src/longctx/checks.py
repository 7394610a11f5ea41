"""Argument checks shared by every backend (they only read ``.shape``).

Each raises ``ValueError`` naming the argument and the value received:
nothing is silently broadcast or clipped.
"""
from __future__ import annotations

import numbers


def check_positive_int(name: str, value) -> int:
    """``value`` must be an int >= 1 (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_scale(scale) -> float | None:
    """``scale`` is None (meaning ``D ** -0.5``) or a finite positive number."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    return float(scale)


def check_attention(q, k, v, *, queries_last: bool = True) -> tuple[int, int, int, int, int, int]:
    """Validate ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)``; return ``B, Hq, Hkv, Lq, Lk, D``.

    Queries are the last ``Lq`` positions of the ``Lk`` keys, so ``Lq <= Lk``
    (``queries_last=False``, for a ring step between two shards, drops that rule).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, L, D), got shape {tuple(x.shape)}")
        if 0 in tuple(x.shape):
            raise ValueError(f"{name} must not have an empty axis, got shape {tuple(x.shape)}")
    B, Hq, Lq, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k batch must equal q batch {B}, got k shape {tuple(k.shape)}")
    if Dk != D:
        raise ValueError(f"k head dim must equal q head dim {D}, got k shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"q heads must be a multiple of kv heads, got Hq={Hq} and Hkv={Hkv}")
    if queries_last and Lq > Lk:
        raise ValueError(f"q length must be <= k length (queries are the last Lq positions), "
                         f"got Lq={Lq} and Lk={Lk}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, Hq, Hkv, Lq, Lk, D


def self_attention_inputs(q, k, v) -> tuple:
    """``(k, v)``: both given, or neither (then ``k = v = q``, self-attention of one sequence)."""
    if k is None and v is None:
        return q, q
    if k is None or v is None:
        raise ValueError(f"k and v must both be given, or neither (self-attention of q), got "
                         f"k={'None' if k is None else tuple(k.shape)} and v={'None' if v is None else tuple(v.shape)}")
    return k, v


# Task 4's methods and budget, and Task 3's layouts: one definition for both backends.
COMPRESSION_METHODS = ("h2o", "snapkv", "knorm", "streaming")
NEEDS_ATTENTION = ("h2o", "snapkv")  # the methods whose scores need the queries' attention
RING_LAYOUTS = ("contiguous", "zigzag")


def n_kept(length: int, compression_ratio: float) -> int:
    """How many of ``length`` entries survive (kvpress's ``compute_n_kept``)."""
    return max(1, int(length * (1 - compression_ratio)))


def check_ratio(compression_ratio) -> float:
    """A compression ratio (the fraction removed, as in kvpress): a number in ``[0, 1)``."""
    if (isinstance(compression_ratio, bool) or not isinstance(compression_ratio, numbers.Real)
            or not 0 <= compression_ratio < 1):
        raise ValueError(f"compression_ratio must be a number in [0, 1), got {compression_ratio!r}")
    return float(compression_ratio)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_level(segment_size, dilation) -> tuple[int, int]:
    """One LongNet level: ``1 <= dilation <= segment_size``."""
    w = check_positive_int("segment_size", segment_size)
    r = check_positive_int("dilation", dilation)
    if r > w:
        raise ValueError(f"dilation must be <= segment_size ({w}), got {r}")
    return w, r


def check_levels(levels, dilations) -> tuple[list[int], list[int]]:
    """LongNet's levels; ``dilations`` default to ``w // levels[0]`` and must start at 1."""
    if not isinstance(levels, (list, tuple)) or not levels:
        raise ValueError(f"levels must be a non-empty list of segment sizes, got {levels!r}")
    levels = [check_positive_int("levels", w) for w in levels]
    if dilations is None:
        dilations = [max(1, w // levels[0]) for w in levels]
    if not isinstance(dilations, (list, tuple)) or len(dilations) != len(levels):
        raise ValueError(f"dilations must be a list with one entry per level ({len(levels)}), got {dilations!r}")
    dilations = [check_positive_int("dilations", r) for r in dilations]
    if dilations[0] != 1:
        raise ValueError(f"dilations[0] must be 1 so that every query is kept, got {dilations[0]}")
    for w, r in zip(levels, dilations):
        if r > w:
            raise ValueError(f"dilations must be <= their segment size, got dilation {r} for segment {w}")
    return levels, dilations


def ring_shard_rows(length: int, rank, size, layout: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` row ranges rank ``rank`` of ``size`` holds of a sequence.

    contiguous: chunk ``rank`` of ``size``. zigzag: chunks ``rank`` and
    ``2 * size - 1 - rank`` of ``2 * size``, so causal work is balanced.
    """
    size = check_positive_int("size", size)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < size:
        raise ValueError(f"rank must be an integer in [0, {size}), got {rank!r}")
    check_choice("layout", layout, RING_LAYOUTS)
    chunks = size if layout == "contiguous" else 2 * size
    if length % chunks:
        raise ValueError(f"the sequence length must be a multiple of {chunks} for layout {layout!r}, got {length}")
    n = length // chunks
    owned = [rank] if layout == "contiguous" else [rank, chunks - 1 - rank]
    return [(c * n, (c + 1) * n) for c in owned]


def check_tokens(tokens, vocab_size: int) -> list[int]:
    """Token ids in ``[0, vocab_size)``: a non-empty 1-D sequence, or a batch of one ``(1, L)`` as
    mlx-lm and transformers pass them (a list, or an array's ``tolist()``)."""
    ids = tokens.tolist() if hasattr(tokens, "tolist") else tokens
    if isinstance(ids, (list, tuple)) and len(ids) == 1 and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    if (not isinstance(ids, (list, tuple)) or not ids
            or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab_size
                       for t in ids)):
        raise ValueError(f"tokens must be a non-empty 1-D sequence of ids in [0, {vocab_size}) (or one row of "
                         f"them, (1, L)), got {tokens!r:.80}")
    return [int(t) for t in ids]


def chunk_rows(chunk_outputs) -> list:
    """``StreamingProcessor.merge_chunk_outputs``'s input as ``(n, vocab)`` arrays: each chunk's
    output is ``(n, vocab)`` or, as mlx-lm's and transformers' models return it, ``(1, n, vocab)``.
    A larger batch would be several streams at once, which one processor does not run: merge each
    stream's outputs on its own (``[o[b] for o in outputs]``)."""
    shapes = [tuple(getattr(o, "shape", ())) for o in chunk_outputs] if isinstance(chunk_outputs, (list, tuple)) else []
    if not shapes or any(len(s) not in (2, 3) or (len(s) == 3 and s[0] != 1) for s in shapes) \
            or len({s[-1] for s in shapes}) != 1:
        raise ValueError(f"chunk_outputs must be a non-empty list of (n, vocab) or (1, n, vocab) arrays with one "
                         f"vocab (a batch of B > 1 is B streams: merge each on its own), got "
                         f"{shapes or chunk_outputs!r}")
    return [o[0] if o.ndim == 3 else o for o in chunk_outputs]


def prefill_chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each prefill chunk; the last is never a lone token
    (Task 4's cache reads a one-token update as the first decode step)."""
    starts = list(range(0, n, chunk_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], n]))


# ---------------------------------------------------------------- Task 9: position extension
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
_ROPE_KEYS = {  # Hugging Face's keys (``RopeParameters``) and longctx's one addition, ``start_tokens``
    "default": (), "linear": ("factor",), "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor",
                 "start_tokens"),
}
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor", "original_max_position_embeddings"),
                  "yarn": ("factor", "original_max_position_embeddings"),
                  "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
                  "longrope": ("original_max_position_embeddings", "short_factor", "long_factor")}


def _real(key: str, value, low: float = 0.0, *, inclusive: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    if not ok or value < low or (value == low and not inclusive):
        bound = f">= {low}" if inclusive else f"> {low}"
        raise ValueError(f"rope_scaling[{key!r}] must be a finite number {bound}, got {value!r}")
    return float(value)


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
                                              ROPE_TYPES)
    unknown = set(s) - {"rope_type", *_ROPE_KEYS[rope_type]}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in rope_scaling for rope_type={rope_type!r}; "
                         f"it takes {sorted(_ROPE_KEYS[rope_type])}")
    missing = [k for k in _ROPE_REQUIRED.get(rope_type, ()) if s.get(k) is None]
    if rope_type == "longrope" and s.get("factor") is None and s.get("attention_factor") is None:
        missing.append("factor")
    if missing:
        raise ValueError(f"rope_scaling for rope_type={rope_type!r} needs {missing}, got {rope_scaling!r}")
    if s.get("factor") is not None:
        s["factor"] = _real("factor", s["factor"], 1.0, inclusive=True)
    if "original_max_position_embeddings" in s:
        check_positive_int("rope_scaling['original_max_position_embeddings']", s["original_max_position_embeddings"])
    if rope_type == "yarn":
        # HF: `get("beta_fast") or 32`, so 0 and None both mean the default
        s["beta_fast"] = _real("beta_fast", s.get("beta_fast") or 32)
        s["beta_slow"] = _real("beta_slow", s.get("beta_slow") or 1)
        for key in ("mscale", "mscale_all_dim"):
            if s.get(key) is not None:
                _real(key, s[key], 0.0, inclusive=True)
        s["truncate"] = bool(s.get("truncate", True))
    if s.get("attention_factor") is not None:
        s["attention_factor"] = _real("attention_factor", s["attention_factor"])
    if rope_type == "llama3":
        low, high = _real("low_freq_factor", s["low_freq_factor"]), _real("high_freq_factor", s["high_freq_factor"])
        if high <= low:
            raise ValueError(f"rope_scaling['high_freq_factor'] must be > low_freq_factor ({low}), got {high}")
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            values = s[key]
            if (not isinstance(values, (list, tuple)) or len(values) != head_dim // 2
                    or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) and 0 < x < float("inf")
                               for x in values)):
                raise ValueError(f"rope_scaling[{key!r}] must be {head_dim // 2} finite numbers > 0 (one per "
                                 f"rotated pair, head_dim {head_dim}), got {values!r:.120}")
            s[key] = [float(x) for x in values]
        s["start_tokens"] = check_nonnegative_int("rope_scaling['start_tokens']", s.get("start_tokens", 0))
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
    max_positions = get("max_position_embeddings")
    if rope_type in ("dynamic", "yarn", "llama3", "longrope"):  # (HF's dynamic NTK: max_position_embeddings)
        scaling.setdefault("original_max_position_embeddings", get("original_max_position_embeddings") or max_positions)
    if rope_type == "longrope" and scaling.get("factor") is None and max_positions:
        scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    return scaling


ROPE_METHODS = ("linear", "dynamic", "yarn", "llama3", "longrope")  # `longctx extend --method`


def rope_scaling_for(method: str, factor: float, T0: int) -> dict:
    """The ``rope_scaling`` dict of a formula ``method`` (not ``longrope``: its factors are searched)
    for an extension by ``factor`` of a model trained to ``T0``, with transformers' defaults
    (Llama 3: low 1, high 4)."""
    method = check_choice("method", method, ROPE_METHODS[:-1])
    scaling = {"rope_type": method, "factor": float(factor)}
    if method != "linear":
        scaling["original_max_position_embeddings"] = check_positive_int("T0", T0)
    if method == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return scaling


# ---------------------------------------------------------------- Task 10: memory layers


def check_memory(q, k, v, memory_keys, memory_values, top_k, memory_mask) -> tuple[int, int, int, int, int, int, int]:
    """``memory_attention``'s inputs: ``q, k, v`` as ``check_attention``, ``memory_keys``,
    ``memory_values (B, Hkv, M, D)`` (``M`` may be 0), ``top_k`` None or >= 1, ``memory_mask``
    None or ``(B, M)`` (True: visible). Returns ``B, Hq, Hkv, Lq, Lk, M, D``."""
    B, Hq, Hkv, Lq, Lk, D = check_attention(q, k, v)
    for name, x in (("memory_keys", memory_keys), ("memory_values", memory_values)):
        if len(x.shape) != 4 or tuple(x.shape[:2]) != (B, Hkv) or x.shape[3] != D:
            raise ValueError(f"{name} must have shape (B, Hkv, M, D) = ({B}, {Hkv}, M, {D}), got {tuple(x.shape)}")
    if tuple(memory_keys.shape) != tuple(memory_values.shape):
        raise ValueError(f"memory_keys and memory_values must have the same shape, got {tuple(memory_keys.shape)} "
                         f"and {tuple(memory_values.shape)}")
    M = memory_keys.shape[2]
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if memory_mask is not None and tuple(memory_mask.shape) != (B, M):
        raise ValueError(f"memory_mask must have shape (B, M) = ({B}, {M}), got {tuple(memory_mask.shape)}")
    return B, Hq, Hkv, Lq, Lk, M, D


def check_memory_layers(memory_layers, num_layers: int) -> tuple[int, ...]:
    """The memory layers' indices: None (the last layer) or integers in ``[0, num_layers)``."""
    if memory_layers is None:
        return (num_layers - 1,)
    layers = (memory_layers,) if isinstance(memory_layers, numbers.Integral) else memory_layers
    if (not isinstance(layers, (list, tuple)) or not layers or any(
            isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < num_layers for i in layers)):
        raise ValueError(f"memory_layers must be None or layer indices in [0, {num_layers}), got {memory_layers!r}")
    return tuple(sorted({int(i) for i in layers}))


def check_memory_options(o: dict) -> None:
    """The ``memory`` strategy's options (``memory_layers`` is checked against the model later)."""
    check_nonnegative_int("memory_size", o["memory_size"])
    last = check_nonnegative_int("last_context_length", o["last_context_length"])
    if o["top_k"] is not None:
        check_positive_int("top_k", o["top_k"])
    if o["context_length"] is not None and last > check_positive_int("context_length", o["context_length"]):
        raise ValueError(f"last_context_length must be <= context_length {o['context_length']}, got {last}")


def resolve_memory_options(options: dict, num_layers: int, max_positions: int) -> dict:
    """The ``memory`` strategy's options for a model of ``num_layers`` layers trained to
    ``max_positions``: ``memory_layers`` as indices (None: the last layer), ``context_length`` the
    model's when None; checked."""
    o = {**options, "memory_layers": check_memory_layers(options["memory_layers"], num_layers),
         "context_length": options["context_length"] or max_positions}
    check_memory_options(o)
    return o


def memory_windows(n: int, context_length: int, last_context_length: int, chunk_size: int):
    """LongLLaMA's input windowing of ``n`` tokens: ``(start, end, to_memory)`` per forward. All but
    the last ``last_context_length`` tokens go in windows of ``context_length`` from the start, each
    moved to memory after its forward (``to_memory`` on its last chunk); the rest stay local. A
    window is fed in chunks of at most ``chunk_size``."""
    prefix = max(n - last_context_length, 0)
    pieces = [(s, min(s + context_length, prefix), True) for s in range(0, prefix, context_length)]
    if prefix < n:
        pieces.append((prefix, n, False))
    return [(s + a, s + b, to_memory and s + b == e)
            for s, e, to_memory in pieces for a, b in prefill_chunks(e - s, chunk_size)]


def check_linear_state(state, B: int, Hkv: int, D: int) -> tuple:
    """Task 11's state ``(S (B, Hkv, D, D), z (B, Hkv, D))``, float32, or ValueError naming ``state``."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"state must be a pair (S, z) as linear_attention returns it, got {type(state).__name__}")
    S, z = state
    if tuple(S.shape) != (B, Hkv, D, D) or tuple(z.shape) != (B, Hkv, D):
        raise ValueError(f"state must be (S {(B, Hkv, D, D)}, z {(B, Hkv, D)}) for these inputs, "
                         f"got S {tuple(S.shape)} and z {tuple(z.shape)}")
    if "float32" not in str(S.dtype) or "float32" not in str(z.dtype):
        raise ValueError(f"state must be float32 (it accumulates), got {S.dtype} and {z.dtype}")
    return tuple(state)


def check_global_tokens(global_tokens, length: int | None = None):
    """Sorted, de-duplicated global positions as an int numpy array: integers ``>= 0`` and, when
    ``length`` is given, ``< length``."""
    import numpy as np

    if isinstance(global_tokens, (str, bytes)) or not hasattr(global_tokens, "__iter__"):
        raise ValueError(f"global_tokens must be a sequence of positions, got {global_tokens!r}")
    values = [int(g) if isinstance(g, (int, np.integer)) and not isinstance(g, bool) else g for g in global_tokens]
    limit = "" if length is None else f" and < the length {length}"
    bad = [g for g in values if not isinstance(g, int) or g < 0 or (length is not None and g >= length)]
    if bad:
        raise ValueError(f"global_tokens must be integer positions >= 0{limit}, got {bad[0]!r}")
    return np.unique(np.array(values, dtype=np.int64))


def check_longformer(window, global_tokens, causal, Lq: int, Lk: int, global_qkv, qkv):
    """``longformer_attention``'s arguments: returns the global positions (see ``check_global_tokens``)."""
    window = check_positive_int("window", window)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if not causal and window % 2:
        raise ValueError(f"window must be even for bidirectional Longformer (window / 2 keys each side), got {window}")
    if not causal and Lq != Lk:
        raise ValueError(f"bidirectional Longformer is self-attention: Lq must equal Lk, got {Lq} and {Lk}")
    if global_qkv is not None:
        if not isinstance(global_qkv, (tuple, list)) or len(global_qkv) != 3 or any(
                tuple(g.shape) != tuple(x.shape) or g.dtype != x.dtype for g, x in zip(global_qkv, qkv)):
            raise ValueError("global_qkv must be (q, k, v) with the shapes and dtype of q, k, v")
    return check_global_tokens(global_tokens, Lk)


def check_bigbird(block_size, num_random_blocks, Lq: int, Lk: int, Hq: int, random_blocks):
    """``bigbird_attention``'s arguments: ``(number of blocks, random_blocks as (Hq, n, r) int or None)``."""
    import numpy as np

    b = check_positive_int("block_size", block_size)
    r = check_nonnegative_int("num_random_blocks", num_random_blocks)
    if Lq != Lk:
        raise ValueError(f"bigbird_attention is self-attention: Lq must equal Lk, got {Lq} and {Lk}")
    if Lk % b:
        raise ValueError(f"the length must be a multiple of block_size={b} (BigBird works in whole blocks), "
                         f"got L={Lk}; pad the sequence")
    n = Lk // b
    if random_blocks is None:
        return n, None
    rand = np.asarray(random_blocks)
    if rand.ndim == 0:
        rand = np.full((Hq, n, r), int(rand))
    if rand.shape != (Hq, n, r) or rand.dtype.kind not in "iu" or (rand < -1).any() or (rand >= n).any():
        raise ValueError(f"random_blocks must be ints in -1 .. {n - 1} of shape {(Hq, n, r)} "
                         f"(-1: none), got shape {rand.shape}")
    rand = rand.astype(np.int64)
    rand[:, [0, n - 1]] = -1  # global query blocks see everything already
    return n, rand
