"""SELECT and PAIR stages: per prompt, keep k of the N scored candidates (SPEC 3) and pair them
(SPEC 4), then turn pairs into SPEC 5 records.

The N candidates of a prompt are born together (one engine request with n=N), so the keyed
per-prompt element is already the group: no GroupByKey is needed before selection. The algorithms
are the pure functions of `sampling.py` and `pairing.py`; this file is their Beam plumbing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipelines import pairing, sampling
from beam_pipelines.config import GenerateConfig
from beam_pipelines.records import Candidate, PromptCandidates, PromptSummary
from beam_pipelines.seeding import prompt_rng

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
    kept_idx = sampling.select(config.selection, rewards, k, config.effective_beta,
                               prompt_rng(config.seed, prompt_id, "select"),
                               rest_threshold=config.rest_threshold) if pool else []
    kept = [pool[i] for i in kept_idx]
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
        num_generated_tokens=sum(c.num_tokens for c in candidates))
    return dataclasses.replace(group, candidates=kept, pairs=pairs,
                               num_candidates=len(pool)), summary


def pair_records(group: PromptCandidates, config: GenerateConfig, run_id: str, policy_model: str, reward_model: str) -> list[dict[str, Any]]:
    """SPEC 5 records, one per (chosen, rejected) pair of a selected group."""
    p = group.prompt
    common = {
        "prompt_id": p.prompt_id, "prompt": p.prompt, "prompt_token_ids": list(p.prompt_token_ids),
        "selection": config.selection, "pairing": config.pairing,
        "beta": float(config.effective_beta), "num_candidates": group.num_candidates,
        "num_accepted": len(group.candidates), "policy_model": policy_model,
        "reward_model": reward_model, "run_id": run_id,
    }
    records = []
    for ci, ri in group.pairs or []:
        c: Candidate = group.candidates[ci]
        r: Candidate = group.candidates[ri]
        records.append({
            **common,
            "chosen": c.text, "rejected": r.text,
            "chosen_token_ids": list(c.token_ids), "rejected_token_ids": list(r.token_ids),
            "ref_chosen_logps": float(c.sft_logp), "ref_rejected_logps": float(r.sft_logp),
            "chosen_reward": float(c.reward), "rejected_reward": float(r.reward),
            "chosen_finish_reason": c.finish_reason, "rejected_finish_reason": r.finish_reason,
        })
    return records


def sft_records(group: PromptCandidates, config: GenerateConfig, run_id: str,
                policy_model: str, reward_model: str) -> list[dict[str, Any]]:
    """best-of-n: one SFT target (prompt, completion) per prompt, as RAFT trains on."""
    p = group.prompt
    return [{
        "prompt_id": p.prompt_id, "prompt": p.prompt, "prompt_token_ids": list(p.prompt_token_ids),
        "completion": c.text, "completion_token_ids": list(c.token_ids),
        "ref_logps": float(c.sft_logp), "reward": float(c.reward),
        "finish_reason": c.finish_reason, "selection": config.selection,
        "policy_model": policy_model, "reward_model": reward_model, "run_id": run_id,
    } for c in group.candidates]


class _SelectAndPairFn(beam.DoFn):
    def __init__(self, config: GenerateConfig):
        self.config = config
        self.prompts = Metrics.counter("rso", "prompts_selected")
        self.underfilled = Metrics.counter("rso", "prompts_underfilled")
        self.accepted = Metrics.counter("rso", "candidates_accepted")
        self.duplicates = Metrics.counter("rso", "candidates_duplicate")
        self.ties = Metrics.counter("rso", "pairs_tie_dropped")
        self.acceptance = Metrics.distribution("rso", "accepted_per_prompt")

    def process(self, element: tuple[str, PromptCandidates]) -> Iterator[Any]:
        prompt_id, group = element
        selected, summary = select_and_pair(group, self.config)
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
    """(prompt_id, PromptCandidates with rewards) -> main: (prompt_id, PromptCandidates holding
    the kept responses and their pairs); ``summary``: one PromptSummary per prompt."""

    def __init__(self, config: GenerateConfig):
        super().__init__()
        self.config = config

    def expand(self, groups):
        return groups | "SelectAndPair" >> beam.ParDo(_SelectAndPairFn(self.config)).with_outputs(
            SUMMARY, main="selected")


class ToRecords(beam.PTransform):
    """Selected groups -> SPEC 5 pair records (or SFT records for best-of-n)."""

    def __init__(self, config: GenerateConfig, run_id: str, policy_model: str,
                 reward_model: str):
        super().__init__()
        self.config, self.run_id = config, run_id
        self.policy_model, self.reward_model = policy_model, reward_model

    def expand(self, selected):
        cfg = self.config

        def to_records(element):
            _, group = element
            make = sft_records if cfg.selection == "best-of-n" else pair_records
            return make(group, cfg, self.run_id, self.policy_model, self.reward_model)

        return selected | "ToRecords" >> beam.FlatMap(to_records)

