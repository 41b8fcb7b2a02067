"""What the stages around decoding cost, from one real run: fp32 re-scoring against decoding,
and the reward stage against a bare transformers forward loop over the same candidates.

1. One ``rso generate`` run (SmolLM2-135M-Instruct, ``--num-candidates`` N [64],
   ``--num-samples`` k [8], ``--rescore on``, ``--write-candidates``, the demo's MiniLM reward
   model when cached, else a tiny one). Its manifest's ``cost`` section gives each stage's busy
   seconds: re-scoring (the k kept responses per prompt, in fp32) as a share of decoding.
2. The reward stage against what a user would write by hand: the same reward model loaded with
   ``AutoModelForSequenceClassification`` (fp32, eval), the same token ids the stage scored
   (``rso.reward_input.pointwise_ids``, read back from the stored candidates), the same
   per-prompt length-sorted batches of ``--reward-batch-size``, ``torch.inference_mode``; timed
   on its own. The ratio is bare seconds / the stage's busy seconds in the manifest (both
   exclude model loading), median of ``--repeats`` bare loops.

    .venv/bin/python benchmarks/stage_costs.py                       # 4 prompts, N 64, k 8
    .venv/bin/python benchmarks/stage_costs.py --num-prompts 8 --max-new-tokens 64

Targets (issue 10): re-scoring <= 15% of decoding at N = 64, k = 8; reward stage >= 0.9x the
bare loop's speed.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bare_reward_loop(reward_model: str, store: str, batch_size: int, threads: int) -> float:
    """Seconds a hand-written forward loop takes over the stored candidates' reward inputs."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rso.reward_input import pointwise_ids, render_pointwise

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    limit = min(model.config.max_position_embeddings, tok.model_max_length)
    special = set(tok.all_special_ids)
    rows = [r for f in sorted(glob.glob(os.path.join(store, "candidates-*.parquet")))
            for r in pq.read_table(f).to_pylist()]
    by_prompt: dict[str, list[list[int]]] = {}
    for r in rows:
        messages = [tuple(m) for m in json.loads(r["prompt_messages"])]
        prefix = render_pointwise(tok, messages, None)
        ids, _, _ = pointwise_ids(tok, messages, r["response"], limit, special, prefix)
        by_prompt.setdefault(r["prompt_id"], []).append(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        for seqs in by_prompt.values():
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                    mask[row, :len(seqs[i])] = 1
                model(input_ids=ids, attention_mask=mask).logits.float()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="HF causal LM dir (default: the demo's SmolLM2-135M)")
    ap.add_argument("--reward-model", help="default: the demo's MiniLM reward model if cached")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/rso-pipeline"))
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--num-candidates", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--reward-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3, help="bare reward loops (median)")
    args = ap.parse_args(argv)

    from beam_pipelines.pipeline import main as generate
    from rso import console
    from rso_cli.demo import PROXY_DIR, bundled_data, prepare_policy

    console.configure(verbose=False)
    work = tempfile.mkdtemp(prefix="rso-stage-costs-")
    policy = args.policy or prepare_policy(args.cache_dir)
    reward = args.reward_model or os.path.join(args.cache_dir, PROXY_DIR)
    if not os.path.exists(os.path.join(reward, "config.json")):
        from tests.tiny_models import build_reward_model

        reward = build_reward_model(os.path.join(work, "tiny_rm"))
    prompts = os.path.join(work, "prompts.jsonl")
    with gzip.open(bundled_data(), "rb") as f, open(prompts, "wb") as out:
        for _, line in zip(range(args.num_prompts), f):
            out.write(line)
    output = os.path.join(work, "out")
    code = generate(["--input", prompts, "--output", output, "--policy", policy,
                     "--reward-model", reward, "--engine", args.engine, "--dtype", args.dtype,
                     "--num-candidates", str(args.num_candidates),
                     "--num-samples", str(args.num_samples),
                     "--max-new-tokens", str(args.max_new_tokens), "--rescore", "on",
                     "--reward-batch-size", str(args.reward_batch_size),
                     "--torch-threads", str(args.threads), "--write-candidates"])
    if code:
        raise SystemExit(f"rso generate failed (exit {code})")
    with open(os.path.join(output, "manifest.json")) as f:
        manifest = json.load(f)
    stages = manifest["cost"]["stages"]
    bare = statistics.median(bare_reward_loop(reward, output, args.reward_batch_size,
                                              args.threads) for _ in range(args.repeats))

    gen, rescore, reward_stage = stages["generate"], stages["rescore"], stages["reward"]
    print(f"{os.path.basename(policy.rstrip('/'))} ({manifest['config']['dtype']}, "
          f"{args.engine}), {args.num_prompts} HH-RLHF prompts, N={args.num_candidates}, "
          f"k={args.num_samples}, <= {args.max_new_tokens} new tokens; reward model "
          f"{os.path.basename(reward.rstrip('/'))}; {args.threads} thread(s), "
          f"{len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}")
    for name, s in stages.items():
        print(f"  {name:<9} {s['wall_seconds']:8.2f} s busy  {s['cpu_seconds']:8.2f} s CPU  "
              f"{s['calls']:5d} calls  {s['sequences']:6d} sequences")
    share = rescore["wall_seconds"] / gen["wall_seconds"]
    print(f"fp32 re-scoring / decoding = {share:.3f} (target <= 0.15: "
          f"{'PASS' if share <= 0.15 else 'FAIL'})")
    ratio = bare / reward_stage["wall_seconds"]
    print(f"reward stage {reward_stage['wall_seconds']:.2f} s, bare forward loop {bare:.2f} s "
          f"(median of {args.repeats}): stage speed = {ratio:.2f}x the bare loop's "
          f"(target >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
