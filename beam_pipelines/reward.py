"""The REWARD stage (SPEC 2): every reward model scores every candidate; each model's score is
kept on the candidate (``reward_scores``, in ``--reward-model`` order) and combined into the
one ``reward`` selection uses (:func:`beam_pipelines.reward_combination.combine_rewards`:
``--reward-combination weighted-sum`` (SPEC 2, default) or ``mean-minus-std``, a pessimistic
ensemble).

Layout: this module is the Beam plumbing (:class:`ScoreRewards`: one RunInference per model,
chained, then non-finite totals removed); the model handlers (pointwise, pairwise; loading,
deterministic per-prompt batching, truncation) are :mod:`beam_pipelines.reward_handlers`; the
pure pairwise helpers :mod:`beam_pipelines.pairwise`. Elements are ``(prompt_id,
PromptCandidates)``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import apache_beam as beam

from beam_pipelines.config import GenerateConfig, RewardModelSpec
from beam_pipelines.elements import Candidate, PromptCandidates
from beam_pipelines.handlers import InferStage
from beam_pipelines.reward_combination import combine_rewards
from beam_pipelines.reward_handlers import STAGE, check_reward_model, reward_handler
from beam_pipelines.stage import StageOutput, StageParDo, dead_letter, flatten_usage


def _candidate_json(c: Candidate) -> dict:
    reward = c.reward if c.reward is None or math.isfinite(c.reward) else str(c.reward)
    return {"text": c.text, "token_ids": list(c.token_ids), "reward": reward}


def describe_candidates(example: PromptCandidates) -> dict:
    """A prompt and its candidates as JSON for a dead letter."""
    return {"prompt": example.prompt.prompt,
            "candidates": [_candidate_json(c) for c in example.candidates]}


def add_scores(example: PromptCandidates, scores: Sequence[float]) -> PromptCandidates:
    """A copy of ``example`` whose candidates' ``reward_scores`` gain one model's ``scores``."""
    if len(scores) != len(example.candidates):
        raise ValueError(f"{len(scores)} rewards for {len(example.candidates)} candidates")
    return dataclasses.replace(example, candidates=[dataclasses.replace(
        c, reward_scores=(*c.reward_scores, float(r)))
        for c, r in zip(example.candidates, scores)])


def combine(config: GenerateConfig, weights: Sequence[float], example: PromptCandidates
            ) -> PromptCandidates:
    """``example`` with each candidate's ``reward`` combined from its ``reward_scores`` (one
    per model, ``weights`` in the same order)."""
    if not example.candidates:
        return example
    scores = [list(s) for s in zip(*(c.reward_scores for c in example.candidates))]
    rewards = combine_rewards(scores, weights, config.reward_combination,
                              config.reward_std_penalty)
    return dataclasses.replace(example, candidates=[
        dataclasses.replace(c, reward=r) for c, r in zip(example.candidates, rewards)])


class _CombineAndDropNonFinite(beam.DoFn):
    """Combines each candidate's scores into its reward, then removes candidates whose reward
    is NaN or infinite, one dead letter each."""

    def __init__(self, config: GenerateConfig, weights: Sequence[float]):
        self._config, self._weights = config, list(weights)

    def process(self, element: tuple[str, PromptCandidates]):
        prompt_id, pc = element
        pc = combine(self._config, self._weights, pc)
        kept = []
        for c in pc.candidates:
            if math.isfinite(c.reward):
                kept.append(c)
                continue
            yield dead_letter("reward", "non_finite_reward", f"total reward is {c.reward}",
                              prompt_id, _candidate_json(c))
        yield prompt_id, dataclasses.replace(pc, candidates=kept)


class ScoreRewards(beam.PTransform):
    """``(prompt_id, PromptCandidates)`` -> :class:`StageOutput` ``(main, dead_letters,
    usage)`` (``usage``: every model's batches, part ``"<i>"`` for ``--reward-model`` i, and
    the combining step's bundles).

    - ``main``: ``(prompt_id, PromptCandidates)`` whose candidates carry
      ``reward_scores`` (one per model) and the combined ``reward`` (finite), in their
      original order, non-finite ones removed. A prompt whose candidates were all removed is
      still emitted (with an empty list) so selection counts it as under-filled.
    - ``dead_letters``: :class:`DeadLetter` ``(stage="reward")``: ``non_finite_reward``, one per
      removed candidate, ``input = {text, token_ids, reward}`` (a non-finite reward as the
      string "nan"/"inf"/"-inf"); ``reward_failed``, one per prompt a model could not score,
      ``input = {prompt, candidates}``; the prompt is dropped; ``unexpected_error`` for any
      other exception.
    Counters (namespace "rso"): dead_letter_non_finite_reward, dead_letter_reward_failed,
    reward_truncated, reward_response_truncated, prompts_scored_<i> (model i).
    Wrong model configs (num_labels) fail here, at construction. ``specs`` defaults to
    ``config.reward_model``.
    """

    def __init__(self, config: GenerateConfig,
                 specs: Sequence[RewardModelSpec] | None = None):
        super().__init__()
        specs = config.reward_model if specs is None else specs
        for spec in specs:
            check_reward_model(spec, config.trust_remote_code)
        self._specs = list(specs)
        self._config = config

    def expand(self, pcoll: beam.PCollection) -> StageOutput:
        current, stages = pcoll, []
        for i, spec in enumerate(self._specs):
            scored = current | f"Reward{i}_{spec.kind}" >> InferStage(
                STAGE, reward_handler(spec, self._config), f"prompts_scored_{i}",
                describe_candidates, add_scores, part=str(i))
            current = scored.main
            stages.append(scored)
        split = current | "Combine" >> StageParDo(STAGE, _CombineAndDropNonFinite(
            self._config, [spec.weight for spec in self._specs]))
        stages.append(split)
        return StageOutput(split.main, tuple(s.dead_letters for s in stages)
                           | "FlattenDeadLetters" >> beam.Flatten(),
                           usage=flatten_usage("FlattenUsage", *stages))
