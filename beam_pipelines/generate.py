"""Candidate generation (SPEC 1): N samples per prompt from pi_sft, as Beam ModelHandlers.

For each prompt, one request draws N samples (vLLM ``SamplingParams(n=N)``: the prompt's KV
cache is shared), seeded by ``prompt_seed(run seed, prompt_id, "generate")``. Each candidate
keeps its text, generated token ids (EOS included when generated, nothing after it), finish
reason ("stop" at EOS, "length" at ``max_new_tokens`` or the context end) and

    sft_logp = sum_t log pi_sft(y_t | x, y_<t)

taken from the model's RAW distribution (before temperature, top-p, top-k), so it is the
proposal's own log-probability only when the proposal is pi_sft (temperature 1, top_p 1, no
top_k; otherwise a warning is logged once) and is always what the trainer recomputes
(``rso.logprobs.sequence_logps``). Token ids go in as given by the render stage; nothing is
re-tokenised.

Engines (``config.engine``):
- ``vllm`` (:class:`VLLMGenerationHandler`): the offline ``vllm.LLM`` with
  ``logprobs_mode="raw_logprobs"`` set explicitly; sft_logp is each sample's
  ``cumulative_logprob``. One engine per process: :func:`get_vllm_engine` caches engines by
  their settings, so several pipelines (or RunInference transforms, or tests) in one process
  share an engine instead of starting a new one (~10 s and a KV cache each). The engine is
  kept until the process exits or :func:`clear_vllm_engines` is called.
- ``transformers`` (:class:`TransformersGenerationHandler`): ``model.generate(do_sample=True,
  num_return_sequences=N, output_logits=True)``, one call per prompt so that each prompt's
  samples depend only on its own seed (``torch.manual_seed`` inside a forked RNG state);
  sft_logp from the raw ``logits`` with ``rso.logprobs.gather_logps``.

A batch whose engine call raises is retried one prompt at a time; a prompt that still fails
becomes ``Failure(reason="generation_failed")`` and the others succeed. :class:`GenerateCandidates`
wraps it all: RunInference over a KeyedModelHandler, failures to a ``dead_letter`` output.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

import apache_beam as beam
from apache_beam.ml.inference.base import (KeyedModelHandler, ModelHandler, PredictionResult,
                                           RunInference)

from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import (Candidate, Failure, PromptCandidates,
                                    RenderedPrompt)
from beam_pipelines.dead_letters import DEAD_LETTER, SplitFailures
from beam_pipelines.render import context_length, new_token_budget
from beam_pipelines.seeding import prompt_seed

log = logging.getLogger(__name__)
SEED_STREAM = "generate"
METRICS_NAMESPACE = "rso_generate"
_warned_not_pi_sft = False

T = TypeVar("T")
R = TypeVar("R")


# ----------------------------------------------------------------------------- shared helpers
def warn_if_not_pi_sft(config: GenerateConfig) -> None:
    """Logs once per process when the proposal is not pi_sft itself (SPEC 1)."""
    global _warned_not_pi_sft
    if not config.is_pi_sft_proposal and not _warned_not_pi_sft:
        _warned_not_pi_sft = True
        log.warning("the proposal is not pi_sft (temperature=%g, top_p=%g, top_k=%d): statistical "
                    "rejection sampling assumes samples from pi_sft itself; sft_logp stays the "
                    "raw pi_sft log-probability", config.temperature, config.top_p, config.top_k)


class Loaded:
    """What ``load_model()`` returns: Beam needs a weak-referenceable object (not a tuple)."""

    def __init__(self, **parts: Any):
        self.__dict__.update(parts)


def run_with_retry(items: Sequence[T], fn: Callable[[Sequence[T]], list[R]], reason: str
                   ) -> list[R | Failure]:
    """``fn(items)``; if it raises, ``fn([item])`` for each item so that only the items that
    fail on their own become ``Failure(reason, detail)``."""
    try:
        return list(fn(items))
    except Exception as e:  # noqa: BLE001 - any engine error must not kill the bundle
        if len(items) == 1:
            log.warning("%s: %s: %s", reason, type(e).__name__, e)
            return [Failure(reason=reason, detail=f"{type(e).__name__}: {e}")]
        log.warning("%s for a batch of %d (%s); retrying one at a time", reason, len(items),
                    type(e).__name__)
    return [r for item in items for r in run_with_retry([item], fn, reason)]


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


class _GenerationHandler(ModelHandler):
    """RenderedPrompt -> PromptCandidates | Failure; subclasses implement ``_generate``."""

    batched = True  # False: the engine handles one prompt per call anyway

    def __init__(self, config: GenerateConfig):
        # Full batches: the engine's throughput comes from decoding many prompts together
        # (Beam's adaptive batching would start at one prompt per call).
        super().__init__(min_batch_size=config.batch_size, max_batch_size=config.batch_size)
        self._config = config
        self._progress = {"prompts": 0, "tokens": 0, "seconds": 0.0}

    def _generate(self, prompts: Sequence[RenderedPrompt], model: Any) -> list[PromptCandidates]:
        raise NotImplementedError

    def run_inference(self, batch: Sequence[RenderedPrompt], model: Any,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        start = time.perf_counter()
        fn = lambda ps: self._generate(ps, model)  # noqa: E731
        groups = [list(batch)] if self.batched else [[p] for p in batch]
        results = [r for g in groups for r in run_with_retry(g, fn, "generation_failed")]
        self._log_progress(results, time.perf_counter() - start)
        return [PredictionResult(p, r, self._config.policy) for p, r in zip(batch, results)]

    def _log_progress(self, results: Sequence[Any], seconds: float) -> None:
        """One line per engine call: this worker's prompts so far and decoding speed."""
        tokens = sum(c.num_tokens for r in results if isinstance(r, PromptCandidates)
                     for c in r.candidates)
        p = self._progress
        p["prompts"] += len(results)
        p["tokens"] += tokens
        p["seconds"] += seconds
        log.info("generated %d prompts x %d candidates (%d tokens) in %.1f s, %.0f tok/s; "
                 "this worker: %d prompts, %.0f tok/s", len(results),
                 self._config.num_candidates, tokens, seconds, tokens / max(seconds, 1e-9),
                 p["prompts"], p["tokens"] / max(p["seconds"], 1e-9))

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def get_num_bytes(self, batch: Sequence[RenderedPrompt]) -> int:
        return sum(len(p.prompt.encode()) + 8 * len(p.prompt_token_ids) for p in batch)


# ----------------------------------------------------------------------------- vLLM
_ENGINES: dict[tuple, Any] = {}
_ENGINE_LOCK = threading.Lock()


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _cpu_bind() -> str:
    """The cores this process may run on, as vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` list."""
    if not hasattr(os, "sched_getaffinity"):
        return "auto"
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def configure_vllm_env(config: GenerateConfig) -> None:
    """CPU-only environment defaults (``setdefault``: the user's environment wins), set before
    an engine starts: one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), OpenMP threads bound to
    this process's cores, no AOT compile (lets the compile cache work), and the KV cache size
    (``config.vllm_cpu_kv_cache_gib`` when given overrides the environment; default 1 GiB)."""
    if not _is_cpu():
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_bind())
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if config.vllm_cpu_kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.vllm_cpu_kv_cache_gib)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def vllm_engine_kwargs(config: GenerateConfig) -> dict[str, Any]:
    """Arguments of ``vllm.LLM`` for this config (the context length is resolved so that it is
    the one the render stage checked prompts against)."""
    cpu = _is_cpu()
    kwargs: dict[str, Any] = dict(
        model=config.policy, tokenizer=config.policy, dtype=config.generation_dtype,
        seed=config.seed, trust_remote_code=config.trust_remote_code,
        max_model_len=context_length(config.policy, config.max_model_len,
                                     config.trust_remote_code),
        enforce_eager=config.enforce_eager, logprobs_mode="raw_logprobs",
        gpu_memory_utilization=(config.vllm_gpu_memory_utilization
                                or (0.3 if cpu else 0.9)))
    if cpu:
        kwargs["distributed_executor_backend"] = "uni"
        # A prompt whose prefill is split across engine steps makes vLLM rewind the request's
        # seeded generator, which CPU generators cannot do ("CPU Generator does not use
        # offset"): every request here is seeded, so prefills must not be split on CPU.
        kwargs["enable_chunked_prefill"] = False
    return kwargs


def get_vllm_engine(config: GenerateConfig):
    """The process's ``vllm.LLM`` for these settings, started on first use (see module doc)."""
    configure_vllm_env(config)
    kwargs = vllm_engine_kwargs(config)
    env = tuple(os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"))
    key = (tuple(sorted(kwargs.items())), env)
    with _ENGINE_LOCK:
        if key not in _ENGINES:
            import vllm
            import vllm.envs

            if hasattr(vllm.envs, "disable_envs_cache"):
                vllm.envs.disable_envs_cache()  # a previous engine froze the env it saw
            log.info("starting vLLM engine: %s", kwargs)
            _ENGINES[key] = vllm.LLM(**kwargs)
        return _ENGINES[key]


def clear_vllm_engines() -> None:
    """Drops the cached engines (their memory is freed once nothing else holds them)."""
    with _ENGINE_LOCK:
        _ENGINES.clear()


def vllm_sampling_params(config: GenerateConfig, prompt_id: str, max_tokens: int | None = None):
    """One request's ``SamplingParams``: n=N, the config's sampling knobs, the sampled token's
    log-prob per step (``logprobs=0``), seeded by (run seed, prompt_id)."""
    from vllm import SamplingParams

    return SamplingParams(n=config.num_candidates, max_tokens=max_tokens or config.max_new_tokens,
                          temperature=config.temperature, top_p=config.top_p,
                          top_k=config.top_k, logprobs=0,
                          seed=prompt_seed(config.seed, prompt_id, SEED_STREAM))


class VLLMGenerationHandler(_GenerationHandler):
    """ModelHandler[RenderedPrompt, PromptCandidates | Failure] around the offline ``vllm.LLM``.

    One batch = one ``llm.generate`` call with one request (n=N) per prompt, prompts given as
    token ids (``TokensPrompt``). The engine comes from the process cache
    (:func:`get_vllm_engine`), so ``share_model_across_processes`` stays off: each worker
    process has its own engine.
    """

    def load_model(self) -> Loaded:
        warn_if_not_pi_sft(self._config)
        return Loaded(llm=get_vllm_engine(self._config))

    def _generate(self, prompts: Sequence[RenderedPrompt], model: Loaded
                  ) -> list[PromptCandidates]:
        from vllm.inputs import TokensPrompt

        try:
            outputs = model.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p.prompt_token_ids)) for p in prompts],
                [vllm_sampling_params(self._config, p.prompt_id) for p in prompts],
                use_tqdm=False)
        except Exception:
            abort_unfinished(model.llm)
            raise
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        return [PromptCandidates(p, [_vllm_candidate(c) for c in out.outputs])
                for p, out in zip(prompts, outputs)]


def abort_unfinished(llm: Any) -> None:
    """Aborts every request still in the engine. ``LLM.generate`` leaves them there when an
    engine step raises, and the next ``generate`` would wait on them forever."""
    engine = llm.llm_engine
    ids = list(engine.output_processor.request_states)
    if ids:
        log.warning("aborting %d unfinished vLLM requests after an engine error", len(ids))
        engine.abort_request(ids, internal=True)


def _vllm_candidate(out: Any) -> Candidate:
    if out.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"unexpected finish reason {out.finish_reason!r}")
    if out.cumulative_logprob is None:
        raise RuntimeError("vLLM returned no cumulative_logprob (logprobs were not requested)")
    return Candidate(text=out.text, token_ids=tuple(int(t) for t in out.token_ids),
                     finish_reason=out.finish_reason, sft_logp=float(out.cumulative_logprob))


# ----------------------------------------------------------------------------- transformers
@contextlib.contextmanager
def seeded(seed: int, device: Any):
    """Runs the block with torch's RNG (CPU, and ``device`` if CUDA) seeded by ``seed``, and
    restores the previous RNG state afterwards."""
    import torch

    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class TransformersGenerationHandler(_GenerationHandler):
    """ModelHandler[RenderedPrompt, PromptCandidates | Failure] around ``model.generate``.

    One ``generate`` call per prompt (N sequences in one batch), seeded per prompt; slower than
    vLLM, but needs only transformers. Precision: ``config.generation_dtype``.
    """

    batched = False

    def load_model(self) -> Loaded:
        from transformers import GenerationConfig

        from rso import hf

        warn_if_not_pi_sft(self._config)
        c = self._config
        tokenizer = hf.load_tokenizer(c.policy, c.trust_remote_code)
        model = hf.load_causal_lm(c.policy, c.generation_dtype, None, c.trust_remote_code)
        eos = eos_token_ids(tokenizer, model.generation_config)
        if not eos:
            raise ValueError(f"{c.policy}: neither the tokenizer nor the generation config has "
                             f"an EOS token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
        # generate() fills unset options from the model's generation config (a checkpoint may
        # set repetition_penalty, min_new_tokens...): replace it so only our options apply.
        model.generation_config = GenerationConfig(eos_token_id=sorted(eos), pad_token_id=pad)
        return Loaded(model=model, tokenizer=tokenizer, eos=eos, pad=pad,
                      max_model_len=context_length(c.policy, c.max_model_len,
                                                   c.trust_remote_code))

    def _generate(self, prompts: Sequence[RenderedPrompt], model: Loaded
                  ) -> list[PromptCandidates]:
        return [self._generate_one(p, model) for p in prompts]

    def _generate_one(self, prompt: RenderedPrompt, m: Loaded) -> PromptCandidates:
        import torch
        from transformers import GenerationConfig

        from rso.logprobs import gather_logps

        c = self._config
        budget = new_token_budget(len(prompt.prompt_token_ids), c.max_new_tokens,
                                  m.max_model_len)
        if budget < 1:
            raise ValueError(f"prompt of {len(prompt.prompt_token_ids)} tokens leaves no room "
                             f"in a context of {m.max_model_len}")
        # top_k=0 explicitly: unset, generate() would apply its global default of 50.
        gen = GenerationConfig(do_sample=True, temperature=c.temperature, top_p=c.top_p,
                               top_k=c.top_k, max_new_tokens=budget,
                               num_return_sequences=c.num_candidates, eos_token_id=sorted(m.eos),
                               pad_token_id=m.pad, output_logits=True,
                               return_dict_in_generate=True)
        device = next(m.model.parameters()).device
        input_ids = torch.tensor([prompt.prompt_token_ids], dtype=torch.long, device=device)
        with torch.inference_mode(), seeded(prompt_seed(c.seed, prompt.prompt_id, SEED_STREAM),
                                            device):
            out = m.model.generate(input_ids=input_ids,
                                   attention_mask=torch.ones_like(input_ids),
                                   generation_config=gen)
        generated = out.sequences[:, input_ids.shape[1]:]  # [N, T]
        logits = torch.stack(out.logits, dim=1)  # [N, T, V], raw (before any processor)
        kept = [truncate_at_eos(row.tolist(), m.eos) for row in generated]
        mask = torch.zeros(generated.shape, dtype=torch.float32, device=device)
        for i, (ids, _) in enumerate(kept):
            mask[i, :len(ids)] = 1.0
        logps = gather_logps(logits, generated, mask).tolist()
        return PromptCandidates(prompt, [
            Candidate(text=response_text(m.tokenizer, prompt.prompt_token_ids, ids),
                      token_ids=ids, finish_reason=finish, sft_logp=float(lp))
            for (ids, finish), lp in zip(kept, logps)])


def make_generation_handler(config: GenerateConfig) -> ModelHandler:
    """The handler for ``config.engine``: ``vllm`` or ``transformers``."""
    handlers = {"vllm": VLLMGenerationHandler, "transformers": TransformersGenerationHandler}
    return handlers[config.engine](config)


# ----------------------------------------------------------------------------- Beam plumbing
def describe_prompt(p: RenderedPrompt) -> dict:
    """A rendered prompt as JSON for a dead letter."""
    return {"prompt": p.prompt, "prompt_token_ids": list(p.prompt_token_ids)}


class GenerateCandidates(beam.PTransform):
    """PCollection[RenderedPrompt] -> ``DoOutputsTuple``: ``.candidates`` (main, ``(prompt_id,
    PromptCandidates)``) and ``.dead_letter`` (DeadLetter(stage="generate",
    reason="generation_failed")). Counters: ``prompts_generated``, ``dead_letter_<reason>``."""

    def __init__(self, config: GenerateConfig, handler: ModelHandler | None = None):
        super().__init__()
        self._handler = handler or make_generation_handler(config)

    def expand(self, prompts):
        return (prompts
                | "KeyByPromptId" >> beam.Map(lambda p: (p.prompt_id, p))
                | "Generate" >> RunInference(KeyedModelHandler(self._handler))
                | "SplitFailures" >> beam.ParDo(SplitFailures(
                    "generate", "prompts_generated", describe_prompt)).with_outputs(
                        DEAD_LETTER, main="candidates"))
