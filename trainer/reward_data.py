"""Preference pairs for reward-model training: reading, validating, splitting by prompt.

Accepted rows (a JSON line of ``*.jsonl`` / ``*.jsonl.gz``, or a Parquet row; other fields are
ignored), the formats of TRL's RewardTrainer and of Anthropic's HH-RLHF:

- ``{"prompt": str, "chosen": str, "rejected": str}``: TRL standard (explicit prompt); the prompt
  is one user turn;
- ``{"prompt": [{"role", "content"}, ...], "chosen": [{"role": "assistant", ...}],
  "rejected": [...]}``: TRL conversational, each side one assistant message;
- ``{"chosen": [messages], "rejected": [messages]}``: TRL conversational with an implicit prompt
  (the messages both sides share), each side ending in one assistant message;
- ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``: HH-RLHF dialogues; the
  prompt is their common prefix up to its last ``"\\n\\nAssistant:"``, parsed into user/assistant
  turns (consecutive turns of one speaker joined by a blank line), the responses are what follows
  (one leading space dropped).

``prompt_id`` is the row's own when given, else SPEC 5's: sha256 of the prompt text (TRL
standard) or of the canonical JSON of the messages (the pipeline's ids for the same prompts).
A row that fits none of these raises :class:`trainer.data.DataError` naming the file and the
line (JSONL, 1-based) or row (Parquet, 0-based). Pairs whose two responses are identical carry
no preference: they are skipped and counted.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rso import storage as rso_io
from rso.transcript import HH_ASSISTANT, hh_prompt_end, split_hh_dialogue
from trainer.data import DataError, in_eval_split

Messages = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: the conversation so far and the preferred / dispreferred reply."""
    prompt_id: str
    messages: Messages
    chosen: str
    rejected: str
    where: str  # "FILE: line N" (JSONL) or "FILE: row N" (Parquet), for error messages


@dataclasses.dataclass
class PreferenceData:
    """What :func:`read_preferences` returns: the pairs and what was skipped."""
    examples: list[PreferenceExample]
    skipped_identical: int = 0
    rows: int = 0

    @property
    def content_hash(self) -> str:
        """sha256 of the pairs' content (ids, messages, responses, in order): the same pairs
        give the same hash whatever the file format."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(json.dumps([ex.prompt_id, ex.messages, ex.chosen, ex.rejected],
                                ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()


def canonical_messages(messages: Messages) -> str:
    """``[{"content": c, "role": r}, ...]``, sorted keys, no spaces (SPEC 5, as the pipeline)."""
    return json.dumps([{"role": r, "content": c} for r, c in messages], sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_hh_turns(text: str) -> Messages:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c"`` -> user/assistant turns
    (:func:`rso.transcript.split_hh_dialogue`); ValueError unless it opens with a Human turn and
    ends with one."""
    leading, turns = split_hh_dialogue(text)
    if leading.strip():
        raise ValueError("text before the first 'Human:' turn")
    if not turns or turns[-1][0] != "user":
        raise ValueError("the turn before the last 'Assistant:' is not a 'Human:' turn")
    return turns


def _messages(value: Any, name: str) -> Messages:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"'{name}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                or not m.get("role") or not isinstance(m.get("content"), str):
            raise ValueError(f"'{name}' message {i} is not {{role: str, content: str}}")
        out.append((m["role"], m["content"]))
    return tuple(out)


def _one_reply(turns: Messages, name: str) -> str:
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise ValueError(f"'{name}' must add exactly one assistant message to the prompt, got "
                         f"{[r for r, _ in turns]}")
    return turns[0][1]


def parse_preference(row: Any, where: str) -> PreferenceExample:
    """A :class:`PreferenceExample` from one decoded row (see the module docstring for the
    forms); DataError naming ``where`` otherwise."""
    try:
        if not isinstance(row, Mapping):
            raise ValueError(f"expected an object, got {type(row).__name__}")
        chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
        if chosen is None or rejected is None:
            raise ValueError("needs 'chosen' and 'rejected'")
        plain_prompt = None
        if isinstance(prompt, str):
            if not isinstance(chosen, str) or not isinstance(rejected, str):
                raise ValueError("with a string 'prompt', 'chosen' and 'rejected' must be strings")
            if not prompt.strip():
                raise ValueError("'prompt' is blank")
            plain_prompt, messages = prompt, (("user", prompt),)
        elif prompt is not None:
            messages = _messages(prompt, "prompt")
            chosen = _one_reply(_messages(chosen, "chosen"), "chosen")
            rejected = _one_reply(_messages(rejected, "rejected"), "rejected")
        elif isinstance(chosen, str) and isinstance(rejected, str):
            cut = hh_prompt_end(chosen, rejected)
            if cut < 0:
                raise ValueError("'chosen' and 'rejected' share no dialogue up to an "
                                 "'\\n\\nAssistant:' turn (HH-RLHF form)")
            messages = parse_hh_turns(chosen[:cut])
            start = cut + len(HH_ASSISTANT)
            chosen, rejected = (s[start + 1:] if s[start:start + 1] == " " else s[start:]
                                for s in (chosen, rejected))
        else:
            full_c, full_r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
            n = 0
            while n < min(len(full_c), len(full_r)) - 1 and full_c[n] == full_r[n]:
                n += 1
            messages = full_c[:n]
            if not messages:
                raise ValueError("'chosen' and 'rejected' share no prompt messages")
            chosen, rejected = _one_reply(full_c[n:], "chosen"), _one_reply(full_r[n:],
                                                                            "rejected")
        if not any(c.strip() for _, c in messages):
            raise ValueError("the prompt has no non-blank text")
        given = row.get("prompt_id")
        if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int))
                                  or not str(given).strip()):
            raise ValueError(f"'prompt_id' is not a non-empty string or an integer: {given!r}")
        prompt_id = str(given) if given is not None else _sha256(
            plain_prompt if plain_prompt is not None else canonical_messages(messages))
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return PreferenceExample(prompt_id, messages, chosen, rejected, where)


def _rows(path: str) -> Iterator[tuple[str, Any]]:
    """``(where, decoded row)`` of a JSONL(.gz) or Parquet file, local or gs://."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with rso_io.open_file(path, "rb") as f:
            index = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield f"{path}: row {index}", row
                    index += 1
        return
    if not (path.endswith(".jsonl") or path.endswith(".jsonl.gz") or path.endswith(".json")
            or path.endswith(".json.gz")):
        raise DataError(f"{path}: not a .jsonl, .jsonl.gz or .parquet file")
    with rso_io.open_file(path, "rb") as raw:
        stream = gzip.open(raw) if path.endswith(".gz") else raw
        for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8",
                                                       errors="strict"), start=1):
            where = f"{path}: line {number}"
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def read_preferences(paths: Sequence[str], rows: tuple[int, int | None] | None = None
                     ) -> PreferenceData:
    """Every pair of ``paths`` in order; ``rows=(start, end)`` keeps rows [start, end) of their
    concatenation (end None: to the last). Raises DataError for a bad row or an empty result."""
    start, end = rows or (0, None)
    data = PreferenceData([])
    try:
        for path in paths:
            for where, row in _rows(path):
                index = data.rows
                data.rows += 1
                if index < start or (end is not None and index >= end):
                    continue
                ex = parse_preference(row, where)
                if ex.chosen == ex.rejected:
                    data.skipped_identical += 1
                else:
                    data.examples.append(ex)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not data.examples:
        raise DataError(f"no usable preference pairs in {', '.join(paths)}")
    return data


def split_by_prompt(examples: Sequence[PreferenceExample], eval_fraction: float
                    ) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, held out): a prompt's pairs all go to one side, by the hash of its prompt_id
    (:func:`trainer.data.in_eval_split`)."""
    train, held = [], []
    for ex in examples:
        (held if in_eval_split(ex.prompt_id, eval_fraction) else train).append(ex)
    return train, held
