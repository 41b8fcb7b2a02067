"""Dead letters: how every stage drops something without losing it.

A stage emits a :class:`~beam_pipelines.elements.DeadLetter` on its ``dead_letter`` tagged
output (with :func:`dead_letter`, which also counts it as ``rso/dead_letter_<reason>``); the
pipeline flattens them all into ``dead_letter-*.jsonl`` and counts them per reason in the
manifest. Model handlers return a ``Failure`` for an element they could not process, and
:class:`SplitFailures` turns those into dead letters.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult

from beam_pipelines.elements import DeadLetter, Failure

DEAD_LETTER = "dead_letter"
NAMESPACE = "rso"


def count(name: str, n: int = 1) -> None:
    """Increments the pipeline counter ``rso/<name>``."""
    Metrics.counter(NAMESPACE, name).inc(n)


def dead_letter(stage: str, reason: str, detail: str, prompt_id: str | None = None,
                input: Any = None) -> beam.pvalue.TaggedOutput:
    """A tagged ``dead_letter`` output, counted as ``rso/dead_letter_<reason>``."""
    count("dead_letter_" + reason)
    return beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
        stage=stage, reason=reason, detail=detail, prompt_id=prompt_id, input=input))


class SplitFailures(beam.DoFn):
    """``(key, PredictionResult)`` -> ``(key, inference)``, or, when the inference is a
    Failure, a dead letter (stage, reason, detail, prompt_id=key, input=describe(example));
    successes count ``ok_counter``."""

    def __init__(self, stage: str, ok_counter: str, describe: Callable[[Any], Any]):
        self._stage = stage
        self._ok = Metrics.counter(NAMESPACE, ok_counter)
        self._describe = describe

    def process(self, element: tuple[str, PredictionResult]) -> Iterator[Any]:
        key, result = element
        if isinstance(result.inference, Failure):
            f = result.inference
            yield dead_letter(self._stage, f.reason, f.detail, key,
                              self._describe(result.example))
            return
        self._ok.inc()
        yield key, result.inference
