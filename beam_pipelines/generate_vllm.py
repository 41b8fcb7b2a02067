"""``--engine vllm``: the generation model handler around the offline ``vllm.LLM``.

``logprobs_mode="raw_logprobs"`` is set explicitly; sft_logp is each sample's
``cumulative_logprob``. One engine per process: :func:`get_vllm_engine` caches engines by
their settings, so several pipelines (or RunInference transforms, or tests) in one process
share an engine instead of starting a new one (~10 s and a KV cache each). The engine is kept
until the process exits or :func:`clear_vllm_engines` is called.

The stored text is :func:`beam_pipelines.generate.response_text` of the stored ids, not vLLM's
``CompletionOutput.text``: vLLM's incremental detokenizer holds back a multi-byte character
that the end of the response cuts (the text misses it), so its text can disagree with the ids.
See :mod:`beam_pipelines.generate` for why Beam's ``VLLMCompletionsModelHandler`` is not used.

Batch composition: vLLM schedules all requests of an engine call together, so the rounding of
``cumulative_logprob`` may depend on which prompts share the call (the sampled ids do not: each
request has its own seeded generator, tested). The stored reference log-probs do not: with
``--rescore auto`` (the default for vLLM's bf16) or ``on`` they are recomputed per prompt in
float32 (:mod:`beam_pipelines.rescore`), and rewards are computed per prompt.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from beam_pipelines.config import GenerateConfig
from beam_pipelines.elements import Candidate, PromptCandidates, RenderedPrompt
from beam_pipelines.generate import (
    SEED_STREAM,
    GenerationHandler,
    response_text,
    warn_if_not_pi_sft,
)
from beam_pipelines.handlers import Loaded
from beam_pipelines.render import context_length
from beam_pipelines.seeding import prompt_seed
from rso import cost

log = logging.getLogger(__name__)


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
        # its weight-loading progress bar only with --verbose (rso.console)
        use_tqdm_on_load=logging.getLogger("vllm").isEnabledFor(logging.INFO),
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
    # what the engine is, not how its start is shown: the logging level of the moment (it
    # decides use_tqdm_on_load) must not start a second engine for the same model
    key = (tuple(sorted((k, v) for k, v in kwargs.items() if k != "use_tqdm_on_load")), env)
    with _ENGINE_LOCK:
        if key not in _ENGINES:
            import vllm
            import vllm.envs

            if hasattr(vllm.envs, "disable_envs_cache"):
                vllm.envs.disable_envs_cache()  # a previous engine froze the env it saw
            # the whole engine configuration only with --verbose (a dozen settings per start)
            detail = (kwargs if logging.getLogger("vllm").isEnabledFor(logging.INFO) else
                      f"{os.path.basename(str(kwargs['model']).rstrip('/'))}, {kwargs['dtype']}")
            log.info("starting vLLM engine (its first start compiles graphs: a minute or "
                     "more on a CPU): %s", detail)
            start = time.perf_counter()
            _ENGINES[key] = vllm.LLM(**kwargs)
            log.info("vLLM engine ready in %.0f s", time.perf_counter() - start)
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


class VLLMGenerationHandler(GenerationHandler):
    """ModelHandler[RenderedPrompt, PromptCandidates | Failure] around the offline ``vllm.LLM``.

    One batch = one ``llm.generate`` call with one request (n=N) per prompt, prompts given as
    token ids (``TokensPrompt``). The engine comes from the process cache
    (:func:`get_vllm_engine`), so ``share_model_across_processes`` stays off: each worker
    process has its own engine.
    """

    meter_children = True  # on GPU, vLLM's engine core is a child process

    def load_model(self) -> Loaded:
        warn_if_not_pi_sft(self._config)
        llm = get_vllm_engine(self._config)
        return Loaded(llm=llm, tokenizer=llm.get_tokenizer())

    def infer(self, prompts: Sequence[RenderedPrompt], model: Loaded
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
        cost.record(calls=1, sequences=sum(len(out.outputs) for out in outputs),
                    tokens_in=sum(len(p.prompt_token_ids) for p in prompts),
                    tokens_out=sum(len(c.token_ids) for out in outputs for c in out.outputs))
        return [PromptCandidates(p, [vllm_candidate(c, model.tokenizer, p.prompt_token_ids)
                                     for c in out.outputs])
                for p, out in zip(prompts, outputs)]


def abort_unfinished(llm: Any) -> None:
    """Aborts every request still in the engine. ``LLM.generate`` leaves them there when an
    engine step raises, and the next ``generate`` would wait on them forever."""
    engine = llm.llm_engine
    ids = list(engine.output_processor.request_states)
    if ids:
        log.warning("aborting %d unfinished vLLM requests after an engine error", len(ids))
        engine.abort_request(ids, internal=True)


def vllm_candidate(out: Any, tokenizer: Any, prompt_ids: Sequence[int]) -> Candidate:
    """A ``vllm.CompletionOutput`` as a Candidate; the text is ``response_text(tokenizer,
    prompt_ids, out.token_ids)`` (see the module docstring), RuntimeError for an unexpected
    finish reason or missing log-probs."""
    if out.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"unexpected finish reason {out.finish_reason!r}")
    if out.cumulative_logprob is None:
        raise RuntimeError("vLLM returned no cumulative_logprob (logprobs were not requested)")
    ids = tuple(int(t) for t in out.token_ids)
    return Candidate(text=response_text(tokenizer, prompt_ids, ids), token_ids=ids,
                     finish_reason=out.finish_reason, sft_logp=float(out.cumulative_logprob))
