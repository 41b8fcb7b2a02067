"""The pipeline's generated tokens/s divided by the bare engine's, on the same prompts and engine.

Target (issue 10): >= 0.95 on the DirectRunner, with the stage breakdown of the manifest's
``cost`` section printed. Both sides run in this process on one warm vLLM
engine (started once, outside the timings) with the same per-prompt seeds, so they generate the
very same tokens; the script checks that. The bare side is one ``llm.generate`` call over every
prompt. The pipeline side is the whole ``rso generate`` run (read, render, generate, reward,
select, pair, write Parquet/TFRecord/manifest), timed from start to ``_SUCCESS``: its overhead
is everything that is not decoding. Median of ``--repeats`` runs each, alternated.

    .venv/bin/python benchmarks/pipeline_vs_engine.py     # SmolLM2-135M-Instruct, 256 x n=16
    .venv/bin/python benchmarks/pipeline_vs_engine.py --num-prompts 16 --num-candidates 8
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="HF causal LM dir (default: the demo's SmolLM2-135M)")
    ap.add_argument("--reward-model", help="reward model dir (default: a tiny one built here)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/rso-pipeline"))
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--num-candidates", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto",
                    help="auto: bf16 where it is native, else float32 (as rso generate)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from beam_pipelines import generate_vllm as G
    from beam_pipelines.config import GenerateConfig, RewardModelSpec
    from beam_pipelines.pipeline import main as run_pipeline
    from beam_pipelines.prompts import parse_json_line
    from beam_pipelines.render import context_length, max_prompt_tokens, render_prompt
    from rso_cli import demo

    work = tempfile.mkdtemp(prefix="rso-bench-")
    policy = args.policy or demo.prepare_policy(args.cache_dir)
    reward = args.reward_model
    if reward is None:
        from tests.tiny_models import build_reward_model

        reward = build_reward_model(os.path.join(work, "tiny_rm"))
    # The first num_prompts HH-RLHF dialogues, as the pipeline input.
    prompts_file = os.path.join(work, "prompts.jsonl")
    with gzip.open(demo.bundled_data(), "rb") as f, open(prompts_file, "wb") as out:
        for _, line in zip(range(args.num_prompts), f):
            out.write(line)
    config = GenerateConfig(
        input=prompts_file, output="", policy=policy,
        reward_model=[RewardModelSpec(path=reward)], num_candidates=args.num_candidates,
        num_samples=2, max_new_tokens=args.max_new_tokens, dtype=args.dtype, rescore="off",
        batch_size=args.num_prompts)
    flags = ["--input", prompts_file, "--policy", policy, "--reward-model", reward,
             "--num-candidates", str(args.num_candidates), "--num-samples", "2",
             "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype,
             "--rescore", "off", "--batch-size", str(args.num_prompts)]

    from transformers import AutoTokenizer
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(policy)
    limit = max_prompt_tokens(context_length(policy))
    rendered = []
    with open(prompts_file, "rb") as f:
        for i, line in enumerate(f):
            p = parse_json_line(line, f"{prompts_file}:{i}")
            rendered.append(render_prompt(tok, p.prompt_id, p.prompt, p.messages, limit))

    llm = G.get_vllm_engine(config)  # started once, outside every timing

    def bare() -> tuple[float, int]:
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(r.prompt_token_ids))
                             for r in rendered],
                            [G.vllm_sampling_params(config, r.prompt_id) for r in rendered],
                            use_tqdm=False)
        seconds = time.perf_counter() - start
        return seconds, sum(len(c.token_ids) for o in outs for c in o.outputs)

    def pipeline(i: int) -> tuple[float, int]:
        out = os.path.join(work, f"out{i}")
        start = time.perf_counter()
        run_pipeline(flags + ["--output", out])
        seconds = time.perf_counter() - start
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        costs.append(manifest["cost"])
        return seconds, manifest["counters"]["tokens_generated"]

    costs: list[dict] = []
    bare()  # warm-up (first-request compilation paths)
    bare_runs, pipe_runs = [], []
    for i in range(args.repeats):
        bare_runs.append(bare())
        pipe_runs.append(pipeline(i))
    bare_tps = statistics.median(n / s for s, n in bare_runs)
    pipe_tps = statistics.median(n / s for s, n in pipe_runs)
    print(f"policy {os.path.basename(policy)}, {args.dtype}, {args.num_prompts} prompts x "
          f"n={args.num_candidates}, {args.max_new_tokens} new tokens max, "
          f"{args.repeats} runs, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for name, runs in (("bare engine", bare_runs), ("whole pipeline", pipe_runs)):
        print(f"{name:<15}: {statistics.median(n / s for s, n in runs):8.1f} tok/s  (runs: "
              f"{', '.join(f'{n} tok in {s:.1f} s' for s, n in runs)})")
    ratio = pipe_tps / bare_tps
    print(f"pipeline / engine = {ratio:.2f}  (target >= 0.95: "
          f"{'PASS' if ratio >= 0.95 else 'FAIL'})")
    from rso.cost import format_lines

    middle = sorted(range(len(pipe_runs)), key=lambda i: pipe_runs[i][1] / pipe_runs[i][0])
    print("stage breakdown of the median pipeline run (manifest cost section):")
    for line in format_lines(costs[middle[len(middle) // 2]]):
        print("  " + line)


if __name__ == "__main__":
    main()
