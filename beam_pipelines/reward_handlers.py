"""Reward models (SPEC 2) as Beam RunInference model handlers.

Elements are ``PromptCandidates``; ``infer`` returns, per prompt, the list of the candidates'
rewards (in candidate order); a prompt that fails on its own becomes
``Failure("reward_failed", "<model path>: <Type>: <message>")`` (shared retry of
:mod:`beam_pipelines.handlers`). The Beam transform that chains them is
:mod:`beam_pipelines.reward`; the pure pairwise helpers are :mod:`beam_pipelines.pairwise`.

Two kinds of model, both ``AutoModelForSequenceClassification`` loaded in float32 (shared
loading of :mod:`rso.hf`), eval mode, ``trust_remote_code`` only when the config turns it on:

- pointwise (one output): ``r(x, y) = logit`` for the conversation ``messages + (assistant, y)``
  rendered with the REWARD MODEL's own chat template; without a chat template, the plain
  rendering of :func:`rso.transcript.hh_transcript` tokenised with the tokenizer's special tokens.
- pairwise (the paper's kind): a score ``s(a, b) = logit P(a better than b | x)`` for the text
  ``[CONTEXT] {x} [RESPONSE A] {a} [RESPONSE B] {b}`` (x =
  :func:`rso.transcript.hh_transcript` of the messages). With one output, ``P = sigmoid(z)``
  so ``s = z``; with two outputs, ``P = softmax(z)[1]`` (class 1 = "A is better") so
  ``s = z1 - z0``. Taking the score in logit space directly is exact and never saturates.
  Against one baseline ``y_b`` per prompt, drawn with
  ``prompt_rng(seed, prompt_id, "pairwise-baseline")``:
  ``both-orders`` (default): ``r(y) = (s(y, y_b) - s(y_b, y)) / 2``;
  ``random-flip``: a coin from ``prompt_rng(seed, prompt_id, "pairwise-flip")`` picks the order,
  ``r(y) = s(y, y_b)`` or ``-s(y_b, y)``; the baseline's own reward is 0.

Batching, deterministic: each prompt's sequences are scored on their own, never in a forward
pass with another prompt's: sorted by token length (stable) and cut into right-padded passes of
``reward_batch_size`` sequences. Every forward pass (its rows and its padded width) is then a
function of the prompt alone, so a reward is bit-identical whatever other prompts share its
Beam batch (mixing prompts made rewards differ by up to 4.5e-8 between identical runs, with
bundle timing). Inputs longer than the model's limit lose their oldest context tokens
(:func:`rso.reward_input.truncate_left`), counted as ``reward_truncated`` (and
``reward_response_truncated`` when even the response had to be cut).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from beam_pipelines.config import GenerateConfig, RewardModelSpec
from beam_pipelines.elements import PromptCandidates
from beam_pipelines.handlers import RetryingHandler, set_torch_threads
from beam_pipelines.pairwise import pairwise_orders, pairwise_rewards
from beam_pipelines.seeding import prompt_rng
from beam_pipelines.stage import count
from rso import cost
from rso.config import ConfigError
from rso.reward_input import leading_specials, pairwise_ids, pointwise_ids, render_pointwise
from rso.transcript import hh_transcript

STAGE = "reward"
REWARD_FAILED = "reward_failed"
_UNBOUNDED = 1_000_000  # tokenizers without a limit report model_max_length ~1e30


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size``, by increasing length (stable)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _check_num_labels(path: str, num_labels: int, kind: str) -> None:
    allowed = (1,) if kind == "pointwise" else (1, 2)
    if num_labels not in allowed:
        raise ConfigError(
            f"reward model {path}: a {kind} reward model needs "
            f"{' or '.join(map(str, allowed))} output(s) (num_labels), it has {num_labels}")


def check_reward_model(spec: RewardModelSpec, trust_remote_code: bool = False) -> None:
    """Fails at start (ConfigError) if a local model's config cannot be this kind of model."""
    if "://" in spec.path:
        return
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(spec.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward model {spec.path}: cannot read its config: {e}") from e
    _check_num_labels(spec.path, cfg.num_labels, spec.kind)
    from rso.pooling import is_mean_pooled

    try:
        is_mean_pooled(cfg)
    except ValueError as e:
        raise ConfigError(f"reward model {spec.path}: {e}") from e


class LoadedClassifier:
    """A loaded sequence classifier, its tokenizer, the pad id and the input length limit
    (a class, not a tuple: Beam needs a weak-referenceable object)."""

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, max_length: int | None,
                 num_labels: int, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.max_length = max_length
        self.num_labels = num_labels
        self.device = device
        self.special_ids = set(tokenizer.all_special_ids)

    def leading_specials(self, ids: Sequence[int]) -> int:
        """How many special tokens (BOS, CLS...) open ``ids``: kept by truncation."""
        return leading_specials(ids, self.special_ids)


def load_classifier(path: str, kind: str, *, trust_remote_code: bool = False,
                    max_length: int | None = None) -> LoadedClassifier:
    """Loads tokenizer and model (float32, eval). Batches are padded with the model's
    ``pad_token_id``; if it has none, with the tokenizer's pad token, else eos, and the model's
    ``pad_token_id`` is set to it (classifiers pool the rightmost non-pad token, so with eos as
    pad a trailing eos is skipped, the same way batched or alone). The length limit is the
    smallest of max_position_embeddings, the tokenizer's model_max_length and ``max_length``."""
    from rso import hf

    tok = hf.load_tokenizer(path, trust_remote_code)
    model = hf.load_classifier(path, "float32", "auto", trust_remote_code)
    _check_num_labels(path, model.config.num_labels, kind)
    text_cfg = model.config.get_text_config()
    pad_id = hf.pad_token_id(tok, model, default=None)
    if pad_id is None:
        raise ConfigError(f"reward model {path}: its tokenizer has neither a pad nor an "
                          "eos token to pad batches with")
    text_cfg.pad_token_id = pad_id
    model.config.pad_token_id = pad_id
    limits = [n for n in (getattr(text_cfg, "max_position_embeddings", None),
                          tok.model_max_length) if isinstance(n, int) and 0 < n < _UNBOUNDED]
    if max_length is not None:
        limits.append(max_length)
    return LoadedClassifier(model, tok, pad_id, min(limits) if limits else None,
                            model.config.num_labels, model.device.type)


def classifier_scores(loaded: LoadedClassifier, sequences: Sequence[Sequence[int]],
                      batch_size: int) -> list[float]:
    """The score of each token-id sequence (the logit, or z1 - z0 for two classes), computed in
    right-padded batches of similar length; returned in input order."""
    import torch

    scores = [math.nan] * len(sequences)
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot score an empty token sequence")
    for idx in length_sorted_batches([len(s) for s in sequences], batch_size):
        width = max(len(sequences[i]) for i in idx)
        input_ids = torch.full((len(idx), width), loaded.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            mask[row, :len(sequences[i])] = 1
        with torch.no_grad():
            logits = loaded.model(input_ids=input_ids.to(loaded.device),
                                  attention_mask=mask.to(loaded.device)).logits.float()
        cost.record(calls=1, sequences=len(idx), tokens_in=sum(len(sequences[i]) for i in idx))
        s = logits[:, 0] if loaded.num_labels == 1 else logits[:, 1] - logits[:, 0]
        for row, i in enumerate(idx):
            scores[i] = float(s[row])
    return scores


@dataclasses.dataclass
class _Plan:
    """The sequences one prompt needs scored and how their scores become rewards."""
    sequences: list[list[int]]
    combine: Callable[[list[float]], list[float]]
    truncated: int = 0
    response_truncated: int = 0


class RewardHandler(RetryingHandler):
    """Shared plumbing of both kinds: loading, length batching, counters; the per-element retry
    is :class:`beam_pipelines.handlers.RetryingHandler`'s (failure ``reward_failed``)."""
    kind = ""
    stage = STAGE
    failure_reason = REWARD_FAILED

    def __init__(self, spec: RewardModelSpec, config: GenerateConfig):
        # A fixed batch size, as generation's: with a range, Beam's BatchElements fits batch
        # times with numpy.polyfit, which warns on every poorly conditioned fit; in worker
        # processes those warnings go to the console (and once filled a piped stderr, which
        # blocked a 10,000-prompt run).
        n = config.reward_prompts_per_batch
        super().__init__(n, n, spec.path)
        self.spec = spec
        self.config = config

    def failure_prefix(self) -> str:
        return f"{self.spec.path}: "

    def load_model(self) -> LoadedClassifier:
        set_torch_threads(self.config.torch_threads)
        return load_classifier(self.spec.path, self.kind,
                               trust_remote_code=self.config.trust_remote_code,
                               max_length=self.config.reward_max_length)

    def _plan(self, example: PromptCandidates, model: LoadedClassifier) -> _Plan:
        raise NotImplementedError

    def infer(self, batch: Sequence[PromptCandidates],
              model: LoadedClassifier) -> list[list[float]]:
        """Each prompt's rewards, its sequences scored apart from other prompts' (so that a
        reward does not depend on the batch composition; see the module docstring)."""
        plans = [self._plan(example, model) for example in batch]
        rewards = [plan.combine(classifier_scores(model, plan.sequences,
                                                  self.config.reward_batch_size))
                   for plan in plans]
        for plan in plans:  # counted once, after success (a retried batch is not re-counted)
            if plan.truncated:
                count("reward_truncated", plan.truncated)
            if plan.response_truncated:
                count("reward_response_truncated", plan.response_truncated)
        return rewards


class PointwiseRewardHandler(RewardHandler):
    """r(x, y) = the model's single logit for the conversation plus the response, rendered with
    the reward model's own chat template (see the module docstring for the plain fallback)."""
    kind = "pointwise"

    def _plan(self, example: PromptCandidates, model: LoadedClassifier) -> _Plan:
        tok = model.tokenizer
        messages = example.prompt.messages or (("user", example.prompt.prompt),)
        prefix = render_pointwise(tok, messages, None)
        plan = _Plan([], lambda scores: list(scores))
        for cand in example.candidates:
            ids, truncated, response_cut = pointwise_ids(tok, messages, cand.text,
                                                         model.max_length, model.special_ids,
                                                         prefix)
            plan.truncated += truncated
            plan.response_truncated += response_cut
            plan.sequences.append(ids)
        return plan


class PairwiseRewardHandler(RewardHandler):
    """r(y) = logit P(y better than y_b | x) against one seeded baseline y_b per prompt, position
    bias removed by both orders or a seeded flip (see the module docstring)."""
    kind = "pairwise"

    def _pair_ids(self, plan: _Plan, model: LoadedClassifier, context: str, a: str,
                  b: str) -> list[int]:
        ids, truncated, response_cut = pairwise_ids(model.tokenizer, context, a, b,
                                                    model.max_length, model.special_ids)
        plan.truncated += truncated
        plan.response_truncated += response_cut
        return ids

    def _plan(self, example: PromptCandidates, model: LoadedClassifier) -> _Plan:
        pid = example.prompt.prompt_id
        n = len(example.candidates)
        if n == 0:
            return _Plan([], lambda scores: [])
        baseline = int(prompt_rng(self.config.seed, pid, "pairwise-baseline").integers(n))
        flips = [bool(f) for f in prompt_rng(self.config.seed, pid, "pairwise-flip").random(n)
                 < 0.5]
        debias = self.config.pairwise_debias
        context = hh_transcript(example.prompt.messages or (("user", example.prompt.prompt),))
        texts = [c.text for c in example.candidates]
        plan = _Plan([], lambda scores: pairwise_rewards(n, baseline, scores, debias, flips))
        for a, b in pairwise_orders(n, baseline, debias, flips):
            plan.sequences.append(self._pair_ids(plan, model, context, texts[a], texts[b]))
        return plan


def reward_handler(spec: RewardModelSpec, config: GenerateConfig) -> RewardHandler:
    """The model handler for a spec's kind."""
    return {"pointwise": PointwiseRewardHandler,
            "pairwise": PairwiseRewardHandler}[spec.kind](spec, config)
