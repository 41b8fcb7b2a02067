"""Each engine's tokens/s with a competing CPU-bound process on the machine, as a ratio to its
tokens/s on the same machine without it.

On Dataflow and Flink several SDK processes (and bundles) share a worker's cores, so an engine
never has the machine to itself. The competitor here is what such a neighbour looks like: a
second PyTorch process running matrix products on ``--competitor-threads`` threads (default:
half the cores). Each measurement is one ``benchmarks/engine_throughput.py`` engine process
(same prompts, n, max tokens; median of its ``--runs``), run for every engine and every thread
setting, quiet and contended alternately, so both sides of a ratio see the same machine.

Thread settings compared (``--settings``):

- ``all``: every core this process may use (torch's and vLLM's default on a quiet machine);
- ``half``: half of them;
- ``passive``: every core, with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead
  of spinning on a core another process needs).

    .venv/bin/python benchmarks/contention.py --model ~/.cache/rso-pipeline/smollm2-135m-instruct
    .venv/bin/python benchmarks/contention.py --cases transformers-fp32 --settings all,half

Target (issue 10): contended / quiet >= 0.4 for each engine with the default thread settings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENGINE_SCRIPT = os.path.join(ROOT, "benchmarks", "engine_throughput.py")
COMPETITOR = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(768, 768)
while True:
    a = torch.tanh(a @ a)
"""


def engine_rate(args: argparse.Namespace, case: str, setting: str) -> float:
    """tokens/s of one engine process (median of its runs)."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2) if setting == "half" else cores
    env = dict(os.environ)
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(
        [sys.executable, ENGINE_SCRIPT, "--model", args.model, "--prompts", str(args.prompts),
         "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens), "--runs",
         str(args.runs), "--threads", str(threads), "--only", case],
        capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{case} ({setting}) failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])["tok_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF causal LM dir (default: a tiny model built here)")
    ap.add_argument("--cases", default="transformers-fp32,vllm-fp32")
    ap.add_argument("--settings", default="all,half,passive")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--competitor-threads", type=int,
                    default=max(1, len(os.sched_getaffinity(0)) // 2))
    args = ap.parse_args(argv)
    if args.model is None:
        from tests.tiny_models import build_policy

        args.model = build_policy(tempfile.mkdtemp(prefix="tiny_policy_"))

    rows = []
    for case in args.cases.split(","):
        for setting in args.settings.split(","):
            quiet = engine_rate(args, case, setting)
            competitor = subprocess.Popen(
                [sys.executable, "-c", COMPETITOR, str(args.competitor_threads)])
            try:
                time.sleep(2)  # let it start competing
                loaded = engine_rate(args, case, setting)
            finally:
                competitor.kill()
                competitor.wait()
            rows.append((case, setting, quiet, loaded))

    print(f"model {os.path.basename(args.model.rstrip('/'))}: {args.prompts} prompts x "
          f"n={args.n}, <= {args.max_new_tokens} tokens, median of {args.runs} runs per figure, "
          f"{len(os.sched_getaffinity(0))} cores, competitor: torch on "
          f"{args.competitor_threads} thread(s), load {os.getloadavg()[0]:.1f} at the end")
    print(f"{'engine':<18} {'threads':<8} {'quiet tok/s':>12} {'contended':>10} {'ratio':>6}")
    for case, setting, quiet, loaded in rows:
        ratio = loaded / quiet
        print(f"{case:<18} {setting:<8} {quiet:>12.1f} {loaded:>10.1f} {ratio:>6.2f}"
              f"{'' if ratio >= 0.4 else '  (below 0.4)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
