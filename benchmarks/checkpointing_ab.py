"""Gradient checkpointing on and off, side by side: what `rso train` gains without it, and costs.

Runs `rso train` on the same pairs with and without ``--no-gradient-checkpointing``, alternating
(so both sides see the same load), ``--repeats`` times each, each run ``--steps`` optimizer steps
of the demo's settings (sigmoid-norm, gamma 0.1, lr 5e-5, batch 4). Prints each side's median
step time (step 1 left out: one-time costs) and median run time (every step: a few long batches
can dominate it), the ratios, the peak RSS of the training process
and whether the two sides' losses are equal (checkpointing recomputes the same forward, so they
should be, to float rounding at most).

    .venv/bin/python benchmarks/checkpointing_ab.py --data out/demo/pairs-rso [--repeats 2]

Not run in CI. Quote it with the load average it prints (docs/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_run(data: str, policy: str, output: str, steps: int, checkpointing: bool
            ) -> tuple[list[float], list[float], float]:
    """(step times, losses, peak RSS GiB) of one `rso train` run."""
    from trainer.metrics import METRICS_FILE, read_metrics

    flags = ["--data", data, "--policy", policy, "--output", output, "--overwrite",
             "--loss", "sigmoid-norm", "--gamma", "0.1", "--lr", "5e-5", "--batch-size", "4",
             "--max-steps", str(steps), "--warmup-steps", "0", "--seed", "0", "--no-progress",
             "--no-tensorboard", "--no-plots"]
    if not checkpointing:
        flags.append("--no-gradient-checkpointing")
    subprocess.run([sys.executable, "-m", "rso_cli.cli", "train", *flags], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = read_metrics(os.path.join(output, METRICS_FILE))
    train = [r for r in records if r["split"] == "train"]
    summary = next(r for r in records if r["split"] == "summary")
    return ([r["step_time_s"] for r in train], [r["loss"] for r in train],
            summary["peak_rss_gib"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a pipeline output's pairs (rso generate)")
    parser.add_argument("--policy",
                        default=os.path.expanduser("~/.cache/rso-pipeline/smollm2-135m-instruct"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    times: dict[bool, list[list[float]]] = {True: [], False: []}
    losses: dict[bool, list[list[float]]] = {True: [], False: []}
    rss: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.repeats):
            for on in (True, False):
                t, loss, peak = one_run(args.data, args.policy, os.path.join(work, f"{on}{i}"),
                                        args.steps, on)
                times[on].append(t)
                losses[on].append(loss)
                rss[on].append(peak)
    median = {on: statistics.median(s for t in times[on] for s in t[1:]) for on in times}
    total = {on: statistics.median(sum(t) for t in times[on]) for on in times}
    for on in (True, False):
        print(f"gradient checkpointing {'on ' if on else 'off'}: median step {median[on]:.2f} s "
              f"(step 1 left out), median run {total[on]:.0f} s ({args.steps} steps), peak "
              f"RSS {max(rss[on]):.1f} GiB")
    gap = max(abs(a - b) for x, y in zip(losses[True], losses[False]) for a, b in zip(x, y))
    print(f"off is {median[True] / median[False]:.2f}x faster per median step and "
          f"{total[True] / total[False]:.2f}x per run; losses equal: "
          f"{losses[True] == losses[False]} (largest difference {gap:.2e})")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
