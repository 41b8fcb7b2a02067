"""The stage contract: how every stage of the pipeline returns its output and drops elements.

Every stage PTransform (read, render, generate, reward, select, rescore, records, write's
validation) returns a :class:`StageOutput` ``(main, dead_letters, side, usage)``:

- ``main``: the stage's output PCollection;
- ``dead_letters``: :class:`~beam_pipelines.elements.DeadLetter` records, stage-named, each
  counted as ``rso/dead_letter_<reason>``; the pipeline flattens every stage's dead letters into
  ``dead_letter-*.jsonl`` and counts them per reason in the manifest;
- ``side``: any other tagged outputs by tag (only selection's ``summary``);
- ``usage``: :class:`rso.cost.Usage` records, what the stage spent (wall and CPU seconds per
  bundle, model calls and tokens per RunInference batch); the pipeline flattens every stage's
  into the manifest's ``cost`` section (:func:`rso.cost.cost_section`). :class:`StageParDo`
  times its DoFn with :class:`MeteredDoFn`; model handlers are timed by
  :class:`beam_pipelines.handlers.MeteredKeyedHandler`.

Two kinds of failure, one shape:

- Expected, per element: a DoFn yields :func:`dead_letter` (e.g. ``invalid_json``,
  ``prompt_too_long``, ``non_finite_reward``).
- ANY other exception raised while one element is processed: :class:`StageParDo` applies the
  DoFn as ``beam.ParDo(fn).with_exception_handling(main_tag=MAIN, dead_letter_tag=ERROR)``
  (Beam's own idiom, ``apache_beam/transforms/core.py::ParDo.with_exception_handling``). Beam
  buffers one element's outputs (``partial=False``) so a failing element emits nothing but
  its error, which :func:`error_to_dead_letter` turns into ``DeadLetter(stage,
  reason="unexpected_error", detail="<ExceptionType>: <message>", prompt_id, input)``. Every
  other element goes on; ``_SUCCESS`` is still written.

Where Beam's idiom is not used, and why:

- Model handlers (generate, reward, rescore): RunInference's own ``with_exception_handling``
  fails a whole batch when one element raises. The shared handler plumbing
  (:mod:`beam_pipelines.handlers`) instead retries a failed batch one element at a time and
  returns a ``Failure`` only for the elements that fail on their own; :class:`SplitFailures`
  makes those dead letters. An exception in ``load_model`` (a model that cannot load) still
  fails the run: no element could be processed.
- The file readers of :mod:`beam_pipelines.read` catch every exception themselves: an element
  there is a whole file, buffering its outputs would hold the file in memory, and the records
  before the damage must be kept (with the line / row group where it failed in the dead letter).
"""
from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from beam_pipelines.elements import DeadLetter, Failure
from rso.cost import Usage, metered_iter

NAMESPACE = "rso"  # every counter of the pipeline: rso/<name>
MAIN = "main"
DEAD_LETTER = "dead_letter"
ERROR = "error"  # Beam's exception-handling output: (element, (type, repr, traceback lines))
USAGE = "usage"  # rso.cost.Usage records: what a stage spent
UNEXPECTED_ERROR = "unexpected_error"

Describe = Callable[[Any], "tuple[str | None, Any]"]  # element -> (prompt_id, JSON-able input)


class StageOutput(NamedTuple):
    """What every stage PTransform returns (see the module docstring)."""
    main: beam.PCollection
    dead_letters: beam.PCollection  # PCollection[DeadLetter]
    side: Mapping[str, beam.PCollection] = types.MappingProxyType({})
    usage: beam.PCollection | None = None  # PCollection[rso.cost.Usage]


def flatten_usage(label: str, *outputs: StageOutput) -> beam.PCollection | None:
    """The ``usage`` PCollections of ``outputs`` as one (None when none has any)."""
    parts = tuple(o.usage for o in outputs if o.usage is not None)
    return parts | label >> beam.Flatten() if parts else None


def count(name: str, n: int = 1) -> None:
    """Increments the pipeline counter ``rso/<name>``."""
    Metrics.counter(NAMESPACE, name).inc(n)


def dead_letter(stage: str, reason: str, detail: str, prompt_id: str | None = None,
                input: Any = None) -> beam.pvalue.TaggedOutput:
    """A tagged ``dead_letter`` output, counted as ``rso/dead_letter_<reason>``."""
    count("dead_letter_" + reason)
    return beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
        stage=stage, reason=reason, detail=detail, prompt_id=prompt_id, input=input))


def error_detail(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"``, the detail of a dead letter made from an exception."""
    return f"{type(exc).__name__}: {exc}"


def describe_element(element: Any) -> tuple[str | None, Any]:
    """A best-effort ``(prompt_id, JSON-able input)`` for any element of the pipeline:
    ``(key, value)`` pairs are keyed by prompt_id; objects with a ``prompt_id`` (or a
    ``prompt.prompt_id``) name it; dataclasses become dicts; bytes are escaped."""
    import dataclasses

    if isinstance(element, tuple) and len(element) == 2 and isinstance(element[0], str):
        _, value = describe_element(element[1])
        return element[0], value
    if isinstance(element, Mapping):
        pid = element.get("prompt_id")
        return (pid if isinstance(pid, str) else None), dict(element)
    pid = getattr(element, "prompt_id", None) or getattr(
        getattr(element, "prompt", None), "prompt_id", None)
    if dataclasses.is_dataclass(element) and not isinstance(element, type):
        return pid, dataclasses.asdict(element)
    if isinstance(element, bytes):
        return None, element.decode("utf-8", errors="backslashreplace")
    return pid, element


def error_to_dead_letter(bad: tuple[Any, tuple[type, str, list[str]]], stage: str,
                         describe: Describe) -> DeadLetter:
    """Beam's exception-handling output ``(element, (type, repr, traceback))`` -> a
    ``DeadLetter(stage, "unexpected_error", "<Type>: <message>")``, counted."""
    element, (exc_type, exc_repr, trace) = bad
    last = trace[-1].strip() if trace else ""
    detail = last if last.startswith(exc_type.__name__) else f"{exc_type.__name__}: {exc_repr}"
    try:
        prompt_id, value = describe(element)
    except Exception:  # noqa: BLE001 - describing must never lose the dead letter
        prompt_id, value = None, repr(element)
    count("dead_letter_" + UNEXPECTED_ERROR)
    return DeadLetter(stage=stage, reason=UNEXPECTED_ERROR, detail=detail,
                      prompt_id=prompt_id, input=value)


class MeteredDoFn(beam.DoFn):
    """``fn``, timed: wall and CPU seconds spent inside ``fn.process`` (the call and each
    ``next`` of its outputs, never downstream work; :func:`rso.cost.metered_iter`), summed per
    bundle and emitted at its end as one ``Usage(stage)`` on the ``usage`` output. Setup,
    bundle and teardown calls go to ``fn``; ``process`` arguments (side inputs) are passed on.
    Outputs are not buffered: a file reader's lines stream as before."""

    def __init__(self, stage: str, fn: beam.DoFn):
        self._stage, self._fn = stage, fn
        self._usage: Usage | None = None

    def setup(self) -> None:
        self._fn.setup()

    def start_bundle(self) -> None:
        self._usage = Usage(self._stage)
        self._fn.start_bundle()

    def process(self, *args, **kwargs):  # no hints: Beam would type-check *args against them
        if self._usage is None:  # a runner that skipped start_bundle
            self._usage = Usage(self._stage)
        return metered_iter(lambda: self._fn.process(*args, **kwargs), self._usage)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._fn.finish_bundle() or ()
        usage, self._usage = self._usage, None
        if usage is not None and usage.wall_seconds > 0:
            yield beam.pvalue.TaggedOutput(USAGE, GlobalWindows.windowed_value(usage))

    def teardown(self) -> None:
        self._fn.teardown()


class StageParDo(beam.PTransform):
    """``pcoll | StageParDo(stage, fn)`` -> :class:`StageOutput`.

    ``fn`` yields main outputs, :func:`dead_letter` outputs and ``TaggedOutput``s of
    ``side_tags``; any exception it raises for an element becomes an ``unexpected_error`` dead
    letter (``describe(element)`` gives its prompt_id and input), and the element's other
    outputs are dropped (Beam buffers them). ``args``/``kwargs`` go to ``beam.ParDo`` (side
    inputs). ``fn`` is timed (:class:`MeteredDoFn`, under ``stage``) and may itself emit
    ``Usage`` records on the ``usage`` tag; both are the result's ``usage``.
    """

    def __init__(self, stage: str, fn: beam.DoFn, *args: Any, side_tags: Iterable[str] = (),
                 describe: Describe = describe_element, **kwargs: Any):
        super().__init__()
        self._stage, self._fn, self._args, self._kwargs = stage, fn, args, kwargs
        self._side_tags = tuple(side_tags)
        self._describe = describe

    def expand(self, pcoll: beam.PCollection) -> StageOutput:
        tags = (DEAD_LETTER, USAGE, *self._side_tags)
        fn = MeteredDoFn(self._stage, self._fn)
        out = pcoll | "Process" >> beam.ParDo(fn, *self._args, **self._kwargs) \
            .with_output_types(Any, **{t: Any for t in tags}) \
            .with_exception_handling(main_tag=MAIN, dead_letter_tag=ERROR) \
            .with_outputs(*tags, main=MAIN)
        errors = out[ERROR] | "ErrorsToDeadLetters" >> beam.Map(
            error_to_dead_letter, self._stage, self._describe)
        dead = (out[DEAD_LETTER], errors) | "DeadLetters" >> beam.Flatten()
        return StageOutput(out[MAIN], dead, {t: out[t] for t in self._side_tags}, out[USAGE])


class SplitFailures(beam.DoFn):
    """``(key, PredictionResult[, usage])`` -> ``(key, merge(example, inference))``, or, when
    the inference is a :class:`Failure`, a dead letter ``(stage, reason, detail, prompt_id=key,
    input=describe(example))``; successes count ``rso/<ok_counter>``. ``merge`` defaults to
    the inference itself. A ``Usage`` (a metered batch's, carried by its first element; see
    :class:`beam_pipelines.handlers.MeteredKeyedHandler`) goes to the ``usage`` output (and
    is lost with that element's outputs if handling it raises: an ``unexpected_error``)."""

    def __init__(self, stage: str, ok_counter: str, describe: Callable[[Any], Any],
                 merge: Callable[[Any, Any], Any] | None = None):
        self._stage = stage
        self._ok = Metrics.counter(NAMESPACE, ok_counter)
        self._describe = describe
        self._merge = merge

    def process(self, element: tuple) -> Iterator[Any]:
        key, result, *usage = element
        if usage and usage[0] is not None:
            yield beam.pvalue.TaggedOutput(USAGE, usage[0])
        if isinstance(result.inference, Failure):
            f = result.inference
            yield dead_letter(self._stage, f.reason, f.detail, key,
                              self._describe(result.example))
            return
        self._ok.inc()
        yield key, (result.inference if self._merge is None
                    else self._merge(result.example, result.inference))
