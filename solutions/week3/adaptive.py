"""Task 6: a conversation under a token budget (book chapter "Adaptive context").

A chat is a list of messages; the model sees them rendered by the chat
template. ``AdaptiveContextManager`` returns the prompt whose token count, by
the real tokenizer and with every special token of the template, is at most
``max_context - reserve_tokens`` (the reserve is room for the reply):

* if the whole conversation fits, it is returned verbatim;
* otherwise system messages and the current input stay verbatim, then the
  most recent turns (at most ``keep_recent_turns`` non-system messages, as
  many as fit), and every older turn is folded into one summary message at the
  place of the first one folded, cut to the room left (its first lines go
  first);
* if the verbatim parts alone do not fit, ``ContextOverflowError``.

Every candidate prompt is counted whole, never as a sum of parts: a template
adds tokens between messages, and BPE may merge across a boundary.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from longctx.checks import check_nonnegative_int, check_positive_int

SUMMARY_HEADER = "Summary of the earlier conversation:"
# Words that mark a decision, a plan, an obligation or importance (matched as word prefixes),
# and dates said in words (numbers already count).
DECISION = re.compile(r"\b(decid|agree|will\b|must\b|should\b|need|plan|chose|choose|confirm|approv|deadline|"
                      r"let's\b|going to\b|important|crucial|critical|essential|key\b|remember|note\b|"
                      r"priorit|require|urgent|never\b|always\b)", re.I)
DATE = re.compile(r"\b(today|tomorrow|tonight|yesterday|(mon|tues|wednes|thurs|fri|satur|sun)day|"
                  r"jan(uary)?|feb(ruary)?|march|april|june|july|aug(ust)?|sep(tember)?|oct(ober)?|"
                  r"nov(ember)?|dec(ember)?|next (week|month|year))\b", re.I)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")  # not inside "3.5" or "e.g.x"
LABEL = re.compile(r"^\s*\w+:\s+")  # "user: " in the folded text


class ContextOverflowError(ValueError):
    """The verbatim parts (system messages, current input, template) exceed the budget."""

    def __init__(self, needed: int, allowed: int):
        super().__init__(f"system messages and current_input need {needed} tokens, the budget allows {allowed} "
                         "(max_context - reserve_tokens)")
        self.needed, self.allowed = needed, allowed


class AdaptiveContextManager:
    """Fits a conversation into ``max_context - reserve_tokens`` tokens.

    ``tokenizer``: a Hugging Face tokenizer (``AutoTokenizer``, or the one
    ``mlx_lm.load`` returns); prompts are rendered with its chat template when
    it has one. Without a tokenizer, prompts are ``role: content`` lines and a
    token is a UTF-8 byte (what a byte-level model reads; an upper bound for
    byte-level BPE). ``summarizer(text) -> str`` folds the older turns, given
    as ``role: content`` lines; the default is extractive
    (``extract_key_points``, one ``- point`` line each).
    """

    def __init__(self, max_context: int = 32768, *, tokenizer=None, summarizer: Callable[[str], str] | None = None,
                 reserve_tokens: int = 0, keep_recent_turns: int = 4):
        self.max_context = check_positive_int("max_context", max_context)
        self.reserve_tokens = check_nonnegative_int("reserve_tokens", reserve_tokens)
        if self.reserve_tokens >= self.max_context:
            raise ValueError(f"reserve_tokens must be < max_context ({max_context}), got {reserve_tokens}")
        self.keep_recent_turns = check_nonnegative_int("keep_recent_turns", keep_recent_turns)
        if tokenizer is not None and not callable(getattr(tokenizer, "encode", None)):
            raise ValueError(f"tokenizer must have an encode method, got {type(tokenizer).__name__}")
        if summarizer is not None and not callable(summarizer):
            raise ValueError(f"summarizer must be callable or None, got {summarizer!r}")
        self.tokenizer = tokenizer
        self.summarizer = summarizer or self._extractive

    @property
    def budget(self) -> int:
        return self.max_context - self.reserve_tokens

    def render(self, messages: list[dict]) -> str:
        """The prompt for ``messages``, ending with the assistant's turn to speak."""
        tok = self.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.encode())
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return len(getattr(ids, "ids", ids))  # a list, or a `tokenizers.Encoding`

    def manage_context(self, conversation_history: list[dict], current_input: str) -> str:
        """The prompt for ``conversation_history`` + ``current_input`` (a user message), within the budget.

        Count whole rendered prompts (``self.render``, ``self._fits``), never sums of
        parts. Whole conversation if it fits; else ``ContextOverflowError`` if the system
        messages and the input alone do not; else keep the most recent turns that fit
        (at most ``keep_recent_turns``, at least one turn folded) and fold the older ones
        into one summary message (``self.summarizer``, its lines cut from the front to
        the room left) at the place of the first folded turn (``_assemble``,
        ``_summary``). About 25 lines."""
        history = _check_history(conversation_history)
        if not isinstance(current_input, str):
            raise ValueError(f"current_input must be a str, got {type(current_input).__name__}")
        # BEGIN SOLUTION
        current = {"role": "user", "content": current_input}
        fits = self._fits

        prompt = self.render([*history, current])
        if fits(prompt):
            return prompt
        systems = [m for m in history if m["role"] == "system"]
        needed = self.count_tokens(self.render([*systems, current]))
        if needed > self.budget:
            raise ContextOverflowError(needed, self.budget)

        # Most recent turns first: as many as fit, at most keep_recent_turns.
        turns = [i for i, m in enumerate(history) if m["role"] != "system"]
        keep = min(self.keep_recent_turns, len(turns) - 1)  # the whole history did not fit: fold at least one
        while keep > 0 and not fits(self.render(_assemble(history, turns[len(turns) - keep:], None, current))):
            keep -= 1
        folded = turns[:len(turns) - keep]
        kept = turns[len(turns) - keep:]

        text = "".join(f"{history[i]['role']}: {history[i]['content']}\n" for i in folded)
        lines = [line for line in self.summarizer(text).splitlines() if line.strip()]
        # The longest tail of the summary that fits (tokens grow with the lines kept).
        lo, hi = 0, len(lines)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(self.render(_assemble(history, kept, _summary(lines[-mid:], folded[0]), current))):
                lo = mid
            else:
                hi = mid - 1
        summary = _summary(lines[len(lines) - lo:], folded[0]) if lo else None
        return self.render(_assemble(history, kept, summary, current))
        # END SOLUTION

    def extract_key_points(self, text: str) -> list[str]:
        """Sentences worth keeping, in order, each once: questions, and sentences with a
        number, a date in words (``Friday``, ``tomorrow``, ``March``), a decision or
        importance word (``decided``, ``will``, ``must``, ``plan``, ``important`` ...) or a
        name (a capitalised word that does not start the sentence). Split with
        ``SENTENCE_END``; ``LABEL`` strips a ``role:`` prefix; ``DECISION`` and ``DATE``
        match the words. About 12 lines."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        # BEGIN SOLUTION
        points, seen = [], set()
        for sentence in SENTENCE_END.split(text):
            sentence = sentence.strip()
            body = LABEL.sub("", sentence)
            words = re.findall(r"[A-Za-z][\w'-]*", body)
            key = (sentence.endswith("?") or any(c.isdigit() for c in body) or DECISION.search(body)
                   or DATE.search(body)
                   or any(w[0].isupper() and w not in ("I", "I'm", "I'll", "I've", "I'd") for w in words[1:]))
            norm = " ".join(sentence.lower().split())
            if key and norm not in seen:
                seen.add(norm)
                points.append(sentence)
        return points
        # END SOLUTION

    def _fits(self, prompt: str) -> bool:
        return self.count_tokens(prompt) <= self.budget

    def _extractive(self, text: str) -> str:
        return "\n".join(f"- {point}" for point in self.extract_key_points(text))


def _summary(lines: list[str], at: int) -> tuple[int, dict]:
    return at, {"role": "system", "content": "\n".join([SUMMARY_HEADER, *lines])}


def _assemble(history: list[dict], kept: list[int], summary: tuple[int, dict] | None, current: dict) -> list[dict]:
    """System messages and the kept turns in their order, the summary at its place, then the current input."""
    out, kept = [], set(kept)
    for i, m in enumerate(history):
        if summary is not None and i == summary[0]:
            out.append(summary[1])
        if m["role"] == "system" or i in kept:
            out.append(m)
    return [*out, current]


def _check_history(history) -> list[dict]:
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"conversation_history must be a list of messages, got {type(history).__name__}")
    for i, m in enumerate(history):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"conversation_history[{i}] must be a dict with str 'role' and 'content', got {m!r}")
    return list(history)


def llm_summarizer(model, tokenizer, *, max_tokens: int = 128) -> Callable[[str], str]:
    """A ``summarizer`` that asks the model itself (an mlx-lm model and its tokenizer,
    as ``mlx_lm.load`` returns them), greedy, through ``mlx_lm.generate``."""
    from mlx_lm import generate
    max_tokens = check_positive_int("max_tokens", max_tokens)

    def summarize(text: str) -> str:
        request = [{"role": "user", "content": "Summarize the key facts, names, numbers and decisions of this "
                                               f"conversation as short bullet points:\n\n{text}"}]
        prompt = tokenizer.apply_chat_template(request, tokenize=False, add_generation_prompt=True)
        return generate(model, tokenizer, prompt, max_tokens=max_tokens, verbose=False)
    return summarize


__all__ = ["AdaptiveContextManager", "ContextOverflowError", "llm_summarizer"]
