"""Replication of RSO's claim on this machine (not run in CI): at equal N, rso (beta 0.5),
random (sft-sample-rank) and top-k (beta 0) from the same stored candidates; mean proxy reward
of the chosen and of the rejected responses (their difference is the pairs' mean margin); each
trained policy's win rate against SFT under the judge.

    .venv/bin/python benchmarks/replicate_rso.py --seeds 0,1,2 [--full] [--methods rso,random]
        [--output out/replicate]

Each seed is one `rso demo --methods ... --seed S` run (the same code path as the demo) into
OUTPUT/seed-S; a seed whose demo.json holds every method asked for is read, not run again,
and otherwise the demo keeps the steps it finished (`rso demo` continues an interrupted run and
runs a method added to --methods alone), so an interrupted replication resumes where it stopped
and top-k can be added to finished seeds. Prints one row per seed and method, then over all seeds:

- the pooled win rate against SFT: every (seed, prompt) comparison counted once, with its Wilson
  interval (`rso.stats.win_rate`; it treats all comparisons as independent: it ignores that each
  seed's policies were trained once, and that the seeds' evaluation shards can share prompts,
  so it is narrower than an interval over seeds; read it beside the per-seed rows);
- each method head to head with rso: on each (seed, prompt), the judge's reward of that method's
  response against the rso policy's response (same prompt, same sampling seed, same tie margin
  as the evaluation), as a win rate of rso over it.

Writes OUTPUT/results.json; record the table, the command, the hardware and an honest reading in
docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

METHODS = ("rso", "random", "top-k")


def finished_methods(out: str) -> list[str]:
    """The methods of the finished demo in ``out`` (none when there is none)."""
    try:
        with open(os.path.join(out, "demo.json")) as f:
            return list(json.load(f)["methods"])
    except (OSError, ValueError, KeyError):
        return []


def read_seed(out: str, methods: list[str] | None = None) -> dict[str, Any]:
    """A finished demo's summary (its ``methods``, or those of them named) with each method's
    per-prompt comparisons (``{method: {prompt_id: row}}`` under ``"comparisons"``) and tie
    margin."""
    from rso_cli.demo import mean_pair_reward

    with open(os.path.join(out, "demo.json")) as f:
        summary = json.load(f)
    if methods is not None:
        summary["methods"] = {m: summary["methods"][m] for m in methods}
    for m in summary["methods"].values():  # the pairs' other side (demo.json has the chosen)
        m["mean_rejected_proxy_reward"] = mean_pair_reward(m["pairs"], "rejected")
    summary["comparisons"] = {}
    for method, m in summary["methods"].items():
        with open(os.path.join(m["evaluation"], "comparisons.jsonl")) as f:
            summary["comparisons"][method] = {r["prompt_id"]: r for r in map(json.loads, f)}
        with open(os.path.join(m["evaluation"], "evaluation.json")) as f:
            summary["tie_margin"] = float(json.load(f)["settings"].get("tie_margin", 0.0))
    return summary


def aggregate(seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed rows, the pooled win rate of each method against SFT and rso head to head with
    each other method, from :func:`read_seed` summaries keyed by seed."""
    from rso import stats

    rows: list[dict[str, Any]] = []
    pooled: dict[str, list[float]] = {}
    head: dict[str, list[float]] = {}
    for seed, summary in sorted(seeds.items()):
        for method, m in summary["methods"].items():
            rows.append({"seed": seed, "method": method, **{k: m[k] for k in (
                "mean_chosen_proxy_reward", "mean_rejected_proxy_reward", "win_rate",
                "win_rate_ci95", "wins", "ties", "losses")}})
            pooled.setdefault(method, []).extend(
                r["score"] for r in summary["comparisons"][method].values())
        rso = summary["comparisons"]["rso"]
        for method, theirs in summary["comparisons"].items():
            if method == "rso":
                continue
            both = sorted(set(rso) & set(theirs))
            if any(rso[p]["policy_reward"] is None for p in both):
                continue  # a pairwise judge gives margins against SFT only
            head.setdefault(method, []).extend(stats.match_scores(
                [rso[p]["policy_reward"] for p in both],
                [theirs[p]["policy_reward"] for p in both], summary["tie_margin"]).tolist())
    def mean_over_seeds(method: str, key: str) -> float:
        values = [r[key] for r in rows if r["method"] == method]
        return sum(values) / len(values)

    return {"rows": rows,
            "pooled_vs_sft": {m: {**stats.win_rate(s), **{k: mean_over_seeds(m, k) for k in (
                "mean_chosen_proxy_reward", "mean_rejected_proxy_reward")}}
                              for m, s in pooled.items()},
            "rso_head_to_head": {m: stats.win_rate(s) for m, s in head.items()},
            "seeds": sorted(seeds)}


def format_table(result: dict[str, Any]) -> str:
    def ci(r: dict[str, Any]) -> str:
        lo, hi = r["win_rate_ci95"]
        return f"{r['win_rate']:>9.3f}  [{lo:.3f}, {hi:.3f}]  {r['wins']}/{r['ties']}/{r['losses']}"

    def proxy(r: dict[str, Any]) -> str:
        return f"{r['mean_chosen_proxy_reward']:>8.3f} {r['mean_rejected_proxy_reward']:>8.3f}"

    lines = [f"{'':>15} {'mean proxy reward':>17}",
             f"{'seed':>6} {'method':<8} {'chosen':>8} {'rejected':>8} {'win rate':>9}  95% CI"
             f"            wins/ties/losses vs SFT"]
    lines += [f"{r['seed']:>6} {r['method']:<8} {proxy(r)} {ci(r)}" for r in result["rows"]]
    lines += [f"{'pooled':>6} {m:<8} {proxy(r)} {ci(r)}"
              for m, r in result["pooled_vs_sft"].items()]
    lines += [f"rso vs {m:<8} (head to head, judge) {ci(r)}"
              for m, r in result["rso_head_to_head"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="rso first, then any of random, top-k")
    parser.add_argument("--output", default="out/replicate")
    parser.add_argument("--demo-flags", default="",
                        help="more `rso demo` flags, space-separated (tests: tiny models)")
    args = parser.parse_args(argv)
    from rso_cli.cli import main as rso  # the `rso` command: one line on Ctrl-C or SIGTERM

    methods = args.methods.split(",")
    seeds = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = os.path.join(args.output, f"seed-{seed}")
        if not set(methods) <= set(finished_methods(out)):
            flags = ["--output", out, "--seed", str(seed), "--methods", args.methods,
                     *args.demo_flags.split()]
            rc = rso(["demo", *flags, *(["--full"] if args.full else [])])
            if rc:
                return rc
        seeds[seed] = read_seed(out, methods)
    result = aggregate(seeds)
    print(format_table(result))
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({**result, "full": args.full, "methods": args.methods,
                   "machine": platform.platform(), "cpus": os.cpu_count()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
