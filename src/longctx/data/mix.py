"""The training mix of the shipped model, and held-out rows of it.

Every row is examples packed back to back, each starting with ``<|endoftext|>``:
passkey retrieval (Landmark Attention's format), needle-in-a-haystack in the
shipped text, key-value recall, copying (``longctx.data.tasks``), repeats
(random ids, then the same ids again) and the shipped text, at random lengths,
depths and keys. ``longctx train-tiny`` draws its rows from
``numpy.random.default_rng(seed)``; ``heldout_rows`` draws with seeds training
never uses, for the objectives that must not reward memory (Task 9's search
and its perplexity columns).
"""
from __future__ import annotations

import numpy as np

from longctx.checks import check_positive_int
from longctx.data import tasks
from longctx.models.checkpoint import SPECIAL_TOKENS

HELDOUT_SEED = 1_000_000  # training draws from default_rng(seed) with small seeds

MIX = {"repeat": 0.25, "passkey": 0.25, "needle": 0.1, "kv_recall": 0.2, "copy": 0.15, "text": 0.05}


def example(tokenizer, rng: np.random.Generator, max_len: int, mix: dict = MIX) -> list[int]:
    """One training example (prompt and answer, or plain text) of at most ``max_len`` tokens."""
    kind = rng.choice(list(mix), p=list(mix.values()))
    key = int(rng.integers(10_000, 100_000))
    if kind == "repeat":
        return repeat(tokenizer, rng, int(rng.integers(2, max(3, min(160, max_len // 2)))))
    if kind == "passkey":
        p = tasks.passkey(tokenizer, int(rng.integers(150, max_len - 6)), float(rng.random()), key)
    elif kind == "needle":
        p = tasks.needle(tokenizer, int(rng.integers(64, max_len - 6)), float(rng.random()), key,
                         start=int(rng.integers(1000)))
    elif kind == "kv_recall":
        pairs = int(rng.integers(2, max(3, min(48, (max_len - 24) // 10))))
        p = tasks.kv_recall(tokenizer, pairs, int(rng.integers(pairs)), rng)
    elif kind == "copy":
        p = tasks.copy(tokenizer, int(rng.integers(4, max(5, min(100, (max_len - 14) // 2)))), rng)
    else:
        return tasks.text(tokenizer, int(rng.integers(32, max_len)), start=int(rng.integers(1000)))
    answer = tasks._encode(tokenizer, " " + p.answer + ".")
    return (p.ids + list(answer))[:max_len]


def repeat(tokenizer, rng: np.random.Generator, n: int) -> list[int]:
    """``<|endoftext|>``, ``n`` random ordinary ids, then the same ``n`` ids again."""
    ids = rng.integers(len(SPECIAL_TOKENS), len(tokenizer), n).tolist()
    return [tokenizer.convert_tokens_to_ids(tasks.BOS), *ids, *ids]


def batch(tokenizer, rng: np.random.Generator, size: int, seq_len: int, mix: dict = MIX) -> np.ndarray:
    """``(size, seq_len + 1)`` token rows, each examples packed back to back (the last one cut)."""
    rows = np.empty((size, seq_len + 1), dtype=np.int32)
    for r in range(size):
        ids = []
        while len(ids) < seq_len + 1:
            ids.extend(example(tokenizer, rng, seq_len + 1, mix))
        rows[r] = ids[:seq_len + 1]
    return rows


def heldout_rows(tokenizer, length: int, count: int, seed: int = 0) -> np.ndarray:
    """``(count, length + 1)`` rows of ``MIX`` drawn with ``default_rng(HELDOUT_SEED + seed)``."""
    if check_positive_int("length", length) < 256:
        raise ValueError(f"length must be >= 256 for rows of the training mix (a passkey prompt alone is ~150 "
                         f"tokens), got {length}")
    return batch(tokenizer, np.random.default_rng(HELDOUT_SEED + seed), check_positive_int("count", count), length)


__all__ = ["HELDOUT_SEED", "MIX", "batch", "example", "heldout_rows", "repeat"]
