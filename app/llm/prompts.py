"""Turn a conversation into prompt token ids that fit the model's context window.

A model with a chat template gets it; one without (Falcon-7B and the demo model) gets the
Alpaca "### Instruction / ### Response" layout that finance-alpaca and our training data use,
so the served prompt matches what the adapters were trained on. History is trimmed oldest
turn first; the system prompt and the new message are never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant for the employees of this company."

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    content: str


class PromptTooLong(ValueError):
    """Even the system prompt and the new message alone do not fit; the message says by how much."""


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    dropped_turns: int  # history turns left out to fit the window


def format_alpaca_example(instruction: str, input_text: str = "", response: str = "") -> str:
    """One Alpaca record as the model sees it, up to and including `response`.

    Training formats records with this too, so serving and training agree to the character.
    """
    text = f"### Instruction:\n{instruction.strip()}\n\n"
    if input_text.strip():
        text += f"### Input:\n{input_text.strip()}\n\n"
    return text + f"### Response:\n{response}"


def alpaca_header(system: str) -> str:
    """The text before the first instruction: the Alpaca preamble and the system prompt."""
    return f"{ALPACA_PREAMBLE} {system}".strip() + "\n\n"


def render_alpaca(turns: Sequence[ChatTurn]) -> str:
    system = next((t.content for t in turns if t.role == "system"), "")
    parts = [alpaca_header(system)]
    dialogue = [t for t in turns if t.role != "system"]
    for index, turn in enumerate(dialogue):
        if turn.role == "user":
            reply = ""
            if index + 1 < len(dialogue) and dialogue[index + 1].role == "assistant":
                reply = dialogue[index + 1].content.strip() + "\n\n"
            parts.append(format_alpaca_example(turn.content, response=reply))
    return "".join(parts)


def render(tokenizer: Any, turns: Sequence[ChatTurn], template: str | None = None) -> str:
    """The prompt text: `template` "alpaca" or "chat_template" as an adapter was trained, or by the model."""
    if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the adapter expects the model's chat template, but this model has none")
    if template != "alpaca" and getattr(tokenizer, "chat_template", None):
        messages = [{"role": t.role, "content": t.content} for t in turns]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return render_alpaca(turns)


def build_prompt(
    tokenizer: Any, turns: Sequence[ChatTurn], *, max_prompt_tokens: int, template: str | None = None
) -> Prompt:
    """Encode `turns` (ending with the new user message), dropping the oldest history to fit."""
    if not turns or turns[-1].role != "user":
        raise ValueError("a prompt must end with a user message")
    system = [t for t in turns[:1] if t.role == "system"]
    history = list(turns[len(system) : -1])
    newest = turns[-1]
    dropped = 0
    while True:
        ids = tokenizer.encode(
            render(tokenizer, [*system, *history, newest], template), add_special_tokens=False
        )
        if len(ids) <= max_prompt_tokens:
            return Prompt(token_ids=ids, dropped_turns=dropped)
        if not history:
            raise PromptTooLong(
                f"the message is too long: with the system prompt it takes {len(ids)} tokens, "
                f"and at most {max_prompt_tokens} fit beside the reply; shorten it or ask for fewer tokens"
            )
        # Drop a whole exchange (the user turn and the reply to it) at a time.
        cut = 2 if len(history) > 1 and history[0].role == "user" and history[1].role == "assistant" else 1
        del history[:cut]
        dropped += cut
