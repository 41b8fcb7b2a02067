"""SPEC 5 records: the rows the write stage stores, built from selected groups.

``pair_records`` makes one preference record per (chosen, rejected) pair (TRL's column names,
``rso.schema.COLUMNS``); ``sft_records`` one SFT target per kept response for ``best-of-n``
(``rso.schema.SFT_COLUMNS``). :class:`ToRecords` is their Beam plumbing.
"""
from __future__ import annotations

from typing import Any

import apache_beam as beam

from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import Candidate, PromptCandidates
from beam_pipelines.stage import StageOutput, StageParDo

STAGE = "records"


def pair_records(group: PromptCandidates, config: GenerateConfig, run_id: str,
                 policy_model: str, reward_model: str) -> list[dict[str, Any]]:
    """SPEC 5 records, one per (chosen, rejected) pair of a selected group."""
    p = group.prompt
    common = {
        "prompt_id": p.prompt_id, "prompt": p.prompt, "prompt_token_ids": list(p.prompt_token_ids),
        "selection": config.selection, "pairing": config.pairing,
        "beta": float(config.effective_beta if group.beta is None else group.beta),
        "num_candidates": group.num_candidates,
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


class _ToRecordsFn(beam.DoFn):
    def __init__(self, config: GenerateConfig, run_id: str, policy_model: str,
                 reward_model: str):
        self.config, self.run_id = config, run_id
        self.policy_model, self.reward_model = policy_model, reward_model

    def process(self, element: tuple[str, PromptCandidates]) -> list[dict[str, Any]]:
        _, group = element
        make = sft_records if self.config.selection == "best-of-n" else pair_records
        return make(group, self.config, self.run_id, self.policy_model, self.reward_model)


class ToRecords(beam.PTransform):
    """Selected groups -> :class:`StageOutput`: ``main`` SPEC 5 pair records (or SFT records
    for best-of-n), ``dead_letters`` (``unexpected_error`` for a group that could not become
    records: none of its records is written)."""

    def __init__(self, config: GenerateConfig, run_id: str, policy_model: str,
                 reward_model: str):
        super().__init__()
        self._fn = _ToRecordsFn(config, run_id, policy_model, reward_model)

    def expand(self, selected: beam.PCollection) -> StageOutput:
        return selected | "ToRecords" >> StageParDo(STAGE, self._fn)
