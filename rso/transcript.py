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

import os
import re
from collections.abc import Sequence

ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}
OPEN_ASSISTANT_TURN = "Assistant:"
HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


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


def split_hh_dialogue(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The inverse of :func:`hh_transcript` for Anthropic's form
    ``"\\n\\nHuman: a\\n\\nAssistant: b"``: (the text before the first turn, the
    (role, content) turns, roles user/assistant). Consecutive turns of one speaker (a few HH-RLHF
    lines have them) are joined with a blank line, so strict chat templates, which require
    alternating roles, accept the conversation. Callers validate the result."""
    parts = HH_TURN.split(text)
    turns: list[tuple[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = HH_ROLES[speaker]
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + content)
        else:
            turns.append((role, content))
    return parts[0], tuple(turns)


def hh_prompt_end(chosen: str, rejected: str | None = None) -> int:
    """Where the prompt of an HH-RLHF pair ends: the offset of its last ``"\\n\\nAssistant:"``.

    HH-RLHF stores each comparison as two full dialogues that share the conversation and differ
    in the final Assistant response, so the prompt is their longest common prefix cut back to
    the last ``"\\n\\nAssistant:"`` inside it (SPEC 1). Cutting ``chosen`` alone at its last
    marker goes wrong when the response itself contains one (4 of the 2,312 bundled
    harmless-base test rows, e.g. a response that goes on to write ``"\\n\\nAssistant: ..."``).
    With ``rejected`` None (only ``chosen`` given) the last marker of ``chosen`` is used.
    Returns -1 when there is no marker.
    """
    if rejected is None:
        return chosen.rfind(HH_ASSISTANT)
    return os.path.commonprefix([chosen, rejected]).rfind(HH_ASSISTANT)
