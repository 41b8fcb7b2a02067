"""`rso inspect OUTPUT_DIR`: what a pipeline run kept, and what selection did to the rewards.

Reads a complete output directory of `rso generate` (layout: :mod:`rso.layout`; any selection
method: ``pairs-*`` records, or ``sft-*`` records for ``best-of-n``), prints a text summary and
writes these files into the output directory (or ``--plots DIR``)::

    inspect.json                 the summary below, as JSON
    inspect_rewards.png          reward densities: candidates vs accepted (left, from the
                                 manifest), chosen vs rejected or best-of-n completions (right,
                                 from the records)
    inspect_margins.png          chosen - rejected reward margin per pair, and the margin
                                 against the chosen - rejected length difference
    inspect_lengths.png          response lengths in tokens: chosen vs rejected (or completions)
    inspect_acceptance.png       prompts by number of responses kept (k), and acceptance by
                                 round of Algorithm 1 where the manifest has it
    inspect_dead_letters.png     dead letters by reason

Where each number comes from:

- counters, candidate and accepted rewards, acceptance: ``manifest.json`` (the pipeline's own
  exact statistics: the candidates' rewards are written nowhere else);
- chosen, rejected and completion rewards, pair margins, response lengths: the records
  (Parquet, else TFRecord);
- dead letters by reason: the ``dead_letter-*.jsonl`` files (checked against the manifest);
- what each stage cost (busy wall and CPU seconds, model calls, tokens/s, reward-model
  sequences per prompt, cost per 1,000 pairs): the manifest's ``cost`` section
  (:mod:`rso.cost`; absent from runs written before it existed);
- reward gain: the manifest's own per-prompt figure where it has one (a key containing
  ``gain``), else ``mean(accepted) - mean(candidates)`` and ``mean(chosen) - mean(candidates)``
  over all prompts (equal to the mean per-prompt gain when every prompt has the same N and k;
  per-prompt candidate rewards are not stored in the output).

Length bias (the classic reward-hacking signal): the fraction of pairs whose chosen response
has more tokens than the rejected one, and the same fraction among the pairs of unequal length,
each with a Wilson 95% interval (:func:`rso.stats.proportion`). Among unequal-length pairs 0.5
means no preference for length; well above 0.5 means the reward model prefers longer answers.
Equal lengths count as not longer in the first fraction and are reported separately.

A directory without ``_SUCCESS`` is refused (exit 2): it may be incomplete.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rso import checksums, console, cost, layout, schema, stats
from rso import storage as rso_io
from rso.config import ArgumentParser
from rso.plotting import NUM_BINS, density, no_data, png, pyplot

SUMMARY_FILE = "inspect.json"
PLOT_FILES = ("inspect_rewards.png", "inspect_margins.png", "inspect_lengths.png",
              "inspect_acceptance.png", "inspect_dead_letters.png")
WRITTEN_FILES = (SUMMARY_FILE, *PLOT_FILES)


class IncompleteOutputError(ValueError):
    """The directory has no ``_SUCCESS`` marker (or no manifest): it is not a finished run."""


# ---------------------------------------------------------------- reading an output directory
def check_complete(output: str) -> None:
    """Raises :class:`IncompleteOutputError` unless ``output`` holds a finished run."""
    if not layout.is_complete(output):
        raise IncompleteOutputError(f"{output} is not a complete pipeline output (no "
                                    f"{layout.SUCCESS}); wait for the run to finish or re-run it")
    if not rso_io.exists(rso_io.join(output, layout.MANIFEST)):
        raise IncompleteOutputError(f"{output} has {layout.SUCCESS} but no {layout.MANIFEST}")


def read_manifest(output: str) -> dict[str, Any]:
    """The run's manifest; ValueError (one line) when it is not readable JSON or has no
    ``run_id`` (not written by the pipeline)."""
    path = rso_io.join(output, layout.MANIFEST)
    try:
        with rso_io.open_file(path, "r") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or "run_id" not in manifest:
        raise ValueError(f"{path}: not a pipeline run's manifest (no run_id)")
    return manifest


def record_kind(output: str) -> str:
    """``"pairs"`` or ``"sft"`` (best-of-n): the prefix of the run's record files."""
    if layout.pair_files(output, prefix=layout.SFT_PREFIX):
        return layout.SFT_PREFIX
    return layout.PAIRS_PREFIX


def verify_records(output: str, manifest: Mapping[str, Any]) -> None:
    """Raises :class:`rso.checksums.ChecksumError` (a ValueError) unless the record files of a
    complete run are the ones its manifest lists, byte for byte, none missing."""
    kind = record_kind(output)
    files = manifest.get("files", {})
    checksums.verify(layout.pair_files(output, "parquet", kind) + layout.pair_files(
        output, "tfrecord", kind), dict(manifest), output,
        [*files.get("parquet", []), *files.get("tfrecord", [])])


def read_records(output: str, prefix: str = layout.PAIRS_PREFIX,
                 columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every record of a complete run's ``prefix`` files (Parquet if there is any, else
    TFRecord), as dicts holding ``columns`` (default: all of SPEC 5's, or SFT_COLUMNS for
    ``sft``). Raises :class:`IncompleteOutputError` for an unfinished directory."""
    check_complete(output)
    all_columns = schema.SFT_COLUMNS if prefix == layout.SFT_PREFIX else schema.COLUMNS
    names = list(columns or [c.name for c in all_columns])
    rows: list[dict[str, Any]] = []
    for path in layout.pair_files(output, prefix=prefix):
        if path.endswith(layout.PARQUET_SUFFIX):
            import pyarrow.parquet as pq

            with rso_io.open_file(path, "rb") as f:
                rows.extend(pq.read_table(f, columns=names).to_pylist())
        else:
            from rso.tfrecord import read_records as read_tfrecords

            for i, data in enumerate(read_tfrecords(path)):
                rec = schema.from_example(data, where=f"{path}: row {i}", columns=all_columns)
                rows.append({n: rec[n] for n in names})
    return rows


def read_dead_letters(output: str) -> Iterator[dict[str, Any]]:
    pattern = f"{layout.DEAD_LETTER_PREFIX}-*{layout.DEAD_LETTER_SUFFIX}"
    for path in rso_io.glob(rso_io.join(rso_io.escape(output), pattern)):
        with rso_io.open_file(path, "r") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def find_key(tree: Any, word: str, path: str = "") -> tuple[str, Any] | None:
    """The first (dotted path, value) in a JSON tree whose key contains ``word``, depth first
    in key order; for manifest sections added by newer pipeline versions."""
    if isinstance(tree, Mapping):
        for k in sorted(tree):
            here = f"{path}.{k}" if path else str(k)
            if word in str(k).lower() and tree[k] not in (None, {}, []):
                return here, tree[k]
            found = find_key(tree[k], word, here)
            if found:
                return found
    return None


# ---------------------------------------------------------------- the summary
def _manifest_reward(manifest: Mapping[str, Any], series: str) -> dict[str, Any] | None:
    s = (manifest.get("reward_statistics") or {}).get(series)
    if not s or not s.get("count"):
        return None
    return {k: s[k] for k in ("count", "mean", "std", "min", "max") if k in s}


def _mean(summary: Mapping[str, Any] | None) -> float | None:
    return summary.get("mean") if summary else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def summarize_output(output: str, manifest: Mapping[str, Any] | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, series): the JSON summary of a complete run and the raw series the plots draw
    (``rewards``: {name: list}, ``lengths``: {name: list}, ``margins``, ``length_diffs``).
    ``manifest``: the run's, when the caller has read it (after :func:`check_complete`)."""
    if manifest is None:
        check_complete(output)
        manifest = read_manifest(output)
    kind = record_kind(output)
    sft = kind == layout.SFT_PREFIX
    cols = (["prompt_id", "reward", "completion_token_ids"] if sft else
            ["prompt_id", "chosen_reward", "rejected_reward", "chosen_token_ids",
             "rejected_token_ids"])
    rows = read_records(output, kind, cols)
    if sft:
        rewards = {"completion": [r["reward"] for r in rows]}
        lengths = {"completion": [len(r["completion_token_ids"]) for r in rows]}
        margins: list[float] = []
        length_diffs: list[int] = []
    else:
        rewards = {"chosen": [r["chosen_reward"] for r in rows],
                   "rejected": [r["rejected_reward"] for r in rows]}
        lengths = {side: [len(r[f"{side}_token_ids"]) for r in rows]
                   for side in ("chosen", "rejected")}
        margins = [c - r for c, r in zip(rewards["chosen"], rewards["rejected"])]
        length_diffs = [c - r for c, r in zip(lengths["chosen"], lengths["rejected"])]

    dead = [d.get("reason", "?") for d in read_dead_letters(output)]
    by_reason: dict[str, int] = {}
    for reason in dead:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    manifest_dead = manifest.get("dead_letters") or {}

    reward_summary: dict[str, Any] = {}
    for series in ("candidate", "accepted"):
        reward_summary[series] = {"source": "manifest.json reward_statistics",
                                  **(_manifest_reward(manifest, series) or {"count": 0})}
    for series, values in rewards.items():
        reward_summary[series] = {"source": f"{kind}-* records", **stats.summarize(values)}
    candidate_mean = _mean(_manifest_reward(manifest, "candidate"))
    gain: dict[str, Any] = {"source": "difference of the means over all prompts",
                            "accepted_minus_candidate": _diff(
                                _mean(_manifest_reward(manifest, "accepted")), candidate_mean)}
    for series in rewards:
        gain[f"{series}_minus_candidate"] = _diff(reward_summary[series].get("mean"),
                                                  candidate_mean)
    from_manifest = find_key({k: v for k, v in manifest.items() if k != "config"}, "gain")
    if from_manifest:
        gain["manifest"] = {"key": from_manifest[0], "value": from_manifest[1]}

    acceptance = dict(manifest.get("acceptance") or {})
    by_round = find_key({k: v for k, v in manifest.items() if k != "config"}, "round")
    summary: dict[str, Any] = {
        "output": output,
        "run_id": manifest.get("run_id"),
        "records": kind,
        "selection": (manifest.get("config") or {}).get("selection"),
        "beta": (manifest.get("config") or {}).get("beta"),
        "counters": manifest.get("counters") or {},
        "dead_letters": {"total": len(dead), "by_reason": dict(sorted(by_reason.items())),
                         "manifest_total": manifest_dead.get("total"),
                         "by_stage": manifest_dead.get("by_stage") or {}},
        "rewards": reward_summary,
        "reward_gain": gain,
        "acceptance": {**acceptance, "by_round": (
            {"key": by_round[0], "value": by_round[1]} if by_round else None)},
        "lengths": {series: {"source": f"{kind}-* records, tokens", **stats.summarize(v)}
                    for series, v in lengths.items()},
        "cost": manifest.get("cost"),
        "decoding": (manifest.get("accounting") or {}).get("decoding"),
        "reuse": manifest.get("reuse"),
    }
    if not sft:
        summary["margins"] = stats.summarize(margins)
        summary["length_bias"] = {
            "chosen_longer": stats.proportion(sum(d > 0 for d in length_diffs),
                                              len(length_diffs)),
            "equal_length": sum(d == 0 for d in length_diffs),
            "chosen_longer_among_unequal": stats.proportion(
                sum(d > 0 for d in length_diffs), sum(d != 0 for d in length_diffs)),
            "margin_length_correlation": _correlation(margins, length_diffs),
        }
    series = {"rewards": rewards, "lengths": lengths, "margins": margins,
              "length_diffs": length_diffs}
    return summary, series


def _correlation(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pearson correlation, None when undefined (fewer than 2 points or a constant series)."""
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


# ---------------------------------------------------------------- text
def _fmt(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def _pct(p: Mapping[str, Any]) -> str:
    """``"41.0% (95% CI 30.2%-52.7%)"`` for a :func:`rso.stats.proportion`."""
    if not p.get("n"):
        return "n/a (no pairs)"
    ci = p["ci95"] or [None, None]
    return (f"{_fmt(p['fraction'], '.1%')} (95% CI {_fmt(ci[0], '.1%')}-"
            f"{_fmt(ci[1], '.1%')})")


def _reward_line(name: str, s: Mapping[str, Any]) -> str:
    if not s.get("count"):
        return f"  {name:<10} none"
    return (f"  {name:<10} n={s['count']:<7} mean={_fmt(s.get('mean'))} std={_fmt(s.get('std'))}"
            f" min={_fmt(s.get('min'))} max={_fmt(s.get('max'))}   [{s['source']}]")


def format_summary(summary: Mapping[str, Any]) -> str:
    """The console text of a summary."""
    c = summary["counters"]
    lines = [f"{summary['output']}: run {summary['run_id']}, selection {summary['selection']}"
             f" (beta {summary['beta']}), {summary['records']} records",
             "counts: " + ", ".join(f"{k}={v}" for k, v in c.items())]
    d = summary["dead_letters"]
    lines.append(f"dead letters: {d['total']} in files (manifest: {d['manifest_total']})"
                 + "".join(f"\n  {r}: {n}" for r, n in d["by_reason"].items()))
    if d["manifest_total"] is not None and d["total"] != d["manifest_total"]:
        lines.append(f"WARNING: the manifest counts {d['manifest_total']} dead letters but the "
                     f"dead-letter files hold {d['total']}: files were removed or changed "
                     f"after the run")
    lines.append("rewards:")
    lines += [_reward_line(name, s) for name, s in summary["rewards"].items()]
    g = summary["reward_gain"]
    lines.append("reward gain over candidates (" + g["source"] + "): " + ", ".join(
        f"{k.replace('_minus_candidate', '')} {_fmt(v, '+.4g')}"
        for k, v in g.items() if k.endswith("_minus_candidate")))
    if "manifest" in g:
        value = g["manifest"]["value"]
        if isinstance(value, Mapping):  # a series' statistics: the numbers, not the histogram
            value = ", ".join(f"{k} {_fmt(value[k])}" for k in ("count", "mean", "std", "min",
                                                                 "max") if k in value)
        lines.append(f"  manifest {g['manifest']['key']}: {value}")
    d = summary.get("decoding")
    if isinstance(d, Mapping):
        lines.append(f"decoding: decoded {d.get('prompts_decoded', 0)} prompts "
                     f"({d.get('candidates_decoded', 0)} candidates, "
                     f"{d.get('tokens_decoded', 0)} tokens), reused "
                     f"{d.get('prompts_reused', 0)} prompts ({d.get('candidates_reused', 0)} "
                     f"candidates)")
    r = summary.get("reuse")
    if isinstance(r, Mapping):
        for p in r.get("reused_from") or []:
            lines.append(f"  reused {p.get('prompts_reused')} prompts from {p.get('path')} "
                         f"(run {p.get('run_id')}{', re-scored' if p.get('rescored') else ''})")
    a = summary["acceptance"]
    lines.append(f"acceptance: mean k={_fmt(a.get('mean_accepted'))}, mean k/N="
                 f"{_fmt(a.get('mean_accepted_over_candidates'))}, under-filled="
                 f"{_fmt(a.get('underfilled_fraction'), '.1%')}, prompts by k="
                 f"{json.dumps(a.get('prompts_by_num_accepted') or {})}")
    lines.append("acceptance by round: " + (
        f"{a['by_round']['key']} = {json.dumps(a['by_round']['value'])}" if a.get("by_round")
        else "not in this manifest"))
    if "margins" in summary:
        m = summary["margins"]
        lines.append(f"pair margins (chosen - rejected): n={m['count']} mean={_fmt(m.get('mean'))}"
                     f" median={_fmt(m.get('median'))} min={_fmt(m.get('min'))}")
    for name, s in summary["lengths"].items():
        lines.append(f"length {name}: mean {_fmt(s.get('mean'), '.1f')} tokens, median "
                     f"{_fmt(s.get('median'), '.0f')}, max {_fmt(s.get('max'), '.0f')}")
    if "length_bias" in summary:
        lb = summary["length_bias"]
        p, u = lb["chosen_longer"], lb["chosen_longer_among_unequal"]
        if u["n"]:
            lines.append(f"length bias: chosen longer in {p['count']}/{p['n']} pairs = "
                         f"{_pct(p)}; among the {u['n']} pairs of unequal length {_pct(u)} "
                         f"(0.5 = no bias); corr(margin, length diff) = "
                         f"{_fmt(lb['margin_length_correlation'], '.3f')}")
        else:
            lines.append(f"length bias: none measurable: in all {p['n']} pairs both responses "
                         "have the same length (e.g. every response reached max_new_tokens)")
    c = summary.get("cost")
    if isinstance(c, Mapping):
        lines.append("cost (busy seconds summed over workers; manifest.json cost):")
        lines += ["  " + line for line in cost.format_lines(c) + cost.reward_call_lines(c)]
    else:
        lines.append("cost: not in this manifest")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots
def _manifest_density(ax, manifest_stats: Mapping[str, Any], series: str, label: str) -> bool:
    s = manifest_stats.get(series) or {}
    hist = s.get("histogram")
    if not hist or not s.get("count"):
        return False
    edges, counts = np.asarray(hist["edges"], float), np.asarray(hist["counts"], float)
    ax.stairs(counts / (counts.sum() * np.diff(edges)), edges, linewidth=1.5,
              label=f"{label} (n={s['count']}, mean={s['mean']:.3g})")
    return True


def _legend_or_no_data(ax, drawn: Sequence[bool], text: str = "no data") -> None:
    if any(drawn):
        ax.legend(fontsize=8)
    else:
        no_data(ax, text)


def render_plots(summary: Mapping[str, Any], series: Mapping[str, Any],
                 manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """{file name: PNG bytes} for :data:`PLOT_FILES`; empty data gives a labelled empty plot."""
    plt = pyplot()
    title = f"({summary.get('run_id') or ''}, {summary.get('selection')})"
    out: dict[str, bytes] = {}

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    rstats = manifest.get("reward_statistics") or {}
    _legend_or_no_data(left, [_manifest_density(left, rstats, "candidate", "candidates"),
                              _manifest_density(left, rstats, "accepted", "accepted")])
    left.set(xlabel="reward", ylabel="density", title="Candidates vs accepted (manifest)")
    rewards = series["rewards"]
    all_values = [x for v in rewards.values() for x in v]
    edges = (np.histogram_bin_edges(all_values, bins=NUM_BINS)
             if all_values and min(all_values) < max(all_values) else None)
    _legend_or_no_data(right, [density(right, v, name, edges) for name, v in rewards.items()])
    right.set(xlabel="reward", ylabel="density", title=f"Written records {title}")
    out["inspect_rewards.png"] = png(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    margins, diffs = series["margins"], series["length_diffs"]
    _legend_or_no_data(left, [density(left, margins, "chosen - rejected")],
                       "no pairs (best-of-n)" if summary["records"] == "sft" else "no pairs")
    left.set(xlabel="reward margin", ylabel="density", title=f"Pair margins {title}")
    if margins:
        right.scatter(diffs, margins, s=8, alpha=0.5)
        right.axvline(0, color="grey", linewidth=0.8)
    else:
        no_data(right, "no pairs")
    right.set(xlabel="length chosen - rejected (tokens)", ylabel="reward margin",
              title="Margin vs length difference")
    out["inspect_margins.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    lengths = series["lengths"]
    top = max([x for v in lengths.values() for x in v], default=0)
    bins = np.arange(0, top + 2) - 0.5 if top < 200 else None
    _legend_or_no_data(ax, [density(ax, v, name, bins) for name, v in lengths.items()])
    head = "Response lengths"
    lb = summary.get("length_bias")
    if lb and lb["chosen_longer_among_unequal"]["n"]:
        u = lb["chosen_longer_among_unequal"]
        head += f"\nchosen longer in {_pct(u)} of the {u['n']} pairs of unequal length"
    elif lb and lb["chosen_longer"]["n"]:
        head += "\nevery pair's responses have the same length"
    ax.set(xlabel="tokens", ylabel="density", title=head)
    out["inspect_lengths.png"] = png(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    acc = summary["acceptance"]
    by_k = {int(k): v for k, v in (acc.get("prompts_by_num_accepted") or {}).items()}
    if by_k:
        left.bar(list(by_k), list(by_k.values()))
    else:
        no_data(left)
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set(xlabel="responses kept (k)", ylabel="prompts", title=f"Kept per prompt {title}")
    rounds = _round_series((acc.get("by_round") or {}).get("value"))
    if rounds:
        right.bar([str(k) for k in rounds], list(rounds.values()))
        right.set(title=f"Acceptance by round ({acc['by_round']['key']})")
    else:
        no_data(right, "acceptance by round: not in this manifest")
    right.set(xlabel="round")
    out["inspect_acceptance.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    reasons = summary["dead_letters"]["by_reason"]
    if reasons:
        ax.barh(list(reasons), list(reasons.values()))
        ax.invert_yaxis()
    else:
        no_data(ax, "no dead letters")
    ax.set(xlabel="dead letters", title=f"Dead letters by reason {title}")
    fig.tight_layout()
    out["inspect_dead_letters.png"] = png(fig)
    return out


def _round_series(value: Any) -> dict[str, float]:
    """A manifest's per-round figures as {round: number}: a list (round 1, 2, ...) or a mapping
    of numbers; nested mappings use their first numeric list or mapping. Empty if unusable."""
    if isinstance(value, list) and value and all(isinstance(x, (int, float)) for x in value):
        return {str(i + 1): float(x) for i, x in enumerate(value)}
    if isinstance(value, Mapping):
        if value and all(isinstance(x, (int, float)) for x in value.values()):
            return {str(k): float(x) for k, x in value.items()}
        for v in value.values():
            found = _round_series(v)
            if found:
                return found
    return {}


# ---------------------------------------------------------------- command
def inspect_output(output: str, plots_dir: str | None = None) -> dict[str, Any]:
    """Writes :data:`WRITTEN_FILES` into ``plots_dir`` (default: ``output``); returns the
    summary. Raises :class:`IncompleteOutputError` for an unfinished directory and ValueError
    (:class:`rso.checksums.ChecksumError`) for a record file that differs from its manifest."""
    check_complete(output)
    manifest = read_manifest(output)
    verify_records(output, manifest)
    summary, series = summarize_output(output, manifest)
    target = plots_dir or output
    rso_io.makedirs(target)
    files = render_plots(summary, series, manifest)
    files[SUMMARY_FILE] = (json.dumps(summary, indent=2, sort_keys=True, default=str)
                           + "\n").encode()
    for name, data in files.items():
        with rso_io.open_file(rso_io.join(target, name), "wb") as f:
            f.write(data)
    summary["written"] = [rso_io.join(target, n) for n in WRITTEN_FILES]
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="rso inspect", description=console.help_text(__doc__),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="a complete `rso generate` output directory")
    parser.add_argument("--plots", default=None,
                        help="write inspect.json and the PNGs here (default: OUTPUT)")
    args = parser.parse_args(argv)
    try:
        summary = inspect_output(args.output, args.plots)
    except (IncompleteOutputError, ValueError, OSError) as e:
        sides = [rso_io.join(args.output, "generations", side) for side in ("policy", "baseline")]
        message = str(e)
        if any(layout.is_complete(side) for side in sides):  # not unfinished: another kind
            message = (f"{args.output} is an `rso evaluate` output, not a pipeline run: "
                       f"inspect {' or '.join(sides)}")
        print(f"rso inspect: error: {message}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"wrote {', '.join(summary['written'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
