"""How the pipeline's cost grows with the number of prompts: CPU-seconds per prompt and peak RSS
of the launcher and of each worker, at several input sizes.

Each size is one whole ``rso generate`` run (read to ``_SUCCESS``) in its own process tree, on
the tiny test models (2-layer Llama policy, transformers engine, N=4, <= 8 new tokens, k=2,
tiny reward model) and the DirectRunner with ``--direct_num_workers 2`` multi-processing, so
that what is measured is the pipeline, not a model. The process tree is polled every 0.1 s
(psutil) for each process's RSS; CPU seconds are the launcher's and its children's user+system
time (``os.wait4``'s rusage covers every waited descendant). The launcher is the process that
runs ``rso generate``; workers are its descendant processes.

    .venv/bin/python benchmarks/scaling.py                        # 100, 1000, 10000 prompts
    .venv/bin/python benchmarks/scaling.py --sizes 100,1000 --repeats 3

Target (issue 10): CPU-seconds per prompt and peak RSS flat within 10% from 1,000 to 10,000
prompts (100 prompts is dominated by fixed start-up costs and is printed for reference); no
launcher state grows with the input.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_prompts(path: str, count: int) -> None:
    """``count`` distinct short prompts (JSONL, one ``prompt`` each)."""
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"prompt_id": f"p{i:06d}",
                                "prompt": f"Question {i}: what is {i % 97} plus {i % 13}?"}) + "\n")


def measure(cmd: list[str], env: dict) -> dict:
    """Runs ``cmd``; returns wall seconds, user+sys CPU seconds of the whole tree, peak RSS of
    the launcher and the largest peak RSS of any descendant, in MiB."""
    import psutil

    # stderr to a file, never a pipe read at the end: a child blocks once a pipe is full
    err_file = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    peaks: dict[int, float] = {}
    done = threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    peaks[p.pid] = max(peaks.get(p.pid, 0.0), p.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    err_file.seek(0)
    stderr = err_file.read()
    if os.waitstatus_to_exitcode(status):
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"run failed: {' '.join(cmd)}")
    launcher = peaks.pop(proc.pid, 0.0)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "launcher_mib": launcher,
            "worker_mib": max(peaks.values(), default=0.0), "processes": len(peaks) + 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--repeats", type=int, default=1, help="runs per size (median printed)")
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    args = ap.parse_args(argv)

    from tests.tiny_models import build_policy, build_reward_model

    work = tempfile.mkdtemp(prefix="rso-scaling-")
    policy = build_policy(os.path.join(work, "policy"))
    reward = build_reward_model(os.path.join(work, "rm"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        prompts = os.path.join(work, f"prompts-{size}.jsonl")
        write_prompts(prompts, size)
        runs = []
        for r in range(args.repeats):
            out = os.path.join(work, f"out-{size}-{r}")
            cmd = [sys.executable, "-m", "rso_cli.cli", "generate", "--input", prompts,
                   "--output", out, "--policy", policy, "--reward-model", reward,
                   "--engine", "transformers", "--num-candidates", "4", "--num-samples", "2",
                   "--max-new-tokens", "8", "--torch-threads", "1",
                   "--runner", "DirectRunner", "--direct_running_mode", "multi_processing",
                   "--direct_num_workers", str(args.workers)]
            runs.append(measure(cmd, env))
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row["size"] = size
        rows.append(row)

    print(f"tiny models, transformers engine, N=4, <= 8 tokens, DirectRunner multi-processing "
          f"x{args.workers}, median of {args.repeats}, {len(os.sched_getaffinity(0))} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'prompts':>8} {'wall s':>8} {'CPU s':>8} {'CPU ms/prompt':>14} "
          f"{'launcher MiB':>13} {'worker MiB':>11} {'procs':>6}")
    for r in rows:
        print(f"{r['size']:>8} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
              f"{1000 * r['cpu_s'] / r['size']:>14.1f} {r['launcher_mib']:>13.0f} "
              f"{r['worker_mib']:>11.0f} {r['processes']:>6.0f}")
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        per = (b["cpu_s"] / b["size"]) / (a["cpu_s"] / a["size"])
        mem = max(b["launcher_mib"] / a["launcher_mib"], b["worker_mib"] / a["worker_mib"])
        ok = per <= 1.1 and mem <= 1.1
        print(f"{a['size']} -> {b['size']} prompts: CPU per prompt x{per:.2f}, peak RSS "
              f"x{mem:.2f} (target <= 1.10 each: {'PASS' if ok else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
