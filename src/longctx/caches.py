"""Saving, loading and copying the prompt caches ``LongContextQwen3.make_cache()`` builds.

One file format, ours, end to end: a safetensors file holding every layer's
``state`` arrays (``"<layer>.<i>"``) and, in its metadata, each layer's class,
the kinds of its state's non-array parts and its ``meta_state``. mlx-lm's
``save_prompt_cache`` would write any cache with a ``state``, but its
``load_prompt_cache`` rebuilds only its own classes, its file layout is private
(it changed between the mlx-lm versions ``pyproject.toml`` allows), and since
0.32 it drops ``meta_state`` (a ``SinkKVCache`` would lose its ``tokens_seen``, a
``CompressedKVCache`` its offset and compressor). So:

* ``save_cache(path, cache)`` writes the file (``mx.save_safetensors``);
* ``load_cache(path, into)`` fills ``into``, fresh caches from the same
  ``LongContextQwen3`` (``long.make_cache()``): they carry what a file cannot
  hold (the layer's RoPE module, the memory layers' options), and their classes
  must be the ones saved, layer by layer, or ``ValueError``;
* ``copy_cache(cache, into)``: the same without the file. A copy shares no
  array object with the original: mlx-lm's caches write new entries in place
  (``keys[..., i:j, :] = k``), so sharing one would let a query write into a
  document's cache.

The torch mirror's caches (a transformers ``Cache`` of layers) go through the
same three functions: each layer's tensors (safetensors) and its scalars (the
file's metadata), restored into the layers of a fresh ``long.make_cache()``.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

META = "longctx_meta_state"


def save_cache(path, cache, metadata: dict[str, str] | None = None) -> None:
    """Write ``cache`` (MLX: one per layer; torch: a ``Cache``) to ``path`` (``.safetensors``), with
    ``metadata`` (str -> str)."""
    if not isinstance(cache, list):
        return _torch_save(path, cache, metadata or {})
    arrays, layers = {}, []
    for i, c in enumerate(cache):
        kinds = []
        for j, x in enumerate(c.state):
            if isinstance(x, mx.array):
                arrays[f"{i}.{j}"] = x
                kinds.append("array")
            else:  # None, or a Python scalar
                kinds.append(["value", x])
        layers.append({"class": type(c).__name__, "state": kinds, "meta": _meta(c)})
    mx.save_safetensors(str(path), arrays, {**(metadata or {}), META: json.dumps(layers)})


def load_cache(path, into) -> dict[str, str]:
    """Fill ``into`` (fresh caches of the saved classes) from ``path``; returns the saved metadata."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a saved cache")
    if not isinstance(into, list):
        return _torch_load(path, into)
    arrays, metadata = mx.load(str(path), return_metadata=True)
    if META not in metadata:
        raise ValueError(f"path {str(path)!r} is not a cache saved by longctx.caches.save_cache")
    layers = json.loads(metadata.pop(META))
    states = [tuple(arrays[f"{i}.{j}"] if kind == "array" else kind[1] for j, kind in enumerate(layer["state"]))
              for i, layer in enumerate(layers)]
    _fill(into, [layer["class"] for layer in layers], states, [layer["meta"] for layer in layers])
    return metadata


def copy_cache(cache, into):
    """Fill ``into`` (fresh caches of the same classes) with a copy of ``cache``; returns ``into``."""
    if not isinstance(cache, list):
        return _torch_fill(into, _torch_state(cache, clone=True))
    states = [tree_map(lambda x: mx.array(x) if isinstance(x, mx.array) else x, c.state) for c in cache]
    return _fill(into, [type(c).__name__ for c in cache], states, [_meta(c) for c in cache])


def _meta(c):
    meta = getattr(c, "meta_state", None)  # mlx-lm 0.32's caches have none
    return list(meta) if isinstance(meta, (tuple, list)) else meta


def _fill(into: list, classes: list[str], states: list, metas: list) -> list:
    names = [type(c).__name__ for c in into]
    if names != list(classes):
        raise ValueError(f"into must be fresh caches of the saved classes {list(classes)}, got {names}: make them "
                         "with the LongContextQwen3 (strategy and options) that made the saved ones")
    for c, state, meta in zip(into, states, metas):
        c.state = tuple(state) if isinstance(state, list) else state
        if meta:
            c.meta_state = tuple(meta)
    return into


# The torch mirror: a layer's state is its tensors and scalars (the rest, e.g. its RoPE module,
# comes with the fresh cache).
def _torch_state(cache, clone: bool = False) -> dict:
    import torch
    tensors, scalars = {}, {"classes": [type(cache).__name__, *(type(layer).__name__ for layer in cache.layers)]}
    for i, layer in enumerate(cache.layers):
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i}.{name}"] = value.detach().clone() if clone else value.detach().contiguous()
            elif value is None or isinstance(value, (bool, int, float, str, torch.device)):
                scalars[f"{i}.{name}"] = str(value) if isinstance(value, torch.device) else value
    return {"tensors": tensors, "scalars": scalars}


def _torch_fill(into, state: dict):
    import torch
    classes = [type(into).__name__, *(type(layer).__name__ for layer in into.layers)]
    if classes != state["scalars"]["classes"]:
        raise ValueError(f"into must be a fresh cache of the saved classes {state['scalars']['classes']}, got "
                         f"{classes}: make it with the LongContextQwen3 (strategy and options) that made the saved one")
    for key, value in state["scalars"].items():
        if key != "classes":
            i, name = key.split(".", 1)
            setattr(into.layers[int(i)], name, torch.device(value) if name == "device" else value)
    for key, value in state["tensors"].items():
        i, name = key.split(".", 1)
        layer = into.layers[int(i)]
        setattr(layer, name, value.to(getattr(layer, "device", None) or value.device))
    return into


def _torch_save(path, cache, metadata: dict) -> None:
    from safetensors.torch import save_file
    state = _torch_state(cache)
    save_file(state["tensors"], str(path), {**metadata, META: json.dumps(state["scalars"])})


def _torch_load(path: Path, into) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if META not in metadata:
        raise ValueError(f"path {str(path)!r} is not a saved torch cache")
    _torch_fill(into, {"tensors": tensors, "scalars": json.loads(metadata.pop(META))})
    return metadata


__all__ = ["copy_cache", "load_cache", "save_cache"]
