"""The GENERATE stage (SPEC 1): N samples per prompt from pi_sft, as Beam RunInference.

Layout: this module holds the Beam transform (:class:`GenerateCandidates`), the handler base
(:class:`GenerationHandler`) and what both engines share (EOS handling, response text); one
module per engine holds its model handler: :mod:`beam_pipelines.generate_vllm` (``--engine
vllm``) and :mod:`beam_pipelines.generate_hf` (``--engine transformers``). Retry, ``Loaded``
and failure splitting are the shared ones of :mod:`beam_pipelines.handlers`.

For each prompt, one request draws N samples (vLLM ``SamplingParams(n=N)``: the prompt's KV
cache is shared), seeded by ``prompt_seed(run seed, prompt_id, "generate")``. Each candidate
keeps its text, generated token ids (EOS included when generated, nothing after it), finish
reason ("stop" at EOS, "length" at ``max_new_tokens`` or the context end) and

    sft_logp = sum_t log pi_sft(y_t | x, y_<t)

taken from the model's RAW distribution (before temperature, top-p, top-k), so it is the
proposal's own log-probability only when the proposal is pi_sft (temperature 1, top_p 1, no
top_k; otherwise a warning is logged once) and is always what the trainer recomputes
(``rso.logprobs.sequence_logps``). Token ids go in as given by the render stage; nothing is
re-tokenised. The stored text is, for both engines, exactly :func:`response_text` of the
stored ids (the tokenizer's decoding; vLLM's own incremental text holds back a multi-byte
character cut by the end of the response, so it is not used), and rewards are computed on it.

Why not Beam's ``VLLMCompletionsModelHandler``: it runs vLLM's OpenAI-compatible server in a
subprocess and returns raw completion objects over HTTP (token strings and log-probs), while
this stage needs the generated token ids, per-prompt seeds and the engine-side raw
cumulative log-probs that it stores; the offline ``vllm.LLM`` gives all three in-process.

A batch whose engine call raises is retried one prompt at a time; a prompt that still fails
becomes ``Failure(reason="generation_failed")``, a dead letter, and the others succeed.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import PromptCandidates, RenderedPrompt
from beam_pipelines.handlers import InferStage, RetryingHandler, run_with_retry
from beam_pipelines.stage import StageOutput
from rso.console import counted

log = logging.getLogger(__name__)
STAGE = "generate"
SEED_STREAM = "generate"
GENERATION_FAILED = "generation_failed"
_warned_not_pi_sft = False


def warn_if_not_pi_sft(config: GenerateConfig) -> None:
    """Logs once per process when the proposal is not pi_sft itself (SPEC 1)."""
    global _warned_not_pi_sft
    if not config.is_pi_sft_proposal and not _warned_not_pi_sft:
        _warned_not_pi_sft = True
        log.warning("the proposal is not pi_sft (temperature=%g, top_p=%g, top_k=%d): statistical "
                    "rejection sampling assumes samples from pi_sft itself; sft_logp stays the "
                    "raw pi_sft log-probability", config.temperature, config.top_p, config.top_k)


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """The tokenizer's EOS plus the generation config's ``eos_token_id`` (int or list): the
    same set vLLM stops at."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def truncate_at_eos(token_ids: Sequence[int], eos_ids: frozenset[int]
                    ) -> tuple[tuple[int, ...], str]:
    """Generated ids up to and including the first EOS, and the finish reason: ``"stop"`` when
    an EOS was generated, else ``"length"``."""
    for i, t in enumerate(token_ids):
        if t in eos_ids:
            return tuple(int(x) for x in token_ids[:i + 1]), "stop"
    return tuple(int(x) for x in token_ids), "length"


def response_text(tokenizer: Any, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> str:
    """The response's text as a continuation of the prompt (special tokens skipped):
    ``decode(prompt + response)`` minus ``decode(prompt)``, which keeps the leading space that
    decoding the response alone would drop (vLLM's incremental detokenizer does the same)."""
    prefix = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + list(token_ids), skip_special_tokens=True)
    if full.startswith(prefix):
        return full[len(prefix):]
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)


class GenerationHandler(RetryingHandler):
    """ModelHandler[RenderedPrompt, PromptCandidates | Failure]; engines implement
    ``load_model`` and ``infer(prompts, model) -> list[PromptCandidates]``."""

    stage = STAGE
    failure_reason = GENERATION_FAILED
    batched = True  # False: the engine handles one prompt per call anyway

    def __init__(self, config: GenerateConfig):
        # Full batches: the engine's throughput comes from decoding many prompts together
        # (Beam's adaptive batching would start at one prompt per call).
        super().__init__(config.batch_size, config.batch_size, config.policy)
        self._config = config
        self._progress = {"prompts": 0, "tokens": 0, "seconds": 0.0}

    def run_inference(self, batch: Sequence[RenderedPrompt], model: Any,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        if not self._progress["prompts"]:  # the first batch can take minutes on a CPU
            log.info("decoding batches of %s x %s (up to %d new tokens each); one line per "
                     "batch", counted(len(batch), "prompt"),
                     counted(self._config.num_candidates, "candidate"),
                     self._config.max_new_tokens)
        start = time.perf_counter()
        fn = lambda ps: self.infer(ps, model)  # noqa: E731
        groups = [list(batch)] if self.batched else [[p] for p in batch]
        results = [r for g in groups for r in run_with_retry(g, fn, GENERATION_FAILED)]
        self._log_progress(results, time.perf_counter() - start)
        return [PredictionResult(p, r, self.model_name) for p, r in zip(batch, results)]

    def _log_progress(self, results: Sequence[Any], seconds: float) -> None:
        """One line per engine call: this worker's prompts so far and decoding speed."""
        tokens = sum(c.num_tokens for r in results if isinstance(r, PromptCandidates)
                     for c in r.candidates)
        p = self._progress
        p["prompts"] += len(results)
        p["tokens"] += tokens
        p["seconds"] += seconds
        log.info("generated %s x %s (%s) in %.1f s, %.0f tok/s; this worker: %s, %.0f tok/s",
                 counted(len(results), "prompt"),
                 counted(self._config.num_candidates, "candidate"), counted(tokens, "token"),
                 seconds, tokens / max(seconds, 1e-9), counted(p["prompts"], "prompt"),
                 p["tokens"] / max(p["seconds"], 1e-9))


def make_generation_handler(config: GenerateConfig) -> ModelHandler:
    """The handler for ``config.engine``: ``vllm`` or ``transformers`` (imported lazily: each
    engine's module imports only its own library)."""
    if config.engine == "vllm":
        from beam_pipelines.generate_vllm import VLLMGenerationHandler

        return VLLMGenerationHandler(config)
    if config.engine == "transformers":
        from beam_pipelines.generate_hf import TransformersGenerationHandler

        return TransformersGenerationHandler(config)
    raise ValueError(f"unknown engine {config.engine!r}")


def describe_prompt(p: RenderedPrompt) -> dict:
    """A rendered prompt as JSON for a dead letter."""
    return {"prompt": p.prompt, "prompt_token_ids": list(p.prompt_token_ids)}


def _key_by_prompt_id(p: RenderedPrompt) -> tuple[str, RenderedPrompt]:
    return p.prompt_id, p


class GenerateCandidates(beam.PTransform):
    """PCollection[RenderedPrompt] -> :class:`StageOutput`: ``main`` ``(prompt_id,
    PromptCandidates)``, ``dead_letters`` DeadLetter(stage="generate",
    reason="generation_failed" or "unexpected_error"). Counters: ``prompts_generated``,
    ``dead_letter_<reason>``."""

    def __init__(self, config: GenerateConfig, handler: ModelHandler | None = None):
        super().__init__()
        self._handler = handler or make_generation_handler(config)

    def expand(self, prompts: beam.PCollection) -> StageOutput:
        return (prompts
                | "KeyByPromptId" >> beam.Map(_key_by_prompt_id)
                | "Generate" >> InferStage(STAGE, self._handler, "prompts_generated",
                                           describe_prompt))
