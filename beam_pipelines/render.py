"""Prompt rendering (SPEC 1): a prompt becomes the exact text and token ids the policy is given.

Rendering happens once, before generation; the token ids are kept so that nothing downstream
(the engines, the trainer) ever re-tokenises.

- ``messages`` ((role, content) pairs) go through the policy tokenizer's chat template with
  ``add_generation_prompt=True``. The rendered text is tokenised with
  ``add_special_tokens=False``: the template itself writes any BOS it wants (this is what
  ``apply_chat_template(tokenize=True)`` does too).
- A tokenizer without a chat template gets the plain HH-RLHF style fallback
  ``"Human: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"``
  (:func:`rso.transcript.hh_transcript`), tokenised like a plain prompt.
- A plain ``prompt`` string is used verbatim and tokenised with the tokenizer's default special
  tokens (``add_special_tokens=True``: a BOS for Llama-style tokenizers), i.e. exactly how the
  policy sees raw text in ``tokenizer(text)``, except that the ids never hold two BOS (a text
  that starts with the BOS string is tokenised with ``add_special_tokens=False``, as the chat
  template path) nor end with an EOS the post-processor appended (:func:`_token_ids`). Its
  ``messages`` become ``(("user", text),)``.

Context budget. With ``L = max_model_len`` (the model's context, :func:`context_length`), a prompt
of ``P`` tokens is valid when ``1 <= P <= L - 1`` (room for at least one generated token);
longer prompts raise ``PromptError("prompt_too_long")``. ``max_new_tokens`` is NOT added to the
prompt: a response is cut at the context end instead, so a prompt of ``P`` tokens gets at most
``min(max_new_tokens, L - P)`` new tokens and such a cut response has finish reason ``"length"``.
vLLM does exactly this by itself; the transformers engine caps ``max_new_tokens`` per prompt the
same way (:func:`new_token_budget`), so both engines agree.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam

from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import PromptInput, RenderedPrompt
from beam_pipelines.prompts import PromptError  # (reason, detail): the read stage's error too
from beam_pipelines.stage import StageOutput, StageParDo, count, dead_letter
from rso.transcript import hh_transcript

# Keys a Hugging Face config may hold its context length under (vLLM reads the same ones and
# takes the smallest).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                "max_sequence_length", "max_seq_length", "seq_len")


def max_prompt_tokens(max_model_len: int) -> int:
    """The longest valid prompt: ``max_model_len - 1`` (one position left for a response)."""
    return max_model_len - 1


def new_token_budget(prompt_len: int, max_new_tokens: int, max_model_len: int) -> int:
    """``min(max_new_tokens, max_model_len - prompt_len)``: responses stop at the context end."""
    return min(max_new_tokens, max_model_len - prompt_len)


def context_length(policy: str, max_model_len: int | None = None,
                   trust_remote_code: bool = False) -> int:
    """The context length used everywhere: ``max_model_len`` when given, else the smallest of
    the model config's context keys (:data:`CONTEXT_KEYS`, text config for multimodal models).
    The engines are started with this same value, so rendering and generation agree."""
    if max_model_len is not None:
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        return max_model_len
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(policy, trust_remote_code=trust_remote_code)
    cfg = getattr(cfg, "text_config", None) or cfg
    values = [getattr(cfg, k) for k in CONTEXT_KEYS if isinstance(getattr(cfg, k, None), int)]
    if not values:
        raise ValueError(f"{policy}: the model config has no context length "
                         f"({', '.join(CONTEXT_KEYS)}); set --max-model-len")
    return min(values)


def _chat_text(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=False,
            add_generation_prompt=True)
    except Exception as e:  # jinja raises its own errors (e.g. roles must alternate)
        raise PromptError("chat_template_error", f"{type(e).__name__}: {e}") from e


def _token_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[int, ...]:
    """``tokenizer(text)["input_ids"]``, holding one BOS at most and no EOS a post-processor
    appended (SPEC 1).

    With ``add_special_tokens`` the tokenizer's post-processor adds its specials around the
    text. When the text already starts with the BOS string (a pre-rendered prompt such as
    ``"<s>[user] ..."`` for a Llama-2-style tokenizer) the ids would start with two BOS; the
    text is then tokenised with ``add_special_tokens=False``, as
    ``apply_chat_template(tokenize=True)`` does for a template that writes its own BOS (counter
    ``rso/prompt_double_bos_removed``). An EOS that the post-processor appended would end the
    prompt with end-of-sequence; it is removed (counter ``rso/prompt_appended_eos_removed``);
    an EOS written in the text itself is kept. The added specials are found by locating
    ``tokenizer(text, add_special_tokens=False)`` inside the ids (a template
    ``prefix $A suffix``, as every Hugging Face post-processor for single sequences).
    """
    ids = [int(i) for i in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]
    if not add_special_tokens or not ids:
        return tuple(ids)
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    plain = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    # The post-processor's template: ids = added prefix + the text's own ids + added suffix.
    start = next((k for k in range(len(ids) - len(plain) + 1)
                  if ids[k:k + len(plain)] == plain), None)
    if start is None:  # not a prefix/suffix template: leave the tokenizer's ids alone
        return tuple(ids)
    added_prefix, added_suffix = ids[:start], ids[start + len(plain):]
    if eos is not None and eos in added_suffix:
        count("prompt_appended_eos_removed")
        added_suffix = [t for t in added_suffix if t != eos]
    if bos is not None and plain[:1] == [bos] and bos in added_prefix:
        count("prompt_double_bos_removed")
        added_prefix = [t for t in added_prefix if t != bos]
    return tuple(added_prefix + plain + added_suffix)


def render_prompt(tokenizer: Any, prompt_id: str, prompt: str | None,
                  messages: Sequence[tuple[str, str]] | None,
                  max_prompt_tokens: int) -> RenderedPrompt:
    """Renders one prompt (see the module docstring for the rules); raises :class:`PromptError`
    with reason ``invalid_prompt`` (both or neither of prompt/messages), ``empty_prompt``,
    ``chat_template_error`` or ``prompt_too_long``."""
    if (prompt is None) == (messages is None):
        raise PromptError("invalid_prompt", "exactly one of prompt and messages must be given")
    if messages is not None:
        try:
            messages = tuple((str(r), str(c)) for r, c in messages)
        except (TypeError, ValueError) as e:
            raise PromptError("invalid_prompt", f"messages must be (role, content) pairs: "
                              f"{e}") from e
        if not any(c.strip() for _, c in messages):
            raise PromptError("empty_prompt", "the conversation has no content")
        if getattr(tokenizer, "chat_template", None):
            text, special = _chat_text(tokenizer, messages), False
        else:
            text, special = hh_transcript(messages, open_assistant_turn=True), True
    else:
        if not isinstance(prompt, str):
            raise PromptError("invalid_prompt", f"prompt must be a string, got "
                              f"{type(prompt).__name__}")
        if not prompt.strip():
            raise PromptError("empty_prompt", "the prompt is empty")
        text, special, messages = prompt, True, (("user", prompt),)
    ids = _token_ids(tokenizer, text, special)
    if not ids:
        raise PromptError("empty_prompt", "the prompt has no tokens")
    if len(ids) > max_prompt_tokens:
        raise PromptError("prompt_too_long", f"{len(ids)} tokens > {max_prompt_tokens} allowed "
                          f"(context length - 1)")
    return RenderedPrompt(prompt_id=prompt_id, prompt=text, prompt_token_ids=ids,
                          messages=messages)


STAGE = "render"


class RenderPromptsFn(beam.DoFn):
    """PromptInput -> RenderedPrompt; failures -> tagged ``dead_letter`` DeadLetter(stage=render).

    The policy tokenizer is loaded once per DoFn instance, in ``setup()``. Counters (namespace
    "rso"): ``prompts_rendered`` and ``dead_letter_<reason>``.
    """

    def __init__(self, policy: str, max_model_len: int | None = None,
                 trust_remote_code: bool = False):
        self._policy = policy
        self._max_model_len = max_model_len
        self._trust_remote_code = trust_remote_code

    def setup(self) -> None:
        from rso import hf

        self._tokenizer = hf.load_tokenizer(self._policy, self._trust_remote_code)
        self._max_prompt_tokens = max_prompt_tokens(context_length(
            self._policy, self._max_model_len, self._trust_remote_code))

    def process(self, element: PromptInput) -> Iterable[Any]:
        try:
            rendered = render_prompt(self._tokenizer, element.prompt_id, element.prompt,
                                     element.messages, self._max_prompt_tokens)
        except PromptError as e:
            yield dead_letter(STAGE, e.reason, e.detail, element.prompt_id,
                              dataclasses.asdict(element))
            return
        count("prompts_rendered")
        yield rendered


class RenderPrompts(beam.PTransform):
    """PCollection[PromptInput] -> :class:`StageOutput`: ``main`` (RenderedPrompt) and
    ``dead_letters`` (DeadLetter(stage="render"): the reasons of :func:`render_prompt`, or
    ``unexpected_error`` for any other exception, e.g. a ``TypeError`` from the tokenizer on a
    prompt holding a lone UTF-16 surrogate). Use as ``out = prompts | RenderPrompts(config)``."""

    def __init__(self, config: GenerateConfig):
        super().__init__()
        self._fn = RenderPromptsFn(config.policy, config.max_model_len, config.trust_remote_code)

    def expand(self, prompts: beam.PCollection) -> StageOutput:
        return prompts | "Render" >> StageParDo(STAGE, self._fn)
