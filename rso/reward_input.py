"""How a reward model's input is laid out and shortened: one implementation for the pipeline's
reward stage (:mod:`beam_pipelines.reward`) and reward-model training (:mod:`trainer.reward_train`),
so a reward model is scored on token ids built exactly the way it was trained on.

- pointwise: the conversation plus the response, rendered with the reward model's own chat
  template when its tokenizer has one, else :func:`rso.transcript.hh_transcript` tokenised with
  the tokenizer's special tokens;
- pairwise (SPEC 2): ``[CONTEXT] {x} [RESPONSE A] {a} [RESPONSE B] {b}``;
- inputs longer than the limit lose their oldest context tokens (:func:`truncate_left`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rso.transcript import hh_transcript

PAIRWISE_PREFIX = "[CONTEXT] "


def pairwise_text(context: str, a: str, b: str) -> str:
    """``[CONTEXT] {x} [RESPONSE A] {a} [RESPONSE B] {b}`` (SPEC 2)."""
    return f"{PAIRWISE_PREFIX}{context} [RESPONSE A] {a} [RESPONSE B] {b}"


def truncate_left(ids: Sequence[int], head: int, context_end: int,
                  max_length: int) -> tuple[list[int], bool, bool]:
    """Shortens ``ids`` to ``max_length`` tokens by dropping the oldest context tokens.

    ``ids[:head]`` (leading special tokens or markers) is kept; tokens ``ids[head:context_end]``
    (the context) are dropped from the left first; if that is not enough, tokens right after the
    head are dropped too (the response is cut). Returns (ids, truncated, response_cut).
    """
    ids = list(ids)
    if len(ids) <= max_length:
        return ids, False, False
    head = max(0, min(head, max_length - 1))
    excess = len(ids) - max_length
    cut = min(excess, max(0, context_end - head))
    ids = ids[:head] + ids[head + cut:]
    more = len(ids) - max_length
    if more > 0:
        ids = ids[:head] + ids[head + more:]
    return ids, True, more > 0


def leading_specials(ids: Sequence[int], special_ids: set[int]) -> int:
    """How many special tokens (BOS, CLS...) open ``ids``: kept by truncation."""
    n = 0
    while n < len(ids) and ids[n] in special_ids:
        n += 1
    return n


def render_pointwise(tok: Any, messages: Sequence[tuple[str, str]],
                     response: str | None) -> list[int]:
    """Token ids of ``messages`` plus the assistant ``response`` (None: the prompt alone, with
    the generation prompt opened), with the tokenizer's chat template if it has one, else
    :func:`hh_transcript` tokenised with special tokens."""
    turns = list(messages) + ([("assistant", response)] if response is not None else [])
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                       tokenize=False, add_generation_prompt=response is None)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(tok(hh_transcript(turns))["input_ids"])


def pointwise_ids(tok: Any, messages: Sequence[tuple[str, str]], response: str,
                  max_length: int | None, special_ids: set[int],
                  prompt_ids: Sequence[int] | None = None) -> tuple[list[int], bool, bool]:
    """:func:`render_pointwise` of (messages, response), shortened to ``max_length`` by
    :func:`truncate_left`; the context is the longest common prefix with the prompt's own
    rendering (``prompt_ids``, computed when not given). Returns (ids, truncated, response_cut).
    """
    ids = render_pointwise(tok, messages, response)
    if max_length is None or len(ids) <= max_length:
        return ids, False, False
    prefix = render_pointwise(tok, messages, None) if prompt_ids is None else prompt_ids
    context_end = 0
    while context_end < min(len(ids), len(prefix)) and ids[context_end] == prefix[context_end]:
        context_end += 1
    return truncate_left(ids, leading_specials(ids, special_ids), context_end, max_length)


def pairwise_ids(tok: Any, context: str, a: str, b: str, max_length: int | None,
                 special_ids: set[int]) -> tuple[list[int], bool, bool]:
    """Token ids of :func:`pairwise_text`, shortened to ``max_length`` by dropping the oldest
    tokens of the context (located by character offsets; a slow tokenizer has none, so its text
    is cut right after the leading special tokens). Returns (ids, truncated, response_cut)."""
    text = pairwise_text(context, a, b)
    if not tok.is_fast:
        ids = list(tok(text)["input_ids"])
        if max_length is None:
            return ids, False, False
        head = leading_specials(ids, special_ids)
        return truncate_left(ids, head, head, max_length)
    enc = tok(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if max_length is None:
        return ids, False, False
    start, end = len(PAIRWISE_PREFIX), len(PAIRWISE_PREFIX) + len(context)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"])
              if e > s and s >= start and e <= end]
    head = inside[0] if inside else leading_specials(ids, special_ids)
    context_end = inside[-1] + 1 if inside else head
    return truncate_left(ids, head, context_end, max_length)
