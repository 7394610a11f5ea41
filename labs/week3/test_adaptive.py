"""Graded tests, Task 6: a conversation under a token budget.

Run: ``pytest labs/week3 --task 6`` (your stubs), ``--impl solutions`` or
``--impl torch``. The tokenizer is the tiny checkpoint's (a byte-level BPE
with Qwen3's ChatML template, ``longctx.models.tiny_tokenizer``). The oracle
is the template itself: every prompt is parsed back into messages, matched
against the conversation, and counted with the tokenizer, special tokens
included.
"""
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx.models import tiny_tokenizer

pytestmark = pytest.mark.task(6)

BLOCK = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.S)
SENTENCES = ["We meet at 10 am on Monday.", "Maria will bring the slides.", "The budget is 4,500 dollars.",
             "Can you book the room?", "ok.", "That sounds fine to me.", "We decided to ship version 2.",
             "The weather was nice.", "Please send the notes to Ahmed.", "Thanks!", "Why is the build red?",
             "It was a long day, but a good one.", "Remember the deadline: June 3."]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def manager(lab, max_context, tok, **kw):
    return lab("adaptive").AdaptiveContextManager(max_context, tokenizer=tok, **kw)


def render(tok, messages):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def count(tok, text):
    return len(tok.encode(text, add_special_tokens=False))


def parse(prompt):
    """The prompt's messages, checking it is exactly ChatML blocks then the assistant's turn."""
    blocks = list(BLOCK.finditer(prompt))
    assert "".join(b.group() for b in blocks) + "<|im_start|>assistant\n" == prompt, \
        f"the prompt must be the tokenizer's chat template rendering, got {prompt!r}"
    return [{"role": b.group(1), "content": b.group(2)} for b in blocks]


def match(parsed, originals):
    """Greedy in-order match: (indices of the originals kept, parsed messages that are none of them)."""
    kept, extra, j = [], [], 0
    for m in parsed:
        k = next((i for i in range(j, len(originals)) if originals[i] == m), None)
        if k is None:
            extra.append(m)
        else:
            kept.append(k)
            j = k + 1
    return kept, extra


def conversation(n, seed=0, system_every=0):
    msgs = [{"role": "system", "content": "You are a helpful assistant. Keep answers short."}]
    for i in range(n):
        role = "system" if system_every and i % system_every == system_every - 1 else ("user", "assistant")[i % 2]
        msgs.append({"role": role, "content": " ".join(SENTENCES[(seed + i * j) % len(SENTENCES)]
                                                       for j in range(1, 4))})
    return msgs


def test_conversation_that_fits_is_rendered_whole(lab, tok):
    history = conversation(6)
    want = render(tok, [*history, {"role": "user", "content": "And then?"}])
    got = manager(lab, count(tok, want), tok).manage_context(history, "And then?")
    assert got == want, "a conversation that fits exactly must come back verbatim, with no summary"


def test_folds_old_turns_and_keeps_recent_ones(lab, tok):
    history = conversation(20)
    current = "What did we decide?"
    m = manager(lab, 300, tok, keep_recent_turns=3)
    prompt = m.manage_context(history, current)
    assert count(tok, prompt) <= 300
    parsed = parse(prompt)
    kept, extra = match(parsed, [*history, {"role": "user", "content": current}])
    assert kept == [0, 18, 19, 20, 21], f"expected the system message, the last 3 turns and the input, got {kept}"
    assert len(extra) == 1 and parsed[1] is extra[0], "one summary, at the place of the first folded turn"
    assert any(s.rstrip(".") in extra[0]["content"] for s in SENTENCES[:3]), \
        f"the summary should carry the key points, got {extra[0]['content']!r}"


def test_reserve_tokens_leave_room_for_the_reply(lab, tok):
    history = conversation(12)
    for reserve in (0, 40, 100):
        prompt = manager(lab, 300, tok, reserve_tokens=reserve).manage_context(history, "Next?")
        assert count(tok, prompt) <= 300 - reserve, f"reserve_tokens={reserve}: over budget"


def test_overflow_says_needed_and_allowed(lab, tok):
    history = conversation(4)
    current = "Please summarise everything we said about the budget and the slides. " * 5
    needed = count(tok, render(tok, [history[0], {"role": "user", "content": current}]))
    module = lab("adaptive")
    with pytest.raises(module.ContextOverflowError) as err:
        manager(lab, needed + 10, tok, reserve_tokens=11).manage_context(history, current)
    assert isinstance(err.value, ValueError)
    assert str(needed) in str(err.value) and str(needed - 1) in str(err.value), \
        f"the message must say {needed} tokens needed and {needed - 1} allowed: {err.value}"
    assert manager(lab, needed, tok).manage_context(history, current).endswith(
        f"{current}<|im_end|>\n<|im_start|>assistant\n"), "verbatim parts that fit exactly must not raise"


def test_custom_summarizer_gets_the_folded_turns_in_order(lab, tok):
    history = conversation(10, seed=3)
    seen = []

    def summarizer(text):
        seen.append(text)
        return "SUMMARY-LINE"
    prompt = manager(lab, 240, tok, summarizer=summarizer, keep_recent_turns=2).manage_context(history, "Go on.")
    assert len(seen) == 1, "the summarizer is called once per prompt"
    kept, extra = match(parse(prompt), [*history, {"role": "user", "content": "Go on."}])
    folded = [history[i]["content"] for i in range(1, len(history)) if i not in kept]
    where = [seen[0].find(c) for c in folded]
    assert -1 not in where and where == sorted(where), "the summarizer must get every folded turn, in order"
    assert len(extra) == 1 and "SUMMARY-LINE" in extra[0]["content"]


def test_extract_key_points(lab):
    m = lab("adaptive").AdaptiveContextManager(1000)
    text = ("The weather was nice. We meet at 10 am. Then we talked to Maria. ok. "
            "We decided to go by train. Can you book it? we meet at 10 am.\nThanks! I agree.")
    assert m.extract_key_points(text) == [
        "We meet at 10 am.", "Then we talked to Maria.", "We decided to go by train.", "Can you book it?",
        "I agree."], "numbers, names, decisions and questions; each once (case and spaces aside), in order"
    assert m.extract_key_points("") == [] and m.extract_key_points("fine. ok. sure.") == []


def test_without_a_tokenizer_counts_bytes(lab):
    m = lab("adaptive").AdaptiveContextManager(400)
    history = conversation(10)
    prompt = m.manage_context(history, "Summarise, please.")
    assert len(prompt.encode()) <= 400, "without a tokenizer a token is a UTF-8 byte"
    assert history[0]["content"] in prompt and "Summarise, please." in prompt


@pytest.mark.parametrize("fit", [1, 2, 3, 5])
def test_keeps_exactly_as_many_recent_turns_as_fit(lab, tok, fit):
    """A budget that holds the system message, the last ``fit`` turns and the input, and not one turn
    more: those ``fit`` turns are kept verbatim (``keep_recent_turns=5`` allows up to 5 of the 6)."""
    history = conversation(6, 7)
    cur = {"role": "user", "content": "What next?"}
    budget = count(tok, render(tok, [history[0], *history[-fit:], cur]))
    assert count(tok, render(tok, [history[0], *history[-fit - 1:], cur])) > budget
    prompt = manager(lab, budget, tok, keep_recent_turns=5).manage_context(history, cur["content"])
    kept, _ = match(parse(prompt), [*history, cur])
    assert [i for i in kept if 0 < i < len(history)] == list(range(len(history) - fit, len(history))), \
        f"with room for exactly the last {fit} turns, keep those {fit}: not fewer, not others"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 14), seed=st.integers(0, 50), system_every=st.sampled_from([0, 0, 3, 5]),
       budget=st.integers(20, 500), reserve=st.integers(0, 19), keep=st.integers(0, 5),
       current=st.sampled_from(SENTENCES + ["", "Short?", " ".join(SENTENCES)]))
def test_properties_on_random_conversations(lab, tok, n, seed, system_every, budget, reserve, keep, current):
    """Never over budget; system messages and the input verbatim; order kept; the most recent turns, as
    many as fit up to keep_recent_turns; one summary at most, only when something was folded;
    deterministic; ContextOverflowError exactly when the verbatim parts cannot fit."""
    history = conversation(n, seed, system_every)
    cur = {"role": "user", "content": current}
    allowed = budget  # max_context - reserve_tokens
    m = manager(lab, budget + reserve, tok, reserve_tokens=reserve, keep_recent_turns=keep)
    systems = [msg for msg in history if msg["role"] == "system"]
    needed = count(tok, render(tok, [*systems, cur]))
    if needed > allowed:
        with pytest.raises(lab("adaptive").ContextOverflowError):
            m.manage_context(history, current)
        return
    prompt = m.manage_context(history, current)
    assert prompt == m.manage_context(history, current), "not deterministic"
    assert count(tok, prompt) <= allowed, f"{count(tok, prompt)} tokens, budget {allowed}"
    originals = [*history, cur]
    parsed = parse(prompt)
    kept, extra = match(parsed, originals)
    assert kept[-1] == len(history) and parsed[-1] == cur, "the current input must be last, verbatim"
    assert all(i in kept for i, msg in enumerate(history) if msg["role"] == "system"), "a system message was lost"
    turns = [i for i, msg in enumerate(history) if msg["role"] != "system"]
    kept_turns = [i for i in kept if i in turns]
    assert kept_turns == turns[len(turns) - len(kept_turns):], "the turns kept must be the most recent ones"
    dropped = len(kept_turns) < len(turns)
    if not dropped:
        assert prompt == render(tok, originals), "nothing was folded: the whole conversation, verbatim"
        return
    assert len(extra) <= 1, f"at most one summary message, got {extra}"
    assert len(kept_turns) <= keep, "at most keep_recent_turns turns verbatim once something is folded"
    if len(kept_turns) < min(keep, len(turns) - 1):
        more = set(turns[len(turns) - len(kept_turns) - 1:])
        bigger = [msg for i, msg in enumerate(history) if msg["role"] == "system" or i in more]
        assert count(tok, render(tok, [*bigger, cur])) > allowed, "one more recent turn would have fit"


def test_llm_summarizer_plumbing(lab, tok, tiny_models):
    """The model-written summary (the tiny model writes noise: this checks the plumbing, not the prose)."""
    model, _, _ = tiny_models(vocab_size=len(tok))
    calls = []
    summarize = lab("adaptive").llm_summarizer(model, tok, max_tokens=6)

    def spy(text):
        calls.append(summarize(text))
        return calls[-1]
    history = conversation(12)
    prompt = manager(lab, 240, tok, summarizer=spy, keep_recent_turns=2).manage_context(history, "Go on.")
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert count(tok, prompt) <= 240
