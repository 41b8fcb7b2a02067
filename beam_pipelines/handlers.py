"""What the pipeline's model handlers share (generate, reward, rescore).

- :class:`Loaded`: the object ``load_model()`` returns (Beam keeps a weak reference to it, so
  it cannot be a tuple).
- :func:`run_with_retry`: the batch, then one element at a time, so that only the elements that
  fail on their own become :class:`~beam_pipelines.elements.Failure` values.
- :class:`RetryingHandler`: a ``ModelHandler`` base whose ``run_inference`` does that retry,
  whose metrics namespace is ``rso_<stage>``, and whose ``get_num_bytes`` is computed from
  token counts (:func:`num_tokens`) instead of Beam's default, which pickles every batch just
  to size it.
- :class:`MeteredKeyedHandler`: the ``KeyedModelHandler`` that times each batch and counts the
  model calls the handler reports (:func:`rso.cost.record`), for the manifest's ``cost``.
- :class:`InferStage`: RunInference over a :class:`MeteredKeyedHandler` followed by
  :class:`~beam_pipelines.stage.SplitFailures`, returning a
  :class:`~beam_pipelines.stage.StageOutput` (its ``usage``: one record per batch).

Why not RunInference's own ``with_exception_handling``: it sends a whole batch to the failed
output when one element raises, and our batches are many prompts; the retry above keeps the
others. An exception in ``load_model`` still fails the run (no element could be processed).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import apache_beam as beam
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)

from beam_pipelines.elements import Failure, PromptCandidates, RenderedPrompt
from beam_pipelines.stage import NAMESPACE, SplitFailures, StageOutput, StageParDo, error_detail
from rso.cost import Usage, metered

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
BYTES_PER_TOKEN = 8  # token ids are Python ints (int64 once in a tensor)


class Loaded:
    """What ``load_model()`` returns: Beam needs a weak-referenceable object (not a tuple)."""

    def __init__(self, **parts: Any):
        self.__dict__.update(parts)


def run_with_retry(items: Sequence[T], fn: Callable[[Sequence[T]], list[R]], reason: str,
                   prefix: str = "") -> list[R | Failure]:
    """``fn(items)``; if it raises (any exception), ``fn([item])`` for each item so that only
    the items that fail on their own become ``Failure(reason, prefix + "<Type>: <message>")``.
    """
    try:
        results = list(fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"{len(results)} results for {len(items)} inputs")
        return results
    except Exception as e:  # noqa: BLE001 - one element's error must not kill the bundle
        if len(items) == 1:
            log.warning("%s: %s", reason, error_detail(e))
            return [Failure(reason=reason, detail=prefix + error_detail(e))]
        log.warning("%s for a batch of %d (%s); retrying one at a time", reason, len(items),
                    type(e).__name__)
    return [r for item in items for r in run_with_retry([item], fn, reason, prefix)]


def default_torch_threads() -> int:
    """Half the cores this process may use, at least 1: the default of ``--torch-threads``.

    Beam workers share their cores (Dataflow's SDK processes, Flink slots, DirectRunner
    workers); a torch process using every core then waits at each OpenMP barrier for a thread
    another process has descheduled. Measured (``benchmarks/contention.py``, 2 cores, one
    competing single-thread process): the transformers engine kept 1.03x its quiet tokens/s on
    half the cores and fell to 0.03x on all of them (0.49x with ``OMP_WAIT_POLICY=PASSIVE``,
    which also cost 40% when quiet)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // 2)


def set_torch_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads or default_torch_threads())``, before a model handler's
    first forward pass. Float reductions depend on the thread count, so a fixed count makes a
    model's outputs bit-identical on workers with different core counts (the DirectRunner
    in-process or in worker processes, Dataflow machine types)."""
    import torch

    torch.set_num_threads(threads or default_torch_threads())


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restores this process's torch thread count on exit. Model handlers that run in this
    process (the FnApiRunner) set it for their stage (:func:`set_torch_threads`: half the cores
    by default); a command that runs a pipeline and then trains or generates in the same
    process (``rso demo``, ``rso iterate``, ``rso evaluate``) must not inherit that setting.
    (vLLM's CPU worker, which runs in this process, replaces ``torch.set_num_threads`` with a
    no-op once it has bound its threads: after a vLLM run neither this nor the handlers can
    change the count.)"""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def num_tokens(element: Any) -> int:
    """Token ids an element holds: a RenderedPrompt's prompt, or a PromptCandidates' prompt and
    every candidate."""
    if isinstance(element, RenderedPrompt):
        return len(element.prompt_token_ids)
    if isinstance(element, PromptCandidates):
        return (len(element.prompt.prompt_token_ids)
                + sum(len(c.token_ids) for c in element.candidates))
    raise TypeError(f"cannot count the tokens of a {type(element).__name__}")


class RetryingHandler(ModelHandler):
    """A ModelHandler whose elements are processed by ``infer(batch, model) -> list`` (one
    result per element, in order), with :func:`run_with_retry`; a result that fails on its own
    is ``Failure(failure_reason, ...)``. Subclasses set ``stage`` and ``failure_reason`` and
    implement ``load_model`` and ``infer``."""

    stage = ""
    failure_reason = ""
    meter_children = False  # MeteredKeyedHandler: also count child processes' CPU time

    def __init__(self, min_batch_size: int, max_batch_size: int, model_name: str):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self.model_name = model_name

    def infer(self, batch: Sequence[Any], model: Any) -> list[Any]:
        raise NotImplementedError

    def failure_prefix(self) -> str:
        """Prepended to a Failure's detail (e.g. the model path when there are several)."""
        return ""

    def run_inference(self, batch: Sequence[Any], model: Any,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        results = run_with_retry(list(batch), lambda items: self.infer(items, model),
                                 self.failure_reason, self.failure_prefix())
        return [PredictionResult(x, r, self.model_name) for x, r in zip(batch, results)]

    def get_metrics_namespace(self) -> str:
        return f"{NAMESPACE}_{self.stage}"

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return BYTES_PER_TOKEN * sum(num_tokens(x) for x in batch)


class MeteredKeyedHandler(KeyedModelHandler):
    """``KeyedModelHandler(handler)`` whose ``run_inference`` is timed (:func:`rso.cost.metered`:
    wall and process CPU seconds, the live child processes' CPU too when the handler sets
    ``meter_children``, e.g. vLLM's engine core) and collects the calls, sequences and tokens
    the model code reports (:func:`rso.cost.record`). Its results are ``(key, prediction,
    usage)``: the batch's ``Usage(stage, part, items=len(batch), batches=1, ...)`` on the first
    element, None on the others (:class:`~beam_pipelines.stage.SplitFailures` takes it off),
    so that the usage travels with the batch's own outputs on every runner."""

    def __init__(self, handler: ModelHandler, stage: str, part: str = ""):
        super().__init__(handler)
        self._stage, self._part = stage, part
        self._children = bool(getattr(handler, "meter_children", False))

    def run_inference(self, batch: Sequence[tuple[Any, Any]], model: Any,
                      inference_args: dict | None = None) -> Iterable[tuple[Any, Any, Any]]:
        usage = Usage(self._stage, self._part, items=len(batch), batches=1)
        with metered(usage, children=self._children):
            results = list(super().run_inference(batch, model, inference_args))
        return [(key, result, usage if i == 0 else None)
                for i, (key, result) in enumerate(results)]


class InferStage(beam.PTransform):
    """``(key, element)`` -> :class:`StageOutput` ``(main: (key, merge(element, inference)),
    dead_letters, usage)``: RunInference with ``handler`` (keyed, metered under ``stage`` and
    ``part``, e.g. a reward model's index), then failures to dead letters ``(stage,
    handler.failure_reason, detail, prompt_id=key, input=describe(element))``; successes count
    ``rso/<ok_counter>``."""

    def __init__(self, stage: str, handler: ModelHandler, ok_counter: str,
                 describe: Callable[[Any], Any],
                 merge: Callable[[Any, Any], Any] | None = None, part: str = ""):
        super().__init__()
        self._stage, self._handler, self._ok = stage, handler, ok_counter
        self._describe, self._merge, self._part = describe, merge, part

    def expand(self, keyed: beam.PCollection) -> StageOutput:
        return (keyed
                | "Infer" >> RunInference(MeteredKeyedHandler(self._handler, self._stage,
                                                              self._part))
                | "SplitFailures" >> StageParDo(self._stage, SplitFailures(
                    self._stage, self._ok, self._describe, self._merge)))
