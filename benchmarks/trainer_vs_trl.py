"""`rso train` vs TRL's DPOTrainer: same model, pairs and steps; ratios of pairs/s and peak RSS.

    .venv/bin/pip install trl==1.16.0            # setup.py's bench extra; adds only trl to .venv
    .venv/bin/python benchmarks/trainer_vs_trl.py [--cache-dir ~/.cache/rso-pipeline] [--out DIR]

What runs (defaults in brackets):
- Model: SmolLM2-135M-Instruct in fp32, from ``rso_cli.demo.prepare_policy(--cache-dir)``.
- Pairs: the first ``--num-pairs`` [64] HH-RLHF harmless-base test pairs (bundled with ``rso``)
  whose prompt + longer response is at most ``--max-tokens`` [256] tokens. The prompt is the
  dialogue before the last Assistant turn (``beam_pipelines.prompts.parse_hh_dialogue``), rendered
  with the model's chat template (``beam_pipelines.render.render_prompt``); the responses are the
  final Assistant turns of ``chosen`` / ``rejected``, tokenised + EOS. They are written once as a
  pipeline output directory (``pairs-00000-of-00001.parquet`` with ``rso.schema.arrow_schema()``,
  ``_SUCCESS``) with reference log-probs from ``rso.logprobs.sequence_logps`` in fp32 (not
  timed: in the real system the pipeline computes them). Reused while the inputs match.
- ``ours``: ``python -m trainer.train`` (loss sigmoid-norm, reference from the data, one model,
  its defaults: gradient checkpointing, fused AdamW, length-bucketed batches, a final
  checkpoint, whose writing counts in its peak RSS). ``ours-no-gc``: the same with
  ``--no-gradient-checkpointing``.
- ``trl``: ``DPOTrainer`` with loss ``sigmoid`` and its own reference model, otherwise TRL's
  defaults (gradient checkpointing on, fused AdamW); ``trl-no-gc``: gradient checkpointing off.
  TRL reads the same Parquet file's string columns; ``benchmarks/trl_dpo_worker.py`` checks that
  its tokenisation equals the stored token ids, so both train on identical tokens.
- All: ``--steps`` [8] optimizer steps of ``--batch-size`` [4] pairs, no accumulation, AdamW,
  lr [1e-6] with linear decay, gradient clipping 1.0, gamma = TRL beta [0.1], fp32 (TRL's
  ``bf16`` default is turned off), ``--threads`` [2] torch threads and OMP_NUM_THREADS.
  ``--variants`` [ours,trl] picks the runs; ``--repeats`` [3] runs each, alternating variants
  (each repeat starts with the next one) so that changes in machine load hit all of them alike.
  Defaults take about 10-15 minutes on 2 quiet cores; on a shared machine much longer (the
  1-minute load average before and after each run is recorded).
- Each run is its own subprocess, so its peak RSS (``ru_maxrss`` of that child, from ``wait4``)
  is isolated. pairs/s counts only the optimizer steps (forward, backward, clipping, optimizer):
  model loading, tokenisation, the reference pass and checkpoint writing are outside it. Our
  runs' final checkpoints are deleted once their metrics are read.

Table columns (medians over runs): pairs/s and its range; steady = pairs/s without step 1 (which
pays one-time costs in both trainers); train s = the timed steps; peak RSS GiB (process) and its
range; last step = peak RSS when the last step ended (ours: before its final checkpoint);
wall s / cpu s = the whole subprocess; loss@1 = first-step loss (log 2 = 0.6931 when the
reference matches the policy).

Targets (the issue), against ``trl``: ours >= 1.5x its pairs/s and <= 0.6x its peak RSS. Writes
``results.json`` (settings, versions, every run) under ``--out`` [/tmp/rso-trainer-vs-trl].
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 1024 ** 3
VARIANTS = ("ours", "ours-no-gc", "trl", "trl-no-gc")
DEFAULT_VARIANTS = "ours,trl"
SPEED_TARGET, MEMORY_TARGET = 1.5, 0.6
_HH_ASSISTANT = "\n\nAssistant:"


# ------------------------------------------------------------------------------ pairs
def final_assistant_turn(dialogue: str) -> str:
    """The text after the last ``"\\n\\nAssistant:"`` of an HH-RLHF dialogue, one leading space
    dropped (the separator ``parse_hh_dialogue`` splits turns on)."""
    cut = dialogue.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise ValueError("no Assistant turn")
    text = dialogue[cut + len(_HH_ASSISTANT):]
    return text[1:] if text.startswith(" ") else text


def hh_pairs(policy: str, num_pairs: int, max_tokens: int) -> list[dict[str, Any]]:
    """SPEC 5 records (reference log-probs still NaN) for the first ``num_pairs`` HH-RLHF pairs
    whose prompt + longer response (with EOS) has at most ``max_tokens`` tokens."""
    from transformers import AutoTokenizer

    from beam_pipelines.prompts import PromptError as InputError
    from beam_pipelines.prompts import parse_hh_dialogue, prompt_id_for
    from beam_pipelines.render import PromptError, render_prompt
    from rso_cli.demo import bundled_data

    tok = AutoTokenizer.from_pretrained(policy)
    eos = tok.eos_token_id
    records: list[dict[str, Any]] = []
    with gzip.open(bundled_data(), "rt", encoding="utf-8") as f:
        for row in map(json.loads, f):
            try:
                messages = parse_hh_dialogue(row["chosen"])
                if parse_hh_dialogue(row["rejected"]) != messages:
                    continue
                prompt = render_prompt(tok, prompt_id_for(messages=messages), None, messages,
                                       max_tokens - 1)
                chosen, rejected = (final_assistant_turn(row[k]) for k in ("chosen", "rejected"))
            except (InputError, PromptError, ValueError):
                continue
            chosen_ids, rejected_ids = (tok(text, add_special_tokens=False)["input_ids"] + [eos]
                                        for text in (chosen, rejected))
            if len(prompt.prompt_token_ids) + max(len(chosen_ids), len(rejected_ids)) > max_tokens:
                continue
            records.append({
                "prompt_id": prompt.prompt_id, "prompt": prompt.prompt,
                "prompt_token_ids": list(prompt.prompt_token_ids),
                "chosen": chosen, "rejected": rejected,
                "chosen_token_ids": chosen_ids, "rejected_token_ids": rejected_ids,
                "ref_chosen_logps": math.nan, "ref_rejected_logps": math.nan,
                "chosen_reward": 1.0, "rejected_reward": 0.0,  # human preference labels
                "chosen_finish_reason": "stop", "rejected_finish_reason": "stop",
                "selection": "human", "pairing": "human", "beta": math.nan,  # not sampled
                "num_candidates": 2, "num_accepted": 2,
                "policy_model": os.path.basename(policy.rstrip("/")),
                "reward_model": "hh-rlhf-human-labels", "run_id": "trainer-vs-trl"})
            if len(records) == num_pairs:
                break
    if len(records) < num_pairs:
        raise SystemExit(f"only {len(records)} HH-RLHF pairs fit {max_tokens} tokens")
    return records


def add_reference_logps(policy: str, records: list[dict[str, Any]], threads: int,
                        batch_pairs: int = 8) -> None:
    """Fills ``ref_*_logps`` with the initial policy's fp32 sequence log-probs (in place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rso.logprobs import sequence_logps

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(policy)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        for i in range(0, len(records), batch_pairs):
            chunk = records[i:i + batch_pairs]
            prompts = [r["prompt_token_ids"] for r in chunk]
            logps = sequence_logps(model, prompts + prompts,
                                   [r["chosen_token_ids"] for r in chunk] +
                                   [r["rejected_token_ids"] for r in chunk], pad).tolist()
            for r, c, rj in zip(chunk, logps[:len(chunk)], logps[len(chunk):]):
                r["ref_chosen_logps"], r["ref_rejected_logps"] = c, rj


def prepare_pairs(out_dir: str, policy: str, num_pairs: int, max_tokens: int,
                  threads: int) -> str:
    """The pipeline-style output directory of the benchmark pairs (built once, then reused
    while the policy file, pair count and length limit are unchanged)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rso.schema import arrow_schema, validate_record

    weights = os.path.join(policy, "model.safetensors")
    meta = {"policy": os.path.abspath(policy), "num_pairs": num_pairs, "max_tokens": max_tokens,
            "weights_size": os.path.getsize(weights), "weights_mtime": os.path.getmtime(weights)}
    meta_path = os.path.join(out_dir, "benchmark_pairs.json")
    if os.path.exists(os.path.join(out_dir, "_SUCCESS")) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return out_dir
    os.makedirs(out_dir, exist_ok=True)
    for stale in ("_SUCCESS", meta_path):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    start = time.perf_counter()
    records = hh_pairs(policy, num_pairs, max_tokens)
    add_reference_logps(policy, records, threads)
    for i, r in enumerate(records):
        validate_record(r, f"pair {i}")
    pq.write_table(pa.Table.from_pylist(records, schema=arrow_schema()),
                   os.path.join(out_dir, "pairs-00000-of-00001.parquet"))
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with open(os.path.join(out_dir, "_SUCCESS"), "w"):
        pass
    print(f"prepared {len(records)} pairs with fp32 reference log-probs in "
          f"{time.perf_counter() - start:.0f} s: {out_dir}", flush=True)
    return out_dir


# ------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class Settings:
    data: str
    policy: str
    work: str
    steps: int
    batch_size: int
    lr: float
    gamma: float
    threads: int
    seed: int = 0
    ours_args: tuple[str, ...] = ()  # extra ``rso train`` flags for the ours* variants


def command(variant: str, s: Settings, output: str) -> list[str]:
    """The subprocess command line of one run of ``variant``."""
    if variant.startswith("ours"):
        gc = ["--no-gradient-checkpointing"] if variant == "ours-no-gc" else []
        return [sys.executable, "-m", "trainer.train", *gc, "--data", s.data, "--policy", s.policy,
                "--output", output, "--overwrite", "--loss", "sigmoid-norm",
                "--gamma", str(s.gamma), "--lr", str(s.lr), "--batch-size", str(s.batch_size),
                "--grad-accum", "1", "--max-steps", str(s.steps), "--optimizer", "adamw",
                "--num-threads", str(s.threads), "--precision", "fp32", "--device", "cpu",
                "--seed", str(s.seed), "--no-tensorboard", "--no-plots", "--no-progress",
                *s.ours_args]
    worker = os.path.join(REPO, "benchmarks", "trl_dpo_worker.py")
    return [sys.executable, worker, "--data", s.data, "--policy", s.policy, "--output", output,
            "--steps", str(s.steps), "--batch-size", str(s.batch_size), "--lr", str(s.lr),
            "--beta", str(s.gamma), "--threads", str(s.threads), "--seed", str(s.seed),
            "--gradient-checkpointing" if variant == "trl" else "--no-gradient-checkpointing"]


def run_child(cmd: list[str], threads: int, log_path: str) -> tuple[str, Any, float]:
    """Runs ``cmd`` in REPO; returns (stdout, resource usage of that child, wall seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log,
                                text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}); log {log_path}:\n"
                         f"{tail}")
    return stdout, usage, wall


def ours_result(output: str) -> dict[str, Any]:
    """The figures of an ``rso train`` run, from its metrics.jsonl."""
    from trainer.metrics import METRICS_FILE, read_metrics

    lines = read_metrics(os.path.join(output, METRICS_FILE))
    train = [r for r in lines if r.get("split") == "train"]
    summary = next(r for r in lines if r.get("split") == "summary")
    return {"steps": summary["steps"], "pairs": summary["pairs"],
            "train_time_s": summary["train_time_s"], "pairs_per_s": summary["pairs_per_s"],
            "step_times_s": [r["step_time_s"] for r in train],
            "peak_rss_at_last_step_gib": train[-1]["peak_rss_gib"],
            "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"]}


def run_once(variant: str, s: Settings, index: int) -> dict[str, Any]:
    output = os.path.join(s.work, f"{variant}-{index}")
    os.makedirs(output, exist_ok=True)
    load_before = os.getloadavg()[0]
    stdout, usage, wall = run_child(command(variant, s, output), s.threads,
                                    os.path.join(s.work, f"{variant}-{index}.log"))
    if variant.startswith("ours"):
        result = ours_result(output)
        for name in os.listdir(output):  # the final checkpoint (1.5 GB) is not needed here
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(output, name))
    else:
        result = json.loads(stdout.strip().splitlines()[-1])
    times = result["step_times_s"]
    steady = (s.batch_size * (len(times) - 1) / sum(times[1:])) if len(times) > 1 else math.nan
    return {**result, "variant": variant, "run": index,
            "peak_rss_gib": usage.ru_maxrss * 1024 / GIB,  # the child's own peak, from wait4
            "steady_pairs_per_s": steady, "process_wall_s": wall,
            "process_cpu_s": usage.ru_utime + usage.ru_stime,
            "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median (and range) per variant of pairs/s, peak RSS and wall time."""
    out: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        med = {k: statistics.median(r[k] for r in rs) for k in
               ("pairs_per_s", "steady_pairs_per_s", "train_time_s", "peak_rss_gib",
                "peak_rss_at_last_step_gib", "process_wall_s", "process_cpu_s")}
        out[variant] = {**med, "runs": len(rs),
                        "pairs_per_s_range": [min(r["pairs_per_s"] for r in rs),
                                              max(r["pairs_per_s"] for r in rs)],
                        "peak_rss_gib_range": [min(r["peak_rss_gib"] for r in rs),
                                               max(r["peak_rss_gib"] for r in rs)],
                        "first_loss": rs[0]["first_loss"]}
    return out


def ratios(summary: dict[str, dict[str, Any]], mine: str, peer: str
           ) -> dict[str, Any] | None:
    """``mine`` / ``peer`` medians of pairs/s and of peak RSS, checked against the targets."""
    if mine not in summary or peer not in summary:
        return None
    a, b = summary[mine], summary[peer]
    speed = a["pairs_per_s"] / b["pairs_per_s"]
    memory = a["peak_rss_gib"] / b["peak_rss_gib"]
    return {"mine": mine, "peer": peer, "pairs_per_s_ratio": speed,
            "steady_pairs_per_s_ratio": a["steady_pairs_per_s"] / b["steady_pairs_per_s"],
            "peak_rss_ratio": memory, "speed_pass": speed >= SPEED_TARGET,
            "memory_pass": memory <= MEMORY_TARGET}


def report(summary: dict[str, dict[str, Any]], comparisons: list[dict[str, Any]]) -> str:
    """The table of medians (ranges over runs) and the ratio lines with PASS/FAIL."""
    rows = [f"{'variant':<10} {'runs':>4} {'pairs/s':>7} {'(min-max)':>11} {'steady':>7} "
            f"{'train s':>7} {'peak RSS GiB':>12} {'(min-max)':>11} {'last step':>9} "
            f"{'wall s':>6} {'cpu s':>6} {'loss@1':>7}"]
    for variant, m in summary.items():
        lo, hi = m["pairs_per_s_range"]
        rlo, rhi = m["peak_rss_gib_range"]
        rows.append(f"{variant:<10} {m['runs']:>4} {m['pairs_per_s']:>7.3f} "
                    f"{f'{lo:.3f}-{hi:.3f}':>11} {m['steady_pairs_per_s']:>7.3f} "
                    f"{m['train_time_s']:>7.1f} {m['peak_rss_gib']:>12.2f} "
                    f"{f'{rlo:.2f}-{rhi:.2f}':>11} {m['peak_rss_at_last_step_gib']:>9.2f} "
                    f"{m['process_wall_s']:>6.0f} {m['process_cpu_s']:>6.0f} "
                    f"{m['first_loss']:>7.4f}")
    flag = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    for c in comparisons:
        rows.append(f"{c['mine']} vs {c['peer']}: pairs/s x{c['pairs_per_s_ratio']:.2f} "
                    f"(steady x{c['steady_pairs_per_s_ratio']:.2f}; target >= {SPEED_TARGET}: "
                    f"{flag(c['speed_pass'])}), peak RSS x{c['peak_rss_ratio']:.2f} "
                    f"(target <= {MEMORY_TARGET}: {flag(c['memory_pass'])})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/rso-pipeline"),
                   help="where rso_cli.demo.prepare_policy keeps SmolLM2-135M-Instruct")
    p.add_argument("--policy", default=None, help="another HF causal LM dir instead of SmolLM2")
    p.add_argument("--out", default="/tmp/rso-trainer-vs-trl",
                   help="pairs, run directories, logs and results.json")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (ours-no-gc: our "
                        f"trainer with --no-gradient-checkpointing; trl-no-gc: TRL without it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8,
                   help="optimizer steps per run (8 keeps the default benchmark near 15 min "
                        "on 2 quiet cores)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-pairs", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--gamma", type=float, default=0.1, help="our gamma = TRL's beta")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours-args", default="",
                   help="extra rso train flags for ours/ours-no-gc, e.g. '--optimizer adafactor' "
                        "(then the comparison is no longer AdamW against AdamW)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants or args.repeats < 1 or args.steps < 1:
        p.error(f"bad --variants/--repeats/--steps ({', '.join(unknown) or 'empty'})")
    if any(v.startswith("trl") for v in variants):
        if importlib.util.find_spec("trl") is None:
            p.error("TRL is not installed: pip install trl==1.16.0 (setup.py's bench extra)")

    from rso_cli.demo import prepare_policy

    policy = args.policy or prepare_policy(args.cache_dir)
    os.makedirs(args.out, exist_ok=True)
    data = prepare_pairs(os.path.join(args.out, "pairs"), policy, args.num_pairs,
                         args.max_tokens, args.threads)
    settings = Settings(data=data, policy=policy, work=os.path.join(args.out, "runs"),
                        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        gamma=args.gamma, threads=args.threads,
                        ours_args=tuple(shlex.split(args.ours_args)))
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "trl"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "-"
    path = os.path.join(args.out, "results.json")
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()

    def save() -> tuple[dict, list]:
        """Writes results.json (after every run, so an interrupted benchmark keeps its data)."""
        summary = summarise(runs)
        comparisons = [c for c in (ratios(summary, "ours", "trl"),
                                   ratios(summary, "ours", "trl-no-gc"),
                                   ratios(summary, "ours-no-gc", "trl-no-gc")) if c]
        results = {"settings": {**dataclasses.asdict(settings), "repeats": args.repeats,
                                "num_pairs": args.num_pairs, "max_tokens": args.max_tokens,
                                "precision": "fp32", "cpu_count": os.cpu_count()},
                   "versions": versions, "complete": len(runs) == args.repeats * len(variants),
                   "benchmark_wall_s": time.perf_counter() - started,
                   "summary": summary, "comparisons": comparisons, "runs": runs}
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
        return summary, comparisons

    for index in range(args.repeats):
        # alternate variants, starting each repeat with the next one, so load changes hit all
        for variant in variants[index % len(variants):] + variants[:index % len(variants)]:
            r = run_once(variant, settings, index)
            runs.append(r)
            print(f"run {index + 1}/{args.repeats} {variant:<9} {r['pairs_per_s']:.3f} pairs/s "
                  f"(steady {r['steady_pairs_per_s']:.3f}), peak RSS {r['peak_rss_gib']:.2f} GiB,"
                  f" step-1 loss {r['first_loss']:.4f}, wall {r['process_wall_s']:.0f} s, "
                  f"1-min load {r['loadavg_1min_before']:.1f} -> {r['loadavg_1min_after']:.1f}",
                  flush=True)
            summary, comparisons = save()
    print(f"\n{os.path.basename(policy.rstrip('/'))} fp32, {args.num_pairs} HH-RLHF pairs <= "
          f"{args.max_tokens} tokens, "
          f"batch {args.batch_size}, {args.steps} steps, {args.threads} threads, median of "
          f"{args.repeats} (torch {versions['torch']}, transformers {versions['transformers']}, "
          f"trl {versions['trl']})" + (f"; ours with {args.ours_args}" if args.ours_args else ""))
    print(report(summary, comparisons))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
