"""Conversations become prompts: Alpaca or the model's chat template, trimmed oldest first."""

from __future__ import annotations

import copy

import pytest

from app.llm.loader import LoadedModel
from app.llm.prompts import ALPACA_PREAMBLE, ChatTurn, PromptTooLong, build_prompt, render


def test_alpaca_layout_for_a_model_without_chat_template(tiny_model: LoadedModel) -> None:
    turns = [
        ChatTurn("system", "Answer briefly."),
        ChatTurn("user", "How many days of leave?"),
        ChatTurn("assistant", "Twenty."),
        ChatTurn("user", "And carry-over?"),
    ]
    assert render(tiny_model.tokenizer, turns) == (
        f"{ALPACA_PREAMBLE} Answer briefly.\n\n"
        "### Instruction:\nHow many days of leave?\n\n### Response:\nTwenty.\n\n"
        "### Instruction:\nAnd carry-over?\n\n### Response:\n"
    )


def test_chat_template_is_used_when_the_model_has_one(tiny_model: LoadedModel) -> None:
    tokenizer = copy.deepcopy(tiny_model.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    turns = [ChatTurn("system", "S"), ChatTurn("user", "Hi")]
    assert render(tokenizer, turns) == "<system>S<user>Hi<assistant>"


def test_history_is_trimmed_oldest_first_keeping_system_and_new_message(tiny_model: LoadedModel) -> None:
    tokenizer = tiny_model.tokenizer
    system = ChatTurn("system", "Be helpful.")
    history = []
    for i in range(20):
        history += [
            ChatTurn("user", f"Question {i} about travel expenses"),
            ChatTurn("assistant", f"Answer {i}"),
        ]
    newest = ChatTurn("user", "The newest question")
    everything = build_prompt(tokenizer, [system, *history, newest], max_prompt_tokens=100_000)
    assert everything.dropped_turns == 0
    budget = len(everything.token_ids) // 2
    trimmed = build_prompt(tokenizer, [system, *history, newest], max_prompt_tokens=budget)
    text = tokenizer.decode(trimmed.token_ids)
    assert len(trimmed.token_ids) <= budget
    assert trimmed.dropped_turns % 2 == 0 and trimmed.dropped_turns > 0  # whole exchanges
    assert "Be helpful." in text and "The newest question" in text
    assert "Question 0 " not in text and "Question 19 " in text


def test_a_message_that_cannot_fit_is_refused_with_its_size(tiny_model: LoadedModel) -> None:
    with pytest.raises(PromptTooLong, match=r"takes \d+ tokens, and at most 20 fit"):
        build_prompt(tiny_model.tokenizer, [ChatTurn("user", "word " * 200)], max_prompt_tokens=20)
