"""Synthetic long-context tasks, built in token ids so a prompt is exactly ``length`` tokens.

One builder per task, shared by the training mix of the shipped model
(``longctx.data.mix``) and the evaluation suite (``longctx.eval``):

* ``passkey``: Landmark Attention's prompt (Mohtashami & Jaggi, 2023): a
  passkey sentence hidden at ``depth`` in repeated filler, then the question.
* ``needle``: needle-in-a-haystack: "The special magic number is N." inside
  the shipped public-domain text.
* ``kv_recall``: ``pairs`` key-value lines, then one key asked for; the
  Lost-in-the-Middle sweep moves the asked pair through the context.
* ``copy``: a random string, then "Again:" and the same string.

Every prompt starts with ``<|endoftext|>`` (the model was trained with it at
the start of each example: it is the attention sink StreamingLLM keeps).
The answer is scored on the greedy continuation: ``Prompt.score(text)``.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from longctx.checks import check_positive_int

BOS = "<|endoftext|>"
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                  "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {}. Remember it. {} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
NEEDLE = " The special magic number is {}."
NEEDLE_QUESTION = " What is the special magic number? The special magic number is"
KV_QUESTION = " What is the value of key {}? The value of key {} is"
COPY_PROMPT, COPY_AGAIN = " Copy this:", " Again:"
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class Prompt:
    """``ids`` (exactly the requested length), the ``answer`` text and where the needle sits."""
    ids: list[int]
    answer: str
    needle_at: int = -1  # token index of the needle's first token (-1: no needle)

    def score(self, text: str) -> float:
        """1.0 when the continuation starts with the whole answer (leading spaces ignored; the
        answer must end there: "714321" does not answer "71432"), else 0.0."""
        return float(re.match(re.escape(self.answer) + r"(?![0-9A-Za-z])", text.strip()) is not None)


@functools.cache
def _encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


@functools.cache
def _sentences(tokenizer) -> list[tuple[int, ...]]:
    from longctx.data import corpus
    text = " ".join(" ".join(corpus()).split())
    return [_encode(tokenizer, " " + s) for s in re.split(r"(?<=[.;:])\s+", text) if s]


def _haystack(tokenizer, units, n: int, depth: float, needle: tuple[int, ...], start: int = 0):
    """``n`` tokens: ``units`` cycled from ``start`` (the first one cut from the front, so the
    text before the question ends whole), with ``needle`` between two units, at the boundary
    nearest ``depth`` of the way in. Returns (ids, needle index)."""
    if len(needle) > n:
        raise ValueError(f"length is too short for the task: the needle alone needs {len(needle)} tokens, "
                         f"{n} left")
    room, ids, bounds, i = n - len(needle), [], [0], start
    while len(ids) < room:
        ids.extend(units[i % len(units)])
        bounds.append(len(ids))
        i += 1
    cut = len(ids) - room
    ids, bounds = ids[cut:], [0] + [b - cut for b in bounds if b > cut]
    at = min(bounds, key=lambda b: abs(b - depth * room))
    return ids[:at] + list(needle) + ids[at:], at


def _check(length: int, depth: float) -> tuple[int, float]:
    length = check_positive_int("length", length)
    if not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    return length, float(depth)


def _framed(tokenizer, length, head: str, tail: str, units, depth, needle, start=0) -> tuple[list[int], int]:
    head_ids, tail_ids = [tokenizer.convert_tokens_to_ids(BOS), *_encode(tokenizer, head)], _encode(tokenizer, tail)
    body, at = _haystack(tokenizer, units, length - len(head_ids) - len(tail_ids), depth, needle, start)
    return head_ids + body + list(tail_ids), len(head_ids) + at


def passkey(tokenizer, length: int, depth: float, key: int) -> Prompt:
    """Landmark Attention's passkey prompt of exactly ``length`` tokens; ``key`` a 5-digit number."""
    length, depth = _check(length, depth)
    if not isinstance(key, (int, np.integer)) or not 10_000 <= key <= 99_999:
        raise ValueError(f"key must be a 5-digit integer, got {key!r}")
    needle = _encode(tokenizer, PASSKEY_NEEDLE.format(key, key))
    ids, at = _framed(tokenizer, length, PASSKEY_PREFIX, PASSKEY_QUESTION, [_encode(tokenizer, FILLER)], depth,
                      needle)
    return Prompt(ids, str(key), at)


def needle(tokenizer, length: int, depth: float, value: int, start: int = 0) -> Prompt:
    """The magic-number needle at ``depth`` in the shipped text (cycled from sentence ``start``)."""
    length, depth = _check(length, depth)
    if not isinstance(value, (int, np.integer)) or not 10_000 <= value <= 99_999:
        raise ValueError(f"value must be a 5-digit integer, got {value!r}")
    ids, at = _framed(tokenizer, length, "", NEEDLE_QUESTION, _sentences(tokenizer), depth,
                      _encode(tokenizer, NEEDLE.format(value)), start)
    return Prompt(ids, str(value), at)


def kv_recall(tokenizer, pairs: int, asked: int, rng: np.random.Generator) -> Prompt:
    """``pairs`` lines " key abc is 123." with distinct 3-letter keys; the question asks line ``asked``."""
    pairs = check_positive_int("pairs", pairs)
    if not isinstance(asked, (int, np.integer)) or not 0 <= asked < pairs:
        raise ValueError(f"asked must be in [0, pairs={pairs}), got {asked!r}")
    keys = []
    while len(keys) < pairs:
        key = "".join(rng.choice(list(ALPHABET[:26]), 3))
        if key not in keys:
            keys.append(key)
    values = [str(v) for v in rng.integers(100, 1000, pairs)]
    ids = [tokenizer.convert_tokens_to_ids(BOS)]
    for i, (key, value) in enumerate(zip(keys, values)):
        if i == asked:
            at = len(ids)
        ids.extend(_encode(tokenizer, f" key {key} is {value}."))
    ids.extend(_encode(tokenizer, KV_QUESTION.format(keys[asked], keys[asked])))
    return Prompt(ids, values[asked], at)


def copy(tokenizer, chars: int, rng: np.random.Generator) -> Prompt:
    """A random string of ``chars`` letters and digits; the answer repeats it."""
    text = "".join(rng.choice(list(ALPHABET), check_positive_int("chars", chars)))
    ids = [tokenizer.convert_tokens_to_ids(BOS), *_encode(tokenizer, f"{COPY_PROMPT} {text}.{COPY_AGAIN}")]
    return Prompt(ids, text, 0)


def text(tokenizer, length: int, start: int = 0) -> list[int]:
    """``length`` tokens of the shipped public-domain text, from sentence ``start`` on (cycled)."""
    ids, _ = _framed(tokenizer, check_positive_int("length", length), "", "", _sentences(tokenizer), 0.0, (), start)
    return ids


def greedy_answer(long_model, tokenizer, prompt: Prompt) -> str:
    """The greedy continuation of ``prompt``, as long as its answer plus one token."""
    n = len(tokenizer.encode(" " + prompt.answer, add_special_tokens=False)) + 1
    return tokenizer.decode(list(long_model.generate(prompt.ids, n)))


__all__ = ["Prompt", "copy", "greedy_answer", "kv_recall", "needle", "passkey", "text"]
