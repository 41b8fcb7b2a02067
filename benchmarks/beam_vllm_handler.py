"""Our generate stage vs Beam's own ``VLLMCompletionsModelHandler``, tokens/s, one Beam job each.

What a Beam user would pick instead of this project's generate stage is ``RunInference`` with
``apache_beam.ml.inference.vllm_inference.VLLMCompletionsModelHandler``: it starts vLLM's OpenAI
server in a subprocess (``python -m vllm.entrypoints.openai.api_server``) and sends one
``completions.create`` request per prompt over HTTP (asyncio-gathered per batch). Ours runs the
offline ``vllm.LLM`` in the worker and passes token ids in and out. Both jobs here:

    Create(prompts) -> generate N samples of <= T tokens per prompt -> count generated tokens

on the same model, the same rendered prompts (ours as token ids, theirs as the same text), the
same n, max tokens, temperature 1 and precision, with the per-token log-probs each can return
(``logprobs=0``: the sampled token's log-prob, which is what sft_logp sums), on the FnApiRunner.
Each job is timed end to end (engine start included: that is what a nightly job pays); the
engine start (ours: ``vllm.LLM``; theirs: the server until it answers, Beam polling it every
5 s) is also timed on its own and printed. Median of
``--repeats`` runs per side, alternated; each run is a fresh process (an engine, or a server,
per job, as on a worker).

    .venv/bin/python benchmarks/beam_vllm_handler.py                      # SmolLM2-135M fp32
    .venv/bin/python benchmarks/beam_vllm_handler.py --num-prompts 16 --repeats 1

Target (issue 10): ours >= 1.5x theirs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rendered_prompts(policy: str, count: int) -> list:
    """The first ``count`` bundled HH-RLHF prompts that fit the policy, rendered as the
    pipeline's render stage renders them (``engine_throughput.load_prompts``)."""
    from benchmarks.engine_throughput import load_prompts
    from rso_cli.demo import bundled_data

    return load_prompts(bundled_data(), policy, count)


def run_ours(args: argparse.Namespace) -> dict:
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipelines import generate_vllm as G
    from beam_pipelines.config import GenerateConfig
    from beam_pipelines.generate import GenerateCandidates

    config = GenerateConfig(policy=args.policy, engine="vllm", dtype=args.dtype,
                            num_candidates=args.n, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, seed=0)
    prompts = rendered_prompts(args.policy, args.num_prompts)
    tokens = Metrics.counter("bench", "tokens")

    def count(kv):
        tokens.inc(sum(c.num_tokens for c in kv[1].candidates))

    start = time.perf_counter()
    G.configure_vllm_env(config)
    G.get_vllm_engine(config)  # the engine start, timed on its own (the job reuses it)
    engine_s = time.perf_counter() - start
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        out = p | beam.Create(prompts) | GenerateCandidates(config)
        out.main | beam.Map(count)
    total_s = time.perf_counter() - start
    result = p.result.metrics().query()["counters"]
    n = sum(c.committed for c in result if c.key.metric.name == "tokens")
    return {"tokens": n, "total_s": total_s, "engine_s": engine_s}


def run_theirs(args: argparse.Namespace) -> dict:
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.ml.inference.vllm_inference import VLLMCompletionsModelHandler
    from apache_beam.options.pipeline_options import PipelineOptions

    prompts = [r.prompt for r in rendered_prompts(args.policy, args.num_prompts)]
    tokens = Metrics.counter("bench", "tokens")
    kv_gib = os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    handler = VLLMCompletionsModelHandler(
        args.policy, vllm_server_kwargs={"dtype": args.dtype, "seed": "0",
                                         "max-num-seqs": str(args.batch_size * args.n)},
        min_batch_size=args.batch_size, max_batch_size=args.batch_size)

    def count(result):
        tokens.inc(result.inference.usage.completion_tokens)

    start = time.perf_counter()
    server = handler.load_model()  # starts the server and waits for it: timed on its own
    engine_s = time.perf_counter() - start
    server._stop_processes()  # noqa: SLF001 - the job starts its own, as on a worker
    start = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        (p | beam.Create(prompts)
         | RunInference(handler, inference_args={
             "n": args.n, "max_tokens": args.max_new_tokens, "temperature": 1.0,
             "logprobs": 0, "extra_body": {"add_special_tokens": False}})
         | beam.Map(count))
    total_s = time.perf_counter() - start
    result = p.result.metrics().query()["counters"]
    n = sum(c.committed for c in result if c.key.metric.name == "tokens")
    return {"tokens": n, "total_s": total_s, "engine_s": engine_s, "kv_gib": kv_gib}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="HF causal LM dir (default: the demo's SmolLM2-135M)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/rso-pipeline"))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=16, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per engine call/batch")
    ap.add_argument("--dtype", default="float32",
                    help="float32 (default: this CPU may lack bf16 instructions) or bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=("ours", "theirs"), help=argparse.SUPPRESS)  # internal
    args = ap.parse_args(argv)
    if args.policy is None:
        from rso_cli.demo import prepare_policy

        args.policy = prepare_policy(args.cache_dir)
    if args.only:
        from rso import console

        console.configure(verbose=False)
        try:
            result = (run_ours if args.only == "ours" else run_theirs)(args)
        finally:
            import psutil

            # Beam's handler keeps its vLLM server in a process the job may leave behind
            for child in psutil.Process().children(recursive=True):
                child.kill()
        print("RESULT " + json.dumps(result))
        return 0

    forwarded = list(argv if argv is not None else sys.argv[1:])
    runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
    for _ in range(args.repeats):
        for side in runs:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded,
                                   "--policy", args.policy, "--only", side],
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{side} failed (exit {proc.returncode})")
            runs[side].append(json.loads(lines[-1][len("RESULT "):]))

    print(f"{os.path.basename(args.policy)} {args.dtype}, {args.num_prompts} HH-RLHF prompts x "
          f"n={args.n}, <= {args.max_new_tokens} new tokens, batches of {args.batch_size} "
          f"prompts, median of {args.repeats} runs, {len(os.sched_getaffinity(0))} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'side':<34} {'tok/s':>8} {'job s':>8} {'engine start s':>15}  tokens")
    names = {"ours": "ours (offline vllm.LLM, token ids)",
             "theirs": "Beam VLLMCompletionsModelHandler"}
    rates = {}
    for side, rs in runs.items():
        rates[side] = statistics.median(r["tokens"] / r["total_s"] for r in rs)
        print(f"{names[side]:<34} {rates[side]:>8.1f} "
              f"{statistics.median(r['total_s'] for r in rs):>8.1f} "
              f"{statistics.median(r['engine_s'] for r in rs):>15.1f}  "
              f"{', '.join(str(r['tokens']) for r in rs)}")
    ratio = rates["ours"] / rates["theirs"]
    print(f"ours / theirs = {ratio:.2f} end to end, engine start included "
          f"(target >= 1.5: {'PASS' if ratio >= 1.5 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
