"""The plain HH-RLHF transcript: how a conversation is written as text when a tokenizer has no
chat template. One function, used by the render stage (the policy's prompt), the reward stage
(the reward model's input and the pairwise context) and reward-model training, so that a model
is always scored on text laid out the way it was trained on.

    "Human: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"

Roles (case-insensitive): user/human -> Human, assistant -> Assistant, system -> System; any
other role is capitalised. Turns are joined by a blank line (the separator of Anthropic's
HH-RLHF data, Bai et al. 2022, without its leading blank line).
"""
from __future__ import annotations

from typing import Sequence

ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}
OPEN_ASSISTANT_TURN = "Assistant:"


def role_name(role: str) -> str:
    """The transcript's speaker label for a chat role."""
    return ROLE_NAMES.get(role.lower(), role.capitalize())


def hh_transcript(messages: Sequence[tuple[str, str]], open_assistant_turn: bool = False) -> str:
    """``messages`` ((role, content) pairs) as HH-RLHF text; with ``open_assistant_turn`` an
    empty ``"Assistant:"`` turn is appended for the response to follow (a prompt)."""
    turns = [f"{role_name(role)}: {content}" for role, content in messages]
    if open_assistant_turn:
        turns.append(OPEN_ASSISTANT_TURN)
    return "\n\n".join(turns)
