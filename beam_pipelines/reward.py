"""Reward models (SPEC 2) as Beam RunInference model handlers, and their weighted sum.

Elements are ``(prompt_id, PromptCandidates)``. Each reward model is a ``ModelHandler`` whose
``run_inference`` returns, per prompt, a ``PredictionResult(example, inference)`` where
``inference`` is the list of the candidates' rewards (in candidate order) or a
:class:`~beam_pipelines.elements.Failure`. :class:`ScoreRewards` chains one ``RunInference`` per
model and sums ``weight * r``.

Two kinds of model, both ``AutoModelForSequenceClassification`` loaded in float32, eval mode,
``trust_remote_code`` only when the config turns it on:

- pointwise (one output): ``r(x, y) = logit`` for the conversation ``messages + (assistant, y)``
  rendered with the REWARD MODEL's own chat template; without a chat template, the plain
  rendering of :func:`rso.transcript.hh_transcript` tokenised with the tokenizer's special tokens.
- pairwise (the paper's kind): a score ``s(a, b) = logit P(a better than b | x)`` for the text
  ``[CONTEXT] {x} [RESPONSE A] {a} [RESPONSE B] {b}`` (x = :func:`rso.transcript.hh_transcript` of the
  messages). With one output, ``P = sigmoid(z)`` so ``s = z``; with two outputs,
  ``P = softmax(z)[1]`` (class 1 = "A is better") so ``s = z1 - z0``. Taking the score in logit
  space directly is exact and never saturates. Against one baseline ``y_b`` per prompt, drawn with
  ``prompt_rng(seed, prompt_id, "pairwise-baseline")``:
  ``both-orders`` (default): ``r(y) = (s(y, y_b) - s(y_b, y)) / 2``;
  ``random-flip``: a coin from ``prompt_rng(seed, prompt_id, "pairwise-flip")`` picks the order,
  ``r(y) = s(y, y_b)`` or ``-s(y_b, y)``; the baseline's own reward is 0.

Batching by length: all sequences of all prompts in a Beam batch are sorted by token length and
scored in right-padded forward passes of ``reward_batch_size`` sequences, then put back in order,
so a reward does not depend on which other sequences share its batch. Inputs longer than the
model's limit lose their oldest context tokens (:func:`truncate_left`), counted as
``reward_truncated`` (and ``reward_response_truncated`` when even the response had to be cut).
If a batch raises, its prompts are retried one by one and a prompt that still fails becomes a
``Failure("reward_failed", ...)``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import (KeyedModelHandler, ModelHandler, PredictionResult,
                                           RunInference)

from beam_pipelines.config import GenerateConfig, RewardModelSpec
from beam_pipelines.dead_letters import DEAD_LETTER, dead_letter
from beam_pipelines.elements import Candidate, Failure, PromptCandidates
from beam_pipelines.seeding import prompt_rng
from rso.config import ConfigError
from rso.reward_input import (leading_specials, pairwise_ids, pairwise_text,  # noqa: F401
                              pointwise_ids, render_pointwise, truncate_left)
from rso.transcript import hh_transcript

COUNTER_NAMESPACE = "rso"
MAIN = "main"
_UNBOUNDED = 1_000_000  # tokenizers without a limit report model_max_length ~1e30


# ------------------------------------------------------------------------------ pure helpers
def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size``, by increasing length (stable)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pairwise_rewards(num_candidates: int, baseline: int, scores: Sequence[float],
                     debias: str, flips: Sequence[bool]) -> list[float]:
    """Rewards from the pairwise scores, in the order :func:`pairwise_orders` listed them.

    both-orders: ``r_i = (s(y_i, y_b) - s(y_b, y_i)) / 2``; random-flip: ``r_i = s(y_i, y_b)`` or,
    when flipped, ``-s(y_b, y_i)``; ``r_b = 0``.
    """
    rewards = [0.0] * num_candidates
    it = iter(scores)
    for i in range(num_candidates):
        if i == baseline:
            continue
        if debias == "both-orders":
            forward, backward = next(it), next(it)
            rewards[i] = (forward - backward) / 2.0
        else:
            s = next(it)
            rewards[i] = -s if flips[i] else s
    return rewards


def pairwise_orders(num_candidates: int, baseline: int, debias: str,
                    flips: Sequence[bool]) -> list[tuple[int, int]]:
    """The (A, B) candidate-index pairs to score, in the order :func:`pairwise_rewards` reads."""
    pairs: list[tuple[int, int]] = []
    for i in range(num_candidates):
        if i == baseline:
            continue
        if debias == "both-orders":
            pairs += [(i, baseline), (baseline, i)]
        else:
            pairs.append((baseline, i) if flips[i] else (i, baseline))
    return pairs


# ------------------------------------------------------------------------------ model plumbing
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


class LoadedClassifier:
    """A loaded sequence classifier, its tokenizer, the pad id and the input length limit
    (a class, not a tuple: Beam needs a weak-referenceable object)."""

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, max_length: Optional[int],
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
                    max_length: Optional[int] = None) -> LoadedClassifier:
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


class _RewardHandler(ModelHandler[PromptCandidates, PredictionResult, LoadedClassifier]):
    """Shared plumbing of both kinds: loading, length batching, per-element retry, counters."""
    kind = ""

    def __init__(self, spec: RewardModelSpec, config: GenerateConfig):
        super().__init__(min_batch_size=1, max_batch_size=config.reward_prompts_per_batch)
        self.spec = spec
        self.config = config

    def load_model(self) -> LoadedClassifier:
        return load_classifier(self.spec.path, self.kind,
                               trust_remote_code=self.config.trust_remote_code,
                               max_length=self.config.reward_max_length)

    def get_metrics_namespace(self) -> str:
        return f"RunInference_reward_{self.kind}"

    def _plan(self, example: PromptCandidates, model: LoadedClassifier) -> _Plan:
        raise NotImplementedError

    def _score(self, batch: Sequence[PromptCandidates],
               model: LoadedClassifier) -> list[list[float]]:
        plans = [self._plan(example, model) for example in batch]
        flat = [seq for plan in plans for seq in plan.sequences]
        scores = classifier_scores(model, flat, self.config.reward_batch_size)
        rewards, start = [], 0
        for plan in plans:
            rewards.append(plan.combine(scores[start:start + len(plan.sequences)]))
            start += len(plan.sequences)
        for plan in plans:  # counted once, after success (a retried batch is not re-counted)
            if plan.truncated:
                Metrics.counter(COUNTER_NAMESPACE, "reward_truncated").inc(plan.truncated)
            if plan.response_truncated:
                Metrics.counter(COUNTER_NAMESPACE, "reward_response_truncated").inc(
                    plan.response_truncated)
        return rewards

    def run_inference(self, batch: Sequence[PromptCandidates], model: LoadedClassifier,
                      inference_args: Optional[dict[str, Any]] = None
                      ) -> Iterable[PredictionResult]:
        try:
            results: list[Any] = self._score(batch, model)
        except Exception:  # noqa: BLE001 - retried element by element to isolate the culprit
            results = []
            for example in batch:
                try:
                    results.append(self._score([example], model)[0])
                except Exception as e:  # noqa: BLE001 - becomes a dead letter, not a crash
                    results.append(Failure("reward_failed",
                                           f"{self.spec.path}: {type(e).__name__}: {e}"))
        return [PredictionResult(example, result, self.spec.path)
                for example, result in zip(batch, results)]


class PointwiseRewardHandler(_RewardHandler):
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


class PairwiseRewardHandler(_RewardHandler):
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


def reward_handler(spec: RewardModelSpec, config: GenerateConfig) -> _RewardHandler:
    """The model handler for a spec's kind."""
    return {"pointwise": PointwiseRewardHandler,
            "pairwise": PairwiseRewardHandler}[spec.kind](spec, config)


# ------------------------------------------------------------------------------ Beam transforms
def _candidate_json(c: Candidate) -> dict:
    reward = c.reward if c.reward is None or math.isfinite(c.reward) else str(c.reward)
    return {"text": c.text, "token_ids": list(c.token_ids), "reward": reward}


class _AddWeightedReward(beam.DoFn):
    """reward += weight * r (from 0.0 for the first model); a Failure drops the prompt."""

    def __init__(self, weight: float, first: bool):
        self._weight = weight
        self._first = first

    def process(self, element: tuple[str, PredictionResult]):
        prompt_id, result = element
        example: PromptCandidates = result.example
        if isinstance(result.inference, Failure):
            yield dead_letter("reward", result.inference.reason, result.inference.detail,
                              prompt_id, {"prompt": example.prompt.prompt, "candidates": [
                                  _candidate_json(c) for c in example.candidates]})
            return
        candidates = [dataclasses.replace(
            c, reward=(0.0 if self._first else c.reward) + self._weight * r)
            for c, r in zip(example.candidates, result.inference)]
        yield prompt_id, dataclasses.replace(example, candidates=candidates)


class _DropNonFinite(beam.DoFn):
    """Removes candidates whose total reward is NaN or infinite, one dead letter each."""

    def process(self, element: tuple[str, PromptCandidates]):
        prompt_id, pc = element
        kept = []
        for c in pc.candidates:
            if math.isfinite(c.reward):
                kept.append(c)
                continue
            yield dead_letter("reward", "non_finite_reward", f"total reward is {c.reward}",
                              prompt_id, _candidate_json(c))
        yield prompt_id, dataclasses.replace(pc, candidates=kept)


class ScoredRewards(NamedTuple):
    """What :class:`ScoreRewards` returns."""
    main: beam.PCollection
    dead_letter: beam.PCollection


class ScoreRewards(beam.PTransform):
    """``(prompt_id, PromptCandidates)`` -> ``ScoredRewards(main, dead_letter)``.

    - ``main``: ``(prompt_id, PromptCandidates)`` whose candidates carry
      ``reward = sum_m weight_m * r_m(x, y)`` (finite), in their original order, non-finite ones
      removed. A prompt whose candidates were all removed is still emitted (with an empty list)
      so selection counts it as under-filled.
    - ``dead_letter``: :class:`DeadLetter` ``(stage="reward")``: ``non_finite_reward``, one per
      removed candidate, ``input = {text, token_ids, reward}`` (a non-finite reward as the
      string "nan"/"inf"/"-inf"); ``reward_failed``, one per prompt a model could not score,
      ``input = {prompt, candidates}``; the prompt is dropped.
    Counters (namespace "rso"): dead_letter_non_finite_reward, dead_letter_reward_failed,
    reward_truncated, reward_response_truncated. Wrong model configs (num_labels) fail here, at construction.
    """

    def __init__(self, specs: Sequence[RewardModelSpec], config: GenerateConfig):
        super().__init__()
        for spec in specs:
            check_reward_model(spec, config.trust_remote_code)
        self._specs = list(specs)
        self._config = config

    def expand(self, pcoll: beam.PCollection) -> ScoredRewards:
        current, dead = pcoll, []
        for i, spec in enumerate(self._specs):
            label = f"Reward{i}_{spec.kind}"
            scored = current | f"{label}/Infer" >> RunInference(
                KeyedModelHandler(reward_handler(spec, self._config)))
            out = scored | f"{label}/AddWeighted" >> beam.ParDo(
                _AddWeightedReward(spec.weight, first=i == 0)).with_outputs(DEAD_LETTER,
                                                                           main=MAIN)
            current = out[MAIN]
            dead.append(out[DEAD_LETTER])
        split = current | "DropNonFinite" >> beam.ParDo(_DropNonFinite()).with_outputs(
            DEAD_LETTER, main=MAIN)
        dead.append(split[DEAD_LETTER])
        return ScoredRewards(split[MAIN], tuple(dead) | "FlattenDeadLetters" >> beam.Flatten())
