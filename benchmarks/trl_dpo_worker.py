"""One TRL ``DPOTrainer`` run for ``benchmarks/trainer_vs_trl.py`` (a child process of it).

Reads the same ``pairs-*.parquet`` files as ``rso train``, through their TRL-format string columns
(``prompt`` = the rendered chat prompt, ``chosen`` / ``rejected`` = the final assistant turns;
TRL appends the EOS text). Before training it checks that TRL's own tokenisation gave exactly the
token ids stored in the files (``prompt_token_ids``, ``chosen_token_ids``, ``rejected_token_ids``),
so both trainers see identical tokens; it stops with an error otherwise.

TRL keeps its defaults except what the comparison fixes: fp32 (TRL's ``bf16`` default is on,
CPU included), batch size, no gradient accumulation, steps, lr, beta, loss ``sigmoid``, no
checkpoint saving, logging every step (logging runs after ``on_step_end``, outside the timing).
The reference model is TRL's own (a second copy of the policy, run every step).
``--no-gradient-checkpointing`` turns off TRL's gradient checkpointing default.

Timing: a callback sums ``on_step_begin`` -> ``on_step_end`` (forward, backward, clipping,
optimizer and scheduler step); model loading, tokenisation and logging are outside it. The result
is one JSON line on stdout.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
GIB = 1024 ** 3


def rss_gib() -> float:
    """Current resident set size of this process (GiB), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (GiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="directory with pairs-*.parquet")
    p.add_argument("--policy", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=True, help="TRL's default is on")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    files = sorted(glob.glob(os.path.join(args.data, "pairs-*.parquet")))
    if not files:
        raise SystemExit(f"{args.data}: no pairs-*.parquet")
    table = datasets.Dataset.from_parquet(files)
    expected = {(tuple(r["prompt_token_ids"]), tuple(r["chosen_token_ids"]),
                 tuple(r["rejected_token_ids"])) for r in table}
    dataset = table.select_columns(["prompt", "chosen", "rejected"])

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.peak_at_last_step = float("nan")
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t0)
            self.peak_at_last_step = peak_rss_gib()

    config = DPOConfig(
        output_dir=args.output, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
        beta=args.beta, loss_type=["sigmoid"], bf16=False, use_cpu=True,
        gradient_checkpointing=args.gradient_checkpointing, model_init_kwargs={"dtype": "float32"},
        save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
        seed=args.seed)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    timer = StepTimer()
    trainer = DPOTrainer(model=args.policy, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer])
    setup_s = time.perf_counter() - start
    got = {(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]))
           for r in trainer.train_dataset}
    if got != expected:
        raise SystemExit(f"TRL tokenised {len(got - expected)} of {len(got)} pairs differently "
                         f"from the stored token ids; the comparison would not be like for like")
    if trainer.ref_model is None:
        raise SystemExit("expected TRL to hold its own reference model")
    rss_after_load = rss_gib()

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    pairs = args.batch_size * len(timer.times)
    train_s = sum(timer.times)
    print(json.dumps({
        "steps": len(timer.times), "pairs": pairs, "train_time_s": train_s,
        "pairs_per_s": pairs / train_s, "step_times_s": timer.times, "setup_s": setup_s,
        "rss_after_load_gib": rss_after_load, "peak_rss_at_last_step_gib": timer.peak_at_last_step,
        "peak_rss_gib": peak_rss_gib(), "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "identical_tokens": True,
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
