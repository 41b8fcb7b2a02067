"""Float32 re-scoring of kept responses (SPEC 1, ``config.rescore_in_fp32``).

Generation in bfloat16 gives sft_logp values that are off by tenths of a nat per sequence; the
trainer's reference log-probs must be exact. After selection, each kept candidate's ``sft_logp``
is replaced by

    sft_logp = sum_t log pi_sft(y_t | x, y_<t)   (float32 forward pass)

computed by ``rso.logprobs.shared_prompt_logps``: the trainer's log-prob sum
(``rso.logprobs``), on the same stored token ids, with the prompt encoded once and its key/value
cache shared by the prompt's responses (equal to the trainer's values up to float rounding,
~1e-5 nats; the prompt's tokens cost once instead of k times).
Each prompt's candidates are scored on their own: sorted by length (then ids) and cut into
forward passes of ``config.rescore_batch_size`` sequences, never mixed with another prompt's.
So every forward pass, padding included, is a function of the prompt alone and the values are
bit-identical whatever other prompts share the Beam batch (float rounding depends on the padded
shape, so mixing prompts made values depend on bundle timing).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import apache_beam as beam

from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import PromptCandidates
from beam_pipelines.generate import describe_prompt
from beam_pipelines.handlers import InferStage, Loaded, RetryingHandler, set_torch_threads
from beam_pipelines.stage import StageOutput
from rso import cost

STAGE = "rescore"
RESCORE_FAILED = "rescore_failed"


def rescore(model: Any, pad_id: int, items: Sequence[PromptCandidates], batch_size: int
            ) -> list[PromptCandidates]:
    """Copies of ``items`` whose candidates' sft_logp are float32 sequence log-probs, each
    prompt scored on its own (:func:`rescore_one`)."""
    return [rescore_one(model, pad_id, pc, batch_size) for pc in items]


def rescore_one(model: Any, pad_id: int, pc: PromptCandidates, batch_size: int
                ) -> PromptCandidates:
    """``pc`` with each candidate's sft_logp replaced by its float32 sequence log-prob: the
    prompt is encoded once and the candidates, sorted by length, run ``batch_size`` at a time
    on its key/value cache (:func:`rso.logprobs.shared_prompt_logps`)."""
    import torch

    from rso.logprobs import shared_prompt_logps

    responses = [c.token_ids for c in pc.candidates]
    with torch.inference_mode():
        logps = shared_prompt_logps(model, pc.prompt.prompt_token_ids, responses, pad_id,
                                    batch_size).tolist()
    # (shared_prompt_logps counts its forward passes as calls)
    cost.record(sequences=len(responses),
                tokens_in=len(pc.prompt.prompt_token_ids) + sum(len(r) for r in responses))
    return dataclasses.replace(pc, candidates=[
        dataclasses.replace(c, sft_logp=float(v)) for c, v in zip(pc.candidates, logps)])


class Fp32RescoreHandler(RetryingHandler):
    """ModelHandler[PromptCandidates, PromptCandidates | Failure]: the policy in float32
    (transformers, eval mode); see the module docstring. A batch that raises is retried one
    prompt at a time; a prompt that still fails becomes ``Failure("rescore_failed")``."""

    stage = STAGE
    failure_reason = RESCORE_FAILED

    def __init__(self, config: GenerateConfig):
        super().__init__(config.batch_size, config.batch_size, config.policy)
        self._config = config

    def load_model(self) -> Loaded:
        from rso import hf

        set_torch_threads(self._config.torch_threads)
        c = self._config
        tokenizer = hf.load_tokenizer(c.policy, c.trust_remote_code)
        model = hf.load_causal_lm(c.policy, "float32", "auto", c.trust_remote_code)
        return Loaded(model=model, pad=hf.pad_token_id(tokenizer, model))

    def infer(self, batch: Sequence[PromptCandidates], model: Loaded) -> list[PromptCandidates]:
        return rescore(model.model, model.pad, batch, self._config.rescore_batch_size)


def _describe_candidates(pc: PromptCandidates) -> dict:
    return describe_prompt(pc.prompt)


class RescoreCandidates(beam.PTransform):
    """PCollection[(prompt_id, PromptCandidates)] -> :class:`StageOutput`: ``main`` (same
    shape, sft_logp re-scored in float32) and ``dead_letters`` (DeadLetter(stage="rescore",
    reason="rescore_failed" or "unexpected_error")). Counter: ``prompts_rescored``."""

    def __init__(self, config: GenerateConfig):
        super().__init__()
        self._handler = Fp32RescoreHandler(config)

    def expand(self, keyed_candidates: beam.PCollection) -> StageOutput:
        return keyed_candidates | "RescoreFp32" >> InferStage(
            STAGE, self._handler, "prompts_rescored", _describe_candidates)
