"""Replication of RSO's claim on this machine (not run in CI): at equal N, rso (beta 0.5),
random (sft-sample-rank) and top-k (beta 0) from the same stored candidates; mean proxy reward
of the chosen responses; each trained policy's win rate against SFT under the judge.

    .venv/bin/python benchmarks/replicate_rso.py --seeds 0,1,2 [--full] [--output out/replicate]

Each seed is one `rso demo --methods rso,random,top-k --seed S` run (the same code path as the
demo). Prints one table per seed and the mean over seeds, and writes results.json; record the
table, the command, the hardware and an honest reading in docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

METHODS = ("rso", "random", "top-k")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--output", default="out/replicate")
    args = parser.parse_args()
    from rso_cli.demo import main as demo

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = os.path.join(args.output, f"seed-{seed}")
        flags = ["--output", out, "--seed", str(seed), "--methods", ",".join(METHODS)]
        if demo(flags + (["--full"] if args.full else [])):
            return 1
        with open(os.path.join(out, "demo.json")) as f:
            summary = json.load(f)
        for method, m in summary["methods"].items():
            rows.append({"seed": seed, "method": method, **{k: m[k] for k in (
                "mean_chosen_proxy_reward", "win_rate", "win_rate_ci95", "wins", "ties",
                "losses")}})
    print(f"{'seed':>4} {'method':<8} {'chosen proxy r':>14} {'win rate':>9}  95% CI")
    for r in rows:
        lo, hi = r["win_rate_ci95"]
        print(f"{r['seed']:>4} {r['method']:<8} {r['mean_chosen_proxy_reward']:>14.3f} "
              f"{r['win_rate']:>9.3f}  [{lo:.3f}, {hi:.3f}]")
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        chosen = sum(r["mean_chosen_proxy_reward"] for r in mine) / len(mine)
        win = sum(r["win_rate"] for r in mine) / len(mine)
        print(f"mean {method:<8} {chosen:>14.3f} {win:>9.3f}")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"rows": rows, "full": args.full, "machine": platform.platform(),
                   "cpus": os.cpu_count()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
