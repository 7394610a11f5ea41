"""The mlx-lm cache protocol, written once for the course's own MLX caches.

mlx-lm's model calls ``cache.update_and_fetch(keys, values)`` and builds its
mask with ``cache.make_mask(N, ...)``; ``save_prompt_cache`` and
``load_prompt_cache`` read and write ``state`` (arrays) and ``meta_state``
(strings); ``generate`` asks ``is_trimmable`` and ``nbytes``. ``LongCache``
gives every method but the technique's own: a subclass writes
``update_and_fetch``, its ``state`` (getter and setter) and ``size`` (entries
held), names its integer settings in ``META`` (their values, as strings, are
``meta_state``), and overrides what differs (a cache whose next position is not
its size keeps ``offset`` apart from it). It does not subclass mlx-lm's private
``_BaseCache``: the protocol is duck-typed, and private names move between the
mlx-lm versions ``pyproject.toml`` allows.
"""
from __future__ import annotations

from mlx_lm.models.cache import create_attention_mask


class LongCache:
    META: tuple[str, ...] = ()  # integer attributes saved as meta_state, in order

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """Causal mask for ``N`` new entries after what is held (the cached entries all precede them)."""
        return create_attention_mask(N, offset=self.size(), return_array=return_array, window_size=window_size)

    def empty(self) -> bool:
        return all(a is None for a in self.state)

    def is_trimmable(self) -> bool:
        return False  # entries are evicted, moved or compressed: the last n cannot simply be dropped

    @property
    def meta_state(self):
        return tuple(str(getattr(self, name)) for name in self.META)

    @meta_state.setter
    def meta_state(self, v):
        for name, value in zip(self.META, v, strict=True):
            setattr(self, name, int(value))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state if a is not None)


__all__ = ["LongCache"]
