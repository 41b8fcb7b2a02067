"""Generated tokens per second: vLLM vs transformers ``generate``, through the pipeline's handlers.

Same prompts for every engine (the first HH-RLHF harmless-base test prompts that fit the
context), N samples per prompt, ``--max-new-tokens`` per sample, pi_sft sampling (temperature 1).
Each engine runs one untimed warm-up call, then ``--runs`` timed calls of the whole prompt set;
the median is printed with the ratios to transformers fp32. tokens/s counts the tokens actually
generated (samples may stop at EOS), so engines that stop earlier are not favoured.

    .venv/bin/python benchmarks/engine_throughput.py                 # tiny model built here
    .venv/bin/python benchmarks/engine_throughput.py --model DIR     # any HF causal LM dir

The realistic model is SmolLM2-135M-Instruct as converted by ``rso demo`` (a safetensors
directory under ``~/.cache/rso-pipeline/smollm2-135m-instruct``). Each engine runs in its own
process (vLLM on CPU binds the process's OpenMP threads and keeps some state after it is
dropped). transformers generates one prompt's N samples per ``generate`` call, as the pipeline's
handler does (per-prompt seeding).
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from beam_pipelines.config import GenerateConfig  # noqa: E402
from beam_pipelines.elements import RenderedPrompt  # noqa: E402
from beam_pipelines.prompts import parse_json_line  # noqa: E402
from beam_pipelines.render import PromptError, context_length, max_prompt_tokens, render_prompt  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                    "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def load_prompts(path: str, model: str, count: int) -> list[RenderedPrompt]:
    """The first ``count`` HH-RLHF prompts that parse and fit the model's context."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    limit = max_prompt_tokens(context_length(model))
    out: list[RenderedPrompt] = []
    with gzip.open(path, "rb") as f:
        for i, line in enumerate(f):
            try:
                p = parse_json_line(line, f"{path}:{i + 1}", "hh-rlhf")
                out.append(render_prompt(tok, p.prompt_id, p.prompt, p.messages, limit))
            except PromptError:
                continue
            if len(out) == count:
                break
    return out


def measure(config: GenerateConfig, prompts: list[RenderedPrompt], runs: int) -> dict:
    """Loads the handler's model, warms up, times ``runs`` calls; returns the figures."""
    from beam_pipelines.elements import Failure
    from beam_pipelines.generate import make_generation_handler

    handler = make_generation_handler(config)
    start = time.perf_counter()
    model = handler.load_model()
    load_s = time.perf_counter() - start
    handler.run_inference(prompts, model)  # warm-up
    rates, tokens = [], []
    for _ in range(runs):
        start = time.perf_counter()
        results = [r.inference for r in handler.run_inference(prompts, model)]
        elapsed = time.perf_counter() - start
        failures = [r for r in results if isinstance(r, Failure)]
        if failures:
            raise SystemExit(f"{config.engine} failed: {failures[0].detail}")
        n = sum(c.num_tokens for pc in results for c in pc.candidates)
        rates.append(n / elapsed)
        tokens.append(n)
    return {"load_s": load_s, "tok_s": statistics.median(rates), "tokens": tokens,
            "rates": rates}


CASES = {"transformers-fp32": ("transformers", "float32"), "vllm-fp32": ("vllm", "float32"),
         "vllm-bf16": ("vllm", "bfloat16")}


def run_case(args: argparse.Namespace) -> None:
    """One engine in this process; prints one ``RESULT {json}`` line."""
    import torch

    torch.set_num_threads(args.threads)
    cores = sorted(os.sched_getaffinity(0))[:args.threads]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
    prompts = load_prompts(args.data, args.model, args.prompts)
    engine, dtype = CASES[args.only]
    config = GenerateConfig(policy=args.model, engine=engine, dtype=dtype, num_candidates=args.n,
                            max_new_tokens=args.max_new_tokens, batch_size=len(prompts),
                            enforce_eager=args.enforce_eager, seed=0)
    lengths = [len(p.prompt_token_ids) for p in prompts]
    print("RESULT " + json.dumps({**measure(config, prompts, args.runs),
                                  "prompts": len(prompts), "lengths": [min(lengths),
                                                                       max(lengths)]}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF causal LM directory (default: a tiny model built here)")
    ap.add_argument("--data", default=DATA, help="HH-RLHF jsonl.gz")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=16, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads for every engine (torch threads; vLLM's OpenMP threads are "
                         "bound to the first THREADS cores)")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without graph compile")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--only", choices=list(CASES), help=argparse.SUPPRESS)  # internal
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.only:
        run_case(args)
        return 0

    if args.model is None:
        from tests.tiny_models import build_policy

        args.model = build_policy(tempfile.mkdtemp(prefix="tiny_policy_"))
    # One process per engine: vLLM binds the process's OpenMP threads and does not free
    # everything when dropped, which would skew whatever runs after it in the same process.
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    figures = {}
    for name in args.cases.split(","):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded,
                               "--model", args.model, "--only", name],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        figures[name] = json.loads(lines[-1][len("RESULT "):])
    first = next(iter(figures.values()))
    print(f"model {args.model}: {first['prompts']} HH-RLHF prompts of {first['lengths'][0]}-"
          f"{first['lengths'][1]} tokens, n={args.n}, up to {args.max_new_tokens} new tokens, "
          f"median of {args.runs} runs after a warm-up, one process per engine, "
          f"{args.threads} thread(s)")
    ref_name = "transformers-fp32" if "transformers-fp32" in figures else name
    ref = figures[ref_name]["tok_s"]
    print(f"{'engine':<18} {'load s':>7} {'tok/s':>9} {'x ' + ref_name:>20}  runs (tok/s)")
    for name, f in figures.items():
        runs = ", ".join(f"{r:.0f}" for r in f["rates"])
        print(f"{name:<18} {f['load_s']:>7.1f} {f['tok_s']:>9.0f} {f['tok_s'] / ref:>20.2f}  "
              f"{runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
