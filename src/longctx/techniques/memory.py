"""Task 10, memory layers (Focused Transformer, LongLLaMA): what is not array code."""
from __future__ import annotations

import numbers

from longctx.checks import check_attention, check_nonnegative_int, check_positive_int, prefill_chunks
from longctx.techniques.base import BYTES, Technique


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


def check_cache_options(memory_size, last_context_length, top_k, context_length) -> tuple:
    """``MemoryKVCache``'s options (both backends), checked: ``(memory_size, last_context_length,
    top_k, context_length)``."""
    memory_size = check_nonnegative_int("memory_size", memory_size)
    last = check_nonnegative_int("last_context_length", last_context_length)
    top_k = None if top_k is None else check_positive_int("top_k", top_k)
    context_length = check_positive_int("context_length", context_length)
    if last > context_length:
        raise ValueError(f"last_context_length must be <= context_length {context_length}, got {last}")
    return memory_size, last, top_k, context_length


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


def layer_options(o: dict, i: int) -> dict:
    """Layer ``i``'s ``MemoryKVCache`` options (a cache per layer): one outside ``memory_layers``
    keeps no memory."""
    layer = {k: v for k, v in o.items() if k != "memory_layers"}
    return layer if o["memory_layers"] is None or i in o["memory_layers"] else {**layer, "memory_size": 0}


def memory(L, H, D, o, backend):
    c = min(o["context_length"], L)
    return 4 * H * c * L * BYTES  # one window's scores against itself and the memory, weights, the mask


def pairs(L: int, o: dict) -> float:
    c, k = o["context_length"], o["top_k"]
    total = 0.0
    for s in range(0, L, c):
        n = min(c, L - s)
        total += n * (n + 1) / 2 + n * (s if k is None else min(k, s))  # local causal + kept memory entries
    return total


TECHNIQUE = Technique(
    "memory", 10, "windows of context_length attending to a memory of earlier windows (FoT, LongLLaMA)",
    {"context_length": 512, "top_k": None}, memory, lambda L, H, D, o: 4.0 * H * D * pairs(L, o),
    attention="MemoryAttention",
    strategy={"memory_layers": None, "memory_size": 65536, "last_context_length": 256, "top_k": None,
              "context_length": None}, cache="MemoryKVCache",
    from_window=lambda w: {"context_length": w}, subquadratic=False, validate=check_memory_options,
    fit=resolve_memory_options, layer_options=layer_options,
    plan=lambda n, chunk, o: memory_windows(n, o["context_length"], o["last_context_length"], chunk))
# (not in `longctx eval`'s strategy suite: a memory needs a model trained with it; its own table does that)
