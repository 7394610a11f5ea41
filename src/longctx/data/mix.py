"""The training mix of the shipped model, and held-out rows of it.

Every row is examples packed back to back, each starting with ``<|endoftext|>``:
passkey retrieval (Landmark Attention's format), needle-in-a-haystack in the
shipped text, key-value recall, copying (``longctx.data.tasks``), repeats
(random ids, then the same ids again) and the shipped text, at random lengths,
depths and keys. The curriculum's first stages add ``induction`` examples: a
repeat with random ids between the two copies. The loss counts every token a
model could predict: not the random first copy of a repeat or an induction
example, nor a copy prompt with its random string (``batch`` returns these
loss weights). ``longctx train-tiny`` draws its rows from
``numpy.random.default_rng(seed)``; ``heldout_rows`` draws with seeds training
never uses, for the objectives that must not reward memory (Task 9's search
and its perplexity columns).
"""
from __future__ import annotations

import numpy as np

from longctx.checks import check_positive_int
from longctx.data import tasks
from longctx.data import SPECIAL_TOKENS

HELDOUT_SEED = 1_000_000  # training draws from default_rng(seed) with small seeds

MIX = {"repeat": 0.25, "passkey": 0.25, "needle": 0.1, "kv_recall": 0.2, "copy": 0.15, "text": 0.05}


def example(tokenizer, rng: np.random.Generator, max_len: int, mix: dict = MIX) -> tuple[list[int], list[int]]:
    """One training example (prompt and answer, or plain text) of at most ``max_len`` tokens, and
    its loss weights: 0 on the tokens no model can predict from what came before, where a
    copying example has them (the first copy of a ``repeat``, and of ``induction``; the prompt of
    ``copy``, its random string), 1 on every other token."""
    kind = rng.choice(list(mix), p=list(mix.values()))
    if kind == "induction":
        return induction(tokenizer, rng, max_len)
    ids, learnable = _example(tokenizer, rng, max_len, kind)
    return ids, [0] * (len(ids) - learnable) + [1] * learnable


def _example(tokenizer, rng: np.random.Generator, max_len: int, kind: str) -> tuple[list[int], int]:
    """``kind``'s ids, and how many at the end the loss counts (all, except for ``repeat`` and ``copy``)."""
    key = int(rng.integers(10_000, 100_000))
    if kind == "repeat":
        ids = repeat(tokenizer, rng, int(rng.integers(2, max(3, min(160, max_len // 2)))))
        return ids, len(ids) // 2 - 1  # the copy after its first token
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
        ids = tasks.text(tokenizer, int(rng.integers(32, max_len)), start=int(rng.integers(1000)))
        return ids, len(ids)
    answer = tasks._encode(tokenizer, " " + p.answer + ".")
    ids = (p.ids + list(answer))[:max_len]
    return ids, max(0, len(ids) - len(p.ids)) if kind == "copy" else len(ids)  # copy: only its answer


def repeat(tokenizer, rng: np.random.Generator, n: int) -> list[int]:
    """``<|endoftext|>``, ``n`` random ordinary ids, then the same ``n`` ids again."""
    ids = rng.integers(len(SPECIAL_TOKENS), len(tokenizer), n).tolist()
    return [tokenizer.convert_tokens_to_ids(tasks.BOS), *ids, *ids]


def induction(tokenizer, rng: np.random.Generator, max_len: int) -> tuple[list[int], list[int]]:
    """``<|endoftext|>``, ``n`` random ids, ``g`` other random ids, the same ``n`` ids again (at most
    ``max_len`` tokens; ``n`` and ``g`` at random), and loss weights that are 1 only on the copy's
    tokens after its first: the tokens a model can predict, and only by finding the earlier
    occurrence of the current token and copying what followed it (an induction head). The gap makes
    the distance vary, so no fixed positional offset predicts them; the weights leave out the
    ~ln(vocab) loss of the unpredictable ids, which otherwise drowns the copying signal."""
    n = int(rng.integers(4, max(5, max_len // 2)))
    g = int(rng.integers(0, max(1, max_len - 2 * n)))
    lo, hi = len(SPECIAL_TOKENS), len(tokenizer)
    ids, gap = rng.integers(lo, hi, n).tolist(), rng.integers(lo, hi, g).tolist()
    weights = [0] * (n + 1 + g + 1) + [1] * (n - 1)
    return [tokenizer.convert_tokens_to_ids(tasks.BOS), *ids, *gap, *ids], weights


def batch(tokenizer, rng: np.random.Generator, size: int, seq_len: int, mix: dict = MIX,
          weights: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``(size, seq_len + 1)`` token rows, each examples packed back to back (the last one cut);
    with ``weights``, also the ``(size, seq_len + 1)`` loss weights of those tokens (``example``)."""
    rows = np.empty((size, seq_len + 1), dtype=np.int32)
    masks = np.empty((size, seq_len + 1), dtype=np.float32)
    for r in range(size):
        ids, mask = [], []
        while len(ids) < seq_len + 1:
            more, more_mask = example(tokenizer, rng, seq_len + 1, mix)
            ids.extend(more)
            mask.extend(more_mask)
        rows[r], masks[r] = ids[:seq_len + 1], mask[:seq_len + 1]
    return (rows, masks) if weights else rows


def heldout_rows(tokenizer, length: int, count: int, seed: int = 0) -> np.ndarray:
    """``(count, length + 1)`` rows of ``MIX`` drawn with ``default_rng(HELDOUT_SEED + seed)``."""
    if check_positive_int("length", length) < 256:
        raise ValueError(f"length must be >= 256 for rows of the training mix (a passkey prompt alone is ~150 "
                         f"tokens), got {length}")
    return batch(tokenizer, np.random.default_rng(HELDOUT_SEED + seed), check_positive_int("count", count), length)


__all__ = ["HELDOUT_SEED", "MIX", "batch", "example", "heldout_rows", "induction", "repeat"]
