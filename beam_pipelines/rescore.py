"""Float32 re-scoring of kept responses (SPEC 1, ``config.rescore_in_fp32``).

Generation in bfloat16 gives sft_logp values that are off by tenths of a nat per sequence; the
trainer's reference log-probs must be exact. After selection, each kept candidate's ``sft_logp``
is replaced by

    sft_logp = sum_t log pi_sft(y_t | x, y_<t)   (float32 forward pass)

computed by ``rso.logprobs.sequence_logps``: the very function the trainer uses, on the same
stored token ids, so stored and trainer-side reference log-probs agree by construction.
Candidates of all prompts in a Beam batch are sorted by length and scored in forward passes of
``config.rescore_batch_size`` sequences (left padding with explicit positions: values do not
depend on the batch they fall in beyond float rounding).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.ml.inference.base import (KeyedModelHandler, ModelHandler, PredictionResult,
                                           RunInference)

from beam_pipelines.config import GenerateConfig
from beam_pipelines.dead_letters import DEAD_LETTER, SplitFailures
from beam_pipelines.generate import Loaded, describe_prompt, run_with_retry
from beam_pipelines.elements import PromptCandidates

RESCORE_FAILED = "rescore_failed"


def rescore(model: Any, pad_id: int, items: Sequence[PromptCandidates], batch_size: int
            ) -> list[PromptCandidates]:
    """Copies of ``items`` whose candidates' sft_logp are float32 sequence log-probs."""
    import torch

    from rso.logprobs import sequence_logps

    flat = [(i, j) for i, pc in enumerate(items) for j in range(len(pc.candidates))]
    flat.sort(key=lambda ij: len(items[ij[0]].prompt.prompt_token_ids)
              + len(items[ij[0]].candidates[ij[1]].token_ids))
    logps: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        for start in range(0, len(flat), batch_size):
            chunk = flat[start:start + batch_size]
            values = sequence_logps(
                model, [items[i].prompt.prompt_token_ids for i, _ in chunk],
                [items[i].candidates[j].token_ids for i, j in chunk], pad_id)
            logps.update(zip(chunk, values.tolist()))
    return [dataclasses.replace(pc, candidates=[
        dataclasses.replace(c, sft_logp=float(logps[i, j])) for j, c in enumerate(pc.candidates)])
        for i, pc in enumerate(items)]


class Fp32RescoreHandler(ModelHandler):
    """ModelHandler[PromptCandidates, PromptCandidates | Failure]: the policy in float32
    (transformers, eval mode); see the module docstring. A batch that raises is retried one
    prompt at a time; a prompt that still fails becomes ``Failure("rescore_failed")``."""

    def __init__(self, config: GenerateConfig):
        super().__init__(min_batch_size=config.batch_size, max_batch_size=config.batch_size)
        self._config = config

    def load_model(self) -> Loaded:
        from rso import hf

        c = self._config
        tokenizer = hf.load_tokenizer(c.policy, c.trust_remote_code)
        model = hf.load_causal_lm(c.policy, "float32", "auto", c.trust_remote_code)
        return Loaded(model=model, pad=hf.pad_token_id(tokenizer, model))

    def run_inference(self, batch: Sequence[PromptCandidates], model: Loaded,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        fn = lambda items: rescore(model.model, model.pad, items,  # noqa: E731
                                   self._config.rescore_batch_size)
        results = run_with_retry(list(batch), fn, RESCORE_FAILED)
        return [PredictionResult(pc, r, self._config.policy) for pc, r in zip(batch, results)]

    def get_metrics_namespace(self) -> str:
        return "rso_rescore"


class RescoreCandidates(beam.PTransform):
    """PCollection[(prompt_id, PromptCandidates)] -> ``DoOutputsTuple``: ``.candidates`` (main,
    same shape, sft_logp re-scored in float32) and ``.dead_letter``
    (DeadLetter(stage="generate", reason="rescore_failed")). Counter: ``prompts_rescored``."""

    def __init__(self, config: GenerateConfig):
        super().__init__()
        self._handler = Fp32RescoreHandler(config)

    def expand(self, keyed_candidates):
        return (keyed_candidates
                | "RescoreFp32" >> RunInference(KeyedModelHandler(self._handler))
                | "SplitFailures" >> beam.ParDo(SplitFailures(
                    "generate", "prompts_rescored", lambda pc: describe_prompt(pc.prompt)))
                .with_outputs(DEAD_LETTER, main="candidates"))
