"""SELECT and PAIR stages: per prompt, keep k of the N scored candidates (SPEC 3) and pair them
(SPEC 4). The SPEC 5 records are built from the result in ``records.py``.

The N candidates of a prompt are born together (one engine request with n=N), so the keyed
per-prompt element is already the group: no GroupByKey is needed before selection. The algorithms
are the pure functions of `sampling.py` and `pairing.py`; this file is their Beam plumbing.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipelines import pairing, sampling
from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import PromptCandidates, PromptSummary
from beam_pipelines.seeding import prompt_rng
from beam_pipelines.stage import NAMESPACE, StageOutput, StageParDo

STAGE = "select"
SUMMARY = "summary"


def select_and_pair(group: PromptCandidates, config: GenerateConfig
                    ) -> tuple[PromptCandidates, PromptSummary]:
    """Dedup, select k by the configured method, pair the kept ones. Deterministic per prompt."""
    prompt_id = group.prompt.prompt_id
    candidates = group.candidates
    unique = sampling.dedup([c.token_ids for c in candidates]) if config.dedup else list(
        range(len(candidates)))
    pool = [candidates[i] for i in unique]
    rewards = [float(c.reward) for c in pool]
    k = config.effective_num_samples
    chosen = sampling.select_rounds(config.selection, rewards, k, config.effective_beta,
                                    prompt_rng(config.seed, prompt_id, "select"),
                                    rest_threshold=config.rest_threshold,
                                    beta_scale=config.beta_scale) if pool else None
    kept = [pool[i] for i in chosen.indices] if chosen else []
    if config.selection == "best-of-n":
        pairs, ties = [], 0  # best-of-n writes SFT targets, not pairs
    else:
        pairs, ties = pairing.make_pairs(config.pairing, [c.reward for c in kept],
                                         prompt_rng(config.seed, prompt_id, "pair"),
                                         tie_margin=config.tie_margin)
    summary = PromptSummary(
        prompt_id=prompt_id, num_generated=len(candidates), num_candidates=len(pool),
        num_duplicates=len(candidates) - len(pool), num_accepted=len(kept),
        underfilled=config.selection != "rest" and len(kept) < k,
        candidate_rewards=rewards, accepted_rewards=[c.reward for c in kept],
        num_pairs=len(pairs), num_ties_dropped=ties,
        num_generated_tokens=sum(c.num_tokens for c in candidates),
        beta=chosen.beta if chosen else None,
        selection_rounds=[tuple(r) for r in chosen.rounds] if chosen else [])
    return dataclasses.replace(group, candidates=kept, pairs=pairs, num_candidates=len(pool),
                               beta=chosen.beta if chosen else None), summary


class _SelectAndPairFn(beam.DoFn):
    def __init__(self, config: GenerateConfig):
        self.config = config
        self.prompts = Metrics.counter(NAMESPACE, "prompts_selected")
        self.underfilled = Metrics.counter(NAMESPACE, "prompts_underfilled")
        self.accepted = Metrics.counter(NAMESPACE, "candidates_accepted")
        self.duplicates = Metrics.counter(NAMESPACE, "candidates_duplicate")
        self.ties = Metrics.counter(NAMESPACE, "pairs_tie_dropped")
        self.acceptance = Metrics.distribution(NAMESPACE, "accepted_per_prompt")

    def process(self, element: tuple[str, PromptCandidates]) -> Iterator[Any]:
        prompt_id, group = element
        selected, summary = select_and_pair(group, self.config)  # raises: unexpected_error
        self.prompts.inc()
        self.underfilled.inc(int(summary.underfilled))
        self.accepted.inc(summary.num_accepted)
        self.duplicates.inc(summary.num_duplicates)
        self.ties.inc(summary.num_ties_dropped)
        self.acceptance.update(summary.num_accepted)
        yield beam.pvalue.TaggedOutput(SUMMARY, summary)
        if selected.candidates:
            yield prompt_id, selected


class SelectAndPair(beam.PTransform):
    """(prompt_id, PromptCandidates with rewards) -> :class:`StageOutput`: ``main``
    (prompt_id, PromptCandidates holding the kept responses and their pairs), ``dead_letters``
    (``unexpected_error`` for a prompt whose selection raised), ``side[SUMMARY]``: one
    PromptSummary per prompt selected."""

    def __init__(self, config: GenerateConfig):
        super().__init__()
        self.config = config

    def expand(self, groups: beam.PCollection) -> StageOutput:
        return groups | "SelectAndPair" >> StageParDo(STAGE, _SelectAndPairFn(self.config),
                                                      side_tags=(SUMMARY,))
