"""The values that flow between the pipeline's stages (read -> render -> generate -> reward ->
select -> pair -> write). Plain dataclasses: picklable, no Beam, no torch.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class PromptInput:
    """A prompt as read from the input (before rendering). Exactly one of prompt/messages."""
    prompt_id: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    source: str = ""  # file (and line) it came from, for dead letters


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    """A prompt after the policy's chat template (or raw text): what the trainer will see.

    ``messages`` keeps the conversation before rendering ((role, content) pairs; a plain-text
    prompt is one user turn) so reward models can render it with their own template.
    """
    prompt_id: str
    prompt: str
    prompt_token_ids: tuple[int, ...]
    messages: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class Candidate:
    """One sampled response (SPEC 1) and, after the reward stage, its reward (SPEC 2)."""
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" or "length"
    sft_logp: float  # sum of raw log pi_sft over generated tokens, EOS included when generated
    reward: float | None = None  # the combined reward (SPEC 2)
    reward_scores: tuple[float, ...] = ()  # each reward model's own score, in config order

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class PromptCandidates:
    """The candidates of one prompt: the unit that moves from generation to selection.

    After selection ``candidates`` holds the kept responses in acceptance order and ``pairs``
    the (chosen, rejected) indices into them, and ``num_candidates`` the N they were selected
    from (after dedup). Stages that change candidates (reward, re-scoring) keep the other fields
    with ``dataclasses.replace``.
    """
    prompt: RenderedPrompt
    candidates: list[Candidate]
    pairs: list[tuple[int, int]] | None = None
    num_candidates: int | None = None
    beta: float | None = None  # the beta selection used for this prompt (after --beta-scale)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """Something dropped, with why. Written to dead_letter-*.jsonl and counted per reason."""
    stage: str  # read | render | generate | reward | select | rescore | records | write
    reason: str  # short machine-readable code, e.g. "invalid_json", "prompt_too_long"
    detail: str  # human-readable explanation ("<ExceptionType>: <message>" for exceptions)
    prompt_id: str | None = None
    input: Any = None  # the offending input (a line, a candidate...), JSON-serialisable

    def to_json(self) -> str:
        """One JSON line; non-ASCII kept, but a lone UTF-16 surrogate (valid in a JSON string,
        not encodable as UTF-8) is written as its ``\\uXXXX`` escape, so any input can be
        written (``json.loads`` gives it back)."""
        text = json.dumps(dataclasses.asdict(self), ensure_ascii=False, default=repr,
                          sort_keys=True)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclasses.dataclass(frozen=True)
class Failure:
    """What a model handler returns in place of a result for an element it could not process."""
    reason: str
    detail: str


@dataclasses.dataclass
class PromptSummary:
    """What the select stage reports per prompt; combined into the manifest's statistics."""
    prompt_id: str
    num_generated: int  # candidates returned by the engine (N)
    num_candidates: int  # after removing non-finite rewards and duplicates
    num_duplicates: int
    num_accepted: int  # k actually kept
    underfilled: bool  # fewer than k could be kept
    candidate_rewards: list[float]
    accepted_rewards: list[float]
    num_pairs: int
    num_ties_dropped: int
    num_generated_tokens: int = 0  # tokens of the candidates that reached selection
    # Algorithm 1 as run (docs/SELECTION.md): the beta used after --beta-scale (None for rest)
    # and (visited, accepted) per round.
    beta: float | None = None
    selection_rounds: list[tuple[int, int]] = dataclasses.field(default_factory=list)
