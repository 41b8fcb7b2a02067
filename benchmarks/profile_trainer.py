"""Where `rso train`'s step time goes: a torch.profiler breakdown of a few optimizer steps.

Same model, pairs and settings as ``benchmarks/trainer_vs_trl.py`` (SmolLM2-135M-Instruct fp32,
the first 64 HH-RLHF harmless pairs <= 256 tokens, batch 4, gamma 0.1, AdamW lr 1e-6), run in
this process through the trainer's own ``setup`` and ``train_step``. Step 1 is untimed (one-time
costs); the next ``--steps`` are profiled. Ops are grouped into:

- ``matmul``: linear layers and the LM head (aten::mm, addmm, bmm, matmul, linear) and their
  backward;
- ``attention``: scaled-dot-product attention and its backward;
- ``optimizer``: AdamW's update (the fused kernel or the foreach ops under ``Optimizer.step``),
  gradient clipping;
- ``elementwise/other``: norms, activations, softmax over the vocabulary, copies...

Self CPU time is summed per group over all threads' ops (what the ops cost, not wall time);
padding is reported as the share of positions in each batch that are padding. What gradient
checkpointing's recomputation costs is the difference between a run with and one without
``--no-gradient-checkpointing``.

    .venv/bin/python benchmarks/profile_trainer.py                  # gradient checkpointing on
    .venv/bin/python benchmarks/profile_trainer.py --no-gradient-checkpointing
    .venv/bin/python benchmarks/profile_trainer.py --precision bf16 # bf16 autocast
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GROUPS = (
    ("attention", ("scaled_dot_product", "attention", "_efficient_attention", "_flash")),
    ("optimizer", ("adam", "foreach", "clip_grad", "_fused", "lerp", "addcdiv")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                "MmBackward", "AddmmBackward", "BmmBackward")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in lowered for k in keys):
            return group
    return "elementwise/other"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/rso-pipeline"))
    ap.add_argument("--policy", default=None)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps after step 1")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                    default=True)
    ap.add_argument("--top", type=int, default=12, help="ops listed by self CPU time")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.trainer_vs_trl import prepare_pairs
    from rso_cli.demo import prepare_policy
    from trainer.config import TrainConfig
    from trainer.train import _step_groups, setup, train_step

    policy = args.policy or prepare_policy(args.cache_dir)
    data = prepare_pairs("/tmp/rso-trainer-vs-trl/pairs", policy, 64, 256, args.threads)
    cfg = TrainConfig(data=[data], policy=policy, output=tempfile.mkdtemp(prefix="rso-prof-"),
                      batch_size=args.batch_size, num_threads=args.threads, gamma=0.1,
                      precision=args.precision, max_steps=args.steps + 1, progress=False,
                      plots=False, gradient_checkpointing=args.gradient_checkpointing)
    run = setup(cfg)
    groups = _step_groups(run.train_source, cfg, 0, 0)

    def step(i: int) -> tuple[float, int, int]:
        _, _, group = next(groups)
        real = sum(2 * len(p.prompt_token_ids) + len(p.chosen_token_ids)
                   + len(p.rejected_token_ids) for b in group for p in b)
        padded = sum(2 * len(b) * max(p.length for p in b) for b in group)
        start = time.perf_counter()
        with record_function(f"step{i}"):
            train_step(run, group, i)
        return time.perf_counter() - start, real, padded

    step(1)  # untimed: first-call costs
    by_group: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    seconds = real = padded = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(2, args.steps + 2):
            s, r, p = step(i)
            seconds, real, padded = seconds + s, real + r, padded + p
    for e in prof.key_averages():
        if e.key.startswith("step"):
            continue
        by_op[e.key] += e.self_cpu_time_total / 1e6
        by_group[group_of(e.key)] += e.self_cpu_time_total / 1e6
    total = sum(by_group.values())

    print(f"{os.path.basename(policy.rstrip('/'))} {args.precision}, batch {args.batch_size}, "
          f"{args.threads} threads, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.steps} profiled steps: "
          f"{seconds:.1f} s wall ({args.steps * args.batch_size / seconds:.3f} pairs/s), "
          f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"padding: {1 - real / padded:.1%} of the positions in the batches (chosen and "
          f"rejected sequences, each padded to its batch's longest)")
    print(f"{'group':<20} {'self CPU s':>10} {'share':>7}")
    for g, s in by_group.most_common():
        print(f"{g:<20} {s:>10.2f} {s / total:>7.1%}")
    print(f"top {args.top} ops by self CPU time:")
    for op, s in by_op.most_common(args.top):
        print(f"  {op:<48} {s:>8.2f} s {s / total:>6.1%}  [{group_of(op)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
