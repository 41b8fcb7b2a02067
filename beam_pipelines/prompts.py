"""Parsing of input prompts into :class:`PromptInput` (pure functions: no Beam, no I/O).

Accepted records (a JSON line or a Parquet row; other fields are ignored):

- ``{"prompt": "text"}``: a plain-text prompt;
- ``{"prompt": [{"role": ..., "content": ...}, ...]}`` or ``{"messages": [...]}``: a
  conversation (TRL's conversational format uses a list under ``prompt``);
- ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``: an Anthropic HH-RLHF
  dialogue; the prompt is what ``chosen`` and ``rejected`` share, up to the last ``Assistant:``
  turn before they diverge (:func:`hh_prompt_end`; without ``rejected``: the last
  ``Assistant:`` turn of ``chosen``), as user/assistant messages.

``prompt_id`` is taken from the record when present, else (SPEC 5) it is
``sha256(prompt text)`` for a plain prompt and ``sha256(canonical JSON of the messages)`` for a
conversation, where the canonical JSON is ``[{"content": c, "role": r}, ...]`` with sorted keys,
no spaces and non-ASCII kept (so an HH-RLHF dialogue and the same conversation given as
``messages`` get the same id).

Bad input raises :class:`PromptError` with one of the reasons in :data:`REASONS`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from beam_pipelines.elements import PromptInput
from rso.transcript import hh_prompt_end, split_hh_dialogue

REASONS = {
    "undecodable": "the line is not valid UTF-8",
    "invalid_json": "the line is not a JSON object (or is nested too deeply to parse)",
    "invalid_unicode": "a string holds a lone UTF-16 surrogate (a JSON \\ud83d escape)",
    "missing_prompt": "no 'prompt', 'messages' or 'chosen' field",
    "empty_prompt": "the prompt has no non-blank text",
    "invalid_messages": "'messages' is not a non-empty list of {role: str, content: str}",
    "invalid_dialogue": "'chosen' is not an HH-RLHF dialogue ending in a Human turn then an "
                        "Assistant turn",
    "invalid_prompt_id": "'prompt_id' is not a non-empty string or an integer",
    # raised when the policy's tokenizer renders the prompt (render.py)
    "invalid_prompt": "not exactly one of a prompt string and a list of (role, content) turns",
    "chat_template_error": "the policy's chat template rejected the conversation",
    "prompt_too_long": "the rendered prompt leaves no room in the policy's context",
}

# Input kinds understood by the parsers: "auto" accepts every record form above; "hh-rlhf"
# requires the 'chosen' dialogue.
KINDS = ("auto", "jsonl", "parquet", "hh-rlhf")



class PromptError(ValueError):
    """A record that cannot become a prompt; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


Messages = tuple[tuple[str, str], ...]


def canonical_messages(messages: Messages) -> str:
    """The canonical JSON of a conversation that its prompt_id hashes."""
    return json.dumps([{"role": r, "content": c} for r, c in messages], sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))


def prompt_id_for(prompt: str | None = None, messages: Messages | None = None) -> str:
    """SPEC 5 id: sha256 hex of the prompt text, or of the canonical JSON of the messages."""
    if (prompt is None) == (messages is None):
        raise ValueError("prompt_id_for: give exactly one of prompt or messages")
    text = prompt if prompt is not None else canonical_messages(messages)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_key(p: PromptInput) -> str:
    """A total order on prompt contents, used to pick a duplicate's survivor deterministically."""
    if p.prompt is not None:
        return json.dumps(["prompt", p.prompt], ensure_ascii=False)
    return json.dumps(["messages", json.loads(canonical_messages(p.messages))], ensure_ascii=False)


def _parse_messages(value: Any) -> Messages:
    if not isinstance(value, (list, tuple)) or not value:
        raise PromptError("invalid_messages", f"expected a non-empty list, got {_short(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                or not m.get("role") or not isinstance(m.get("content"), str):
            raise PromptError("invalid_messages",
                              f"message {i} is not {{role: str, content: str}}: {_short(m)}")
        out.append((m["role"], m["content"]))
    if not any(c.strip() for _, c in out):
        raise PromptError("empty_prompt", "every message content is blank")
    return tuple(out)


def parse_hh_dialogue(dialogue: Any, rejected: Any = None) -> Messages:
    """The messages of an HH-RLHF dialogue before the Assistant turn being compared.

    ``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant: d"`` gives
    ``(("user", "a"), ("assistant", "b"), ("user", "c"))``. The cut is :func:`hh_prompt_end`:
    the end of the prefix ``dialogue`` (``chosen``) shares with ``rejected`` when that is given,
    else the last ``Assistant:`` turn. Consecutive turns of one speaker (a few HH-RLHF lines
    have them) are joined with a blank line so strict chat templates, which require alternating
    roles, accept the conversation. The last message must be the human's.
    """
    if not isinstance(dialogue, str):
        raise PromptError("invalid_dialogue", f"'chosen' must be a string, got {_short(dialogue)}")
    if rejected is not None and not isinstance(rejected, str):
        raise PromptError("invalid_dialogue",
                          f"'rejected' must be a string, got {_short(rejected)}")
    cut = hh_prompt_end(dialogue, rejected)
    if cut < 0:
        raise PromptError("invalid_dialogue", "no '\\n\\nAssistant:' turn in 'chosen'"
                          if rejected is None else "'chosen' and 'rejected' share no "
                          "'\\n\\nAssistant:' turn")
    leading, turns = split_hh_dialogue(dialogue[:cut])
    if leading.strip():
        raise PromptError("invalid_dialogue", "text before the first 'Human:' turn")
    if not turns:
        raise PromptError("empty_prompt", "no 'Human:' turn before the last 'Assistant:' turn")
    if turns[-1][0] != "user":
        raise PromptError("invalid_dialogue",
                          "the turn before the last 'Assistant:' is not a 'Human:' turn")
    if not any(c.strip() for _, c in turns):
        raise PromptError("empty_prompt", "every turn is blank")
    return tuple(turns)


def _prompt_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or \
            (isinstance(value, str) and not value.strip()):
        raise PromptError("invalid_prompt_id", f"got {_short(value)}")
    return str(value)


def parse_row(row: Mapping[str, Any], source: str, kind: str = "auto") -> PromptInput:
    """A :class:`PromptInput` from a decoded record (JSON object or Parquet row).

    ``kind="hh-rlhf"`` requires the ``chosen`` dialogue; any other kind takes the first present
    of ``prompt``, ``messages``, ``chosen``.
    """
    if not isinstance(row, Mapping):
        raise PromptError("invalid_json", f"expected a JSON object, got {type(row).__name__}")
    given_id = _prompt_id(row.get("prompt_id"))
    prompt: str | None = None
    messages: Messages | None = None
    fields = ("chosen",) if kind == "hh-rlhf" else ("prompt", "messages", "chosen")
    field = next((f for f in fields if row.get(f) is not None), None)
    if field is None:
        raise PromptError("missing_prompt", f"no {' / '.join(repr(f) for f in fields)} field")
    value = row[field]
    if field == "chosen":
        messages = parse_hh_dialogue(value, row.get("rejected"))
    elif field == "messages" or isinstance(value, (list, tuple)):
        messages = _parse_messages(value)
    elif isinstance(value, str):
        if not value.strip():
            raise PromptError("empty_prompt", "'prompt' is blank")
        prompt = value
    else:
        raise PromptError("missing_prompt", f"'prompt' must be a string or a list of messages, "
                                            f"got {_short(value)}")
    pid = given_id or prompt_id_for(prompt=prompt, messages=messages)
    return PromptInput(prompt_id=pid, prompt=prompt, messages=messages, source=source)


def decode_line(line: bytes) -> str:
    """UTF-8 text of a raw line (a leading byte-order mark dropped); PromptError if invalid."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError("undecodable", f"invalid UTF-8 at byte {e.start}: {e.reason}") from None
    return text[1:] if text.startswith("\ufeff") else text


def escape_line(line: bytes) -> str:
    """A raw line as text for a dead letter, undecodable bytes escaped as ``\\xNN``."""
    return line.decode("utf-8", errors="backslashreplace")


def parse_json_line(line: bytes, source: str, kind: str = "auto") -> PromptInput:
    """A :class:`PromptInput` from one JSONL line (bytes, as read); PromptError if bad."""
    text = decode_line(line)
    try:
        row = json.loads(text)
    except ValueError as e:
        raise PromptError("invalid_json", str(e)) from None
    except RecursionError:
        raise PromptError("invalid_json", "nested too deeply to parse") from None
    prompt = parse_row(row, source, kind)
    texts = [prompt.prompt or ""] + [c for _, c in prompt.messages or ()]
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's \ud83d escapes decode to lone surrogates
            raise PromptError("invalid_unicode", f"a lone UTF-16 surrogate "
                              f"{t[e.start]!r} at character {e.start}: not text any tokenizer "
                              f"can encode") from None
    return prompt


def is_blank(line: bytes) -> bool:
    """Blank lines (e.g. a trailing empty line) are skipped, not dead-lettered."""
    return not line.strip()


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def as_dict(p: PromptInput) -> dict[str, Any]:
    """A JSON-serialisable view of a prompt (for dead letters)."""
    return {"prompt_id": p.prompt_id, "prompt": p.prompt,
            "messages": [list(m) for m in p.messages] if p.messages is not None else None,
            "source": p.source}


__all__: Sequence[str] = (
    "REASONS", "KINDS", "PromptError", "prompt_id_for", "canonical_messages", "content_key",
    "parse_hh_dialogue", "parse_row", "parse_json_line", "decode_line", "escape_line",
    "is_blank", "as_dict",
)
