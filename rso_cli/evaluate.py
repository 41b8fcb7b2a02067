"""`rso evaluate`: win rate of a policy against a baseline under a judge reward model.

    rso evaluate --policy DIR --baseline DIR --judge DIR --prompts FILE --output DIR

1. Generation reuses the pipeline: `rso generate` runs once per model (``OUTPUT/generations/
   policy`` and ``.../baseline``) with ``selection="best-of-n"``, ``num_candidates=1`` (one
   sample per prompt: best-of-1 is the sample itself), the judge as the reward model, and the
   same prompts, ``--num-prompts`` shard and ``--seed``. Sampling is seeded per (seed, prompt_id)
   (``beam_pipelines.seeding``), so both models draw with the same seeds, and a model compared
   with itself produces the same responses.
2. The two ``sft-*`` outputs are paired by ``prompt_id``. A prompt missing on either side (a
   dead letter of that run, e.g. a prompt too long for one model's context) is left out of the
   comparison and listed under ``unpaired`` in evaluation.json.
3. Judge. ``--judge-kind pointwise`` (default): the judge reward ``r(x, y)`` the pipeline wrote
   for each response; ``d = r(x, y_policy) - r(x, y_baseline)``. ``pairwise``: the pipeline's
   pairwise handler scores the two responses against each other, both orders (``d = (s(p, b) -
   s(b, p)) / 2``, the logit of "policy better", position bias removed; SPEC 2).
4. Per prompt: win (score 1) if ``d > tie_margin``, loss (0) if ``d < -tie_margin``, tie (0.5)
   otherwise: a tie is equal judge rewards within ``--tie-margin`` (default 0: exactly equal)
   and counts as HALF a win. ``win_rate`` = mean score over the paired prompts;
   ``win_rate_ci95`` = its Wilson score interval at 95% (:func:`rso.stats.wilson_interval`:
   ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``, z = 1.96, n = prompts; Wilson
   1927, Brown, Cai & DasGupta 2001; conservative with ties, whose variance is below p(1-p)).

Writes into ``--output``::

    evaluation.json          settings, model ids, wins/ties/losses, win_rate, win_rate_ci95,
                             judge margins, per-model reward and length summaries, unpaired ids
    comparisons.jsonl        one line per paired prompt: both responses, judge rewards (pointwise
                             judges; null for pairwise), judge margin, score
    evaluation_win_rate.png  wins / ties / losses and the win rate with its interval
    evaluation_rewards.png   judge rewards of both models (densities, and per prompt)
    evaluation_lengths.png   response lengths in tokens of both models
    generations/{policy,baseline}/   the two pipeline outputs (rso inspect reads them); with
                             ``--baseline-generations DIR`` the baseline's are read from DIR
                             (an earlier evaluation's, checked by run id) and not written again

Nothing is published until both sides have generated and the report is computed: each side
runs into a staging directory (:func:`beam_pipelines.pipeline.staged_run`), the old
evaluation.json is removed, the sides are committed, and the new evaluation.json is written
last; a failed or interrupted evaluation leaves the previous one as it was.

Both models generate in ``--dtype`` (default float32, whatever the hardware): DPO moves a
policy's weights by far less than bfloat16's resolution (8 significant bits; a relative step of
about 0.4%), so in bf16 most of a short fine-tune's update rounds away and the rest becomes
rounding noise, and the comparison would not be of the trained policy.

Lengths are in tokens of each model's own tokenizer (and in characters).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rso import console, layout, stats
from rso import storage as rso_io
from rso.config import ArgumentParser, ConfigError, unknown_flags
from rso.console import counted
from rso.model_id import model_id
from rso.plotting import density, no_data, png, pyplot
from rso_cli.inspect_output import check_complete, read_manifest, read_records, verify_records

log = logging.getLogger("rso.evaluate")
EVALUATION = "evaluation.json"
COMPARISONS = "comparisons.jsonl"
PLOT_FILES = ("evaluation_win_rate.png", "evaluation_rewards.png", "evaluation_lengths.png")
SIDES = ("policy", "baseline")
SFT_COLUMNS = ("prompt_id", "prompt", "completion", "completion_token_ids", "reward",
               "finish_reason")


def generation_config(model: str, args: argparse.Namespace, output: str):
    """The `rso generate` config of one side: best-of-1 under the judge."""
    from beam_pipelines.config import GenerateConfig, RewardModelSpec

    return GenerateConfig(
        input=args.prompts, input_format=args.input_format, output=output, policy=model,
        engine=args.engine, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
        max_prompts=args.num_prompts,
        num_candidates=1, num_samples=1, selection="best-of-n", seed=args.seed,
        reward_model=[RewardModelSpec(path=args.judge, kind=args.judge_kind)],
        enforce_eager=args.enforce_eager, batch_size=args.batch_size, overwrite=args.overwrite)


def pair_by_prompt(policy: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]]
                   ) -> tuple[list[tuple[dict, dict]], dict[str, list[str]]]:
    """(policy row, baseline row) per prompt_id present on both sides, sorted by prompt_id, and
    ``{"policy_only": [...], "baseline_only": [...]}``. ValueError if a side repeats an id
    (best-of-1 writes one row per prompt)."""
    by_side = []
    for name, rows in (("policy", policy), ("baseline", baseline)):
        index: dict[str, dict] = {}
        for r in rows:
            if r["prompt_id"] in index:
                raise ValueError(f"{name}: prompt_id {r['prompt_id']!r} has two responses; "
                                 "expected one per prompt (best-of-n with N=1)")
            index[r["prompt_id"]] = dict(r)
        by_side.append(index)
    p, b = by_side
    both = sorted(set(p) & set(b))
    return ([(p[i], b[i]) for i in both],
            {"policy_only": sorted(set(p) - set(b)), "baseline_only": sorted(set(b) - set(p))})


# ---------------------------------------------------------------- pairwise judge
def prompt_messages(input: str, input_format: str, wanted: set[str]) -> dict[str, tuple]:
    """{prompt_id: messages} for the wanted prompts, parsed as the pipeline's read stage does
    (``beam_pipelines.prompts``); a plain prompt is one user turn. Unparseable rows are skipped
    (the pipeline made them dead letters)."""
    from apache_beam.io.filesystems import FileSystems

    from beam_pipelines import prompts as P
    from beam_pipelines.read import check_input, resolve_format

    files = check_input(input)
    parquet = resolve_format(files, input_format, input) == "parquet"
    found: dict[str, tuple] = {}
    for path in files:
        with FileSystems.open(path) as f:
            if parquet:
                import pyarrow.parquet as pq

                rows = [lambda r=r: P.parse_row(r, path, input_format)
                        for r in pq.read_table(f).to_pylist()]
            else:
                rows = [lambda line=line: P.parse_json_line(line, path, input_format)
                        for line in f if not P.is_blank(line)]
            for parse in rows:
                try:
                    p = parse()
                except P.PromptError:
                    continue
                if p.prompt_id in wanted and p.prompt_id not in found:
                    found[p.prompt_id] = p.messages or (("user", p.prompt),)
    return found


def pairwise_margins(pairs: Sequence[tuple[dict, dict]], config, messages: Mapping[str, tuple]
                     ) -> list[float]:
    """``(s(p, b) - s(b, p)) / 2`` per pair with the pipeline's own pairwise reward handler
    (:class:`beam_pipelines.reward.PairwiseRewardHandler`, both orders): the handler rewards
    two candidates against one of them as baseline, so ``r_policy - r_baseline`` is that margin
    whichever it picks. Raises RuntimeError if the judge fails on a prompt."""
    from beam_pipelines.elements import Candidate, Failure, PromptCandidates, RenderedPrompt
    from beam_pipelines.reward_handlers import PairwiseRewardHandler

    handler = PairwiseRewardHandler(config.reward_model[0], config.replace(
        pairwise_debias="both-orders"))
    model = handler.load_model()
    examples = [PromptCandidates(
        prompt=RenderedPrompt(p["prompt_id"], p["prompt"], (), tuple(messages[p["prompt_id"]])),
        candidates=[Candidate(r["completion"], tuple(r["completion_token_ids"]),
                              r["finish_reason"], 0.0) for r in (p, b)])
        for p, b in pairs]
    margins = []
    for start in range(0, len(examples), config.reward_prompts_per_batch):
        batch = examples[start:start + config.reward_prompts_per_batch]
        for ex, result in zip(batch, handler.run_inference(batch, model)):
            if isinstance(result.inference, Failure):
                raise RuntimeError(f"judge failed on prompt {ex.prompt.prompt_id}: "
                                   f"{result.inference.detail}")
            r_policy, r_baseline = result.inference
            same = ex.candidates[0].token_ids == ex.candidates[1].token_ids
            # identical responses are a tie by definition, whatever the judge's float rounding
            margins.append(0.0 if same else float(r_policy - r_baseline))
    return margins


# ---------------------------------------------------------------- report
def side_summary(rows: Sequence[Mapping[str, Any]], judge_kind: str) -> dict[str, Any]:
    """Reward (pointwise judges only) and length summaries of one model's responses."""
    return {
        "reward": (stats.summarize([r["reward"] for r in rows]) if judge_kind == "pointwise"
                   else None),
        "length_tokens": stats.summarize([len(r["completion_token_ids"]) for r in rows]),
        "length_chars": stats.summarize([len(r["completion"]) for r in rows]),
        "finished_by_eos": stats.proportion(sum(r["finish_reason"] == "stop" for r in rows),
                                            len(rows)),
    }


def report(pairs: Sequence[tuple[dict, dict]], margins: Sequence[float], tie_margin: float,
           judge_kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the result section of evaluation.json, comparisons.jsonl rows)."""
    scores = stats.match_scores(margins, np.zeros(len(margins)), tie_margin)
    result = {
        **stats.win_rate(scores),
        "ci_method": "Wilson score interval at 95% over prompts of the mean per-prompt score",
        "tie_rule": f"|judge margin| <= {tie_margin:g} is a tie, counted as half a win",
        "judge_margin": stats.summarize(margins),
        "policy": side_summary([p for p, _ in pairs], judge_kind),
        "baseline": side_summary([b for _, b in pairs], judge_kind),
    }
    pointwise = judge_kind == "pointwise"  # a pairwise judge gives a margin, not rewards
    rows = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"],
             "policy": p["completion"], "baseline": b["completion"],
             "policy_reward": p["reward"] if pointwise else None,
             "baseline_reward": b["reward"] if pointwise else None,
             "judge_margin": float(m), "score": float(s)}
            for (p, b), m, s in zip(pairs, margins, scores)]
    return result, rows


def render_plots(result: Mapping[str, Any], pairs: Sequence[tuple[dict, dict]],
                 margins: Sequence[float], judge_kind: str) -> dict[str, bytes]:
    """{file name: PNG bytes} for :data:`PLOT_FILES`."""
    plt = pyplot()
    out = {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    counts = [result["wins"], result["ties"], result["losses"]]
    left.bar(["wins", "ties", "losses"], counts, color=["tab:green", "tab:gray", "tab:red"])
    left.set(ylabel="prompts", title=f"Policy vs baseline on {result['num_prompts']} prompts")
    if result["num_prompts"]:
        lo, hi = result["win_rate_ci95"]
        wr = result["win_rate"]
        right.errorbar([wr], [0], xerr=[[wr - lo], [hi - wr]], fmt="o", capsize=6)
        right.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
        right.set(xlim=(0, 1), yticks=[], xlabel="win rate (tie = half a win)",
                  title=f"win rate {wr:.3f}, 95% CI [{lo:.3f}, {hi:.3f}]")
    else:
        no_data(right, "no paired prompt")
    out["evaluation_win_rate.png"] = png(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    if judge_kind == "pointwise":
        rewards = {side: [row[i]["reward"] for row in pairs] for i, side in enumerate(SIDES)}
        drawn = [density(left, v, side) for side, v in rewards.items()]
        if any(drawn):
            left.legend(fontsize=8)
            right.scatter(rewards["baseline"], rewards["policy"], s=10, alpha=0.6)
            both = rewards["baseline"] + rewards["policy"]
            right.plot([min(both), max(both)], [min(both), max(both)], color="grey",
                       linewidth=0.8)
        else:
            no_data(left)
            no_data(right)
        left.set(xlabel="judge reward", ylabel="density", title="Judge rewards")
        right.set(xlabel="baseline reward", ylabel="policy reward", title="Per prompt")
    else:
        if not density(left, margins, "s(p, b) - s(b, p), halved"):
            no_data(left)
        else:
            left.legend(fontsize=8)
        left.set(xlabel="pairwise judge margin (logit)", ylabel="density",
                 title="Pairwise judge margins")
        no_data(right, "pairwise judge: no per-model reward")
    out["evaluation_rewards.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = [density(ax, [len(row[i]["completion_token_ids"]) for row in pairs], side)
             for i, side in enumerate(SIDES)]
    if any(drawn):
        ax.legend(fontsize=8)
    else:
        no_data(ax)
    ax.set(xlabel="response length (tokens)", ylabel="density", title="Response lengths")
    out["evaluation_lengths.png"] = png(fig)
    return out


# ---------------------------------------------------------------- command
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    # rso.config.ArgumentParser: an error is one line ``rso evaluate: error: ...``, exit 2, as
    # `rso generate` prints it
    parser = ArgumentParser(prog="rso evaluate", description=console.help_text(__doc__),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="Hugging Face causal LM directory")
    parser.add_argument("--baseline", required=True,
                        help="the model to beat (e.g. the SFT policy): causal LM directory")
    parser.add_argument("--judge", required=True, help="judge reward model directory (held out:"
                        " not the reward model the policy was trained against)")
    parser.add_argument("--judge-kind", choices=("pointwise", "pairwise"), default="pointwise",
                        help="pointwise: r(x, y); pairwise: logit P(a better than b | x) "
                             "(default: %(default)s)")
    parser.add_argument("--prompts", required=True,
                        help="held-out prompts: JSONL/Parquet/HH-RLHF file or glob")
    parser.add_argument("--input-format", default="auto",
                        choices=("auto", "jsonl", "parquet", "hh-rlhf"),
                        help="format of --prompts (default: %(default)s)")
    parser.add_argument("--output", required=True, help="directory for the results")
    parser.add_argument("--engine", choices=("vllm", "transformers"), default="vllm",
                        help="generation engine of both models (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"),
                        default="float32",
                        help="generation precision of both models (default float32: a policy "
                             "fine-tuned for a few hundred steps differs from its base by less "
                             "than bfloat16's resolution, so in bf16 most of its update rounds "
                             "away; auto = the pipeline's choice by hardware)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="response length limit in tokens (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="evaluate on this many prompts (a seeded shard, as --max-prompts)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed, the same for both models (default: %(default)s)")
    parser.add_argument("--tie-margin", type=float, default=0.0,
                        help="judge margins within +-this are ties (half a win) "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="prompts per engine call (default: %(default)s)")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM: no graph capture")
    parser.add_argument("--baseline-generations", metavar="DIR",
                        help="reuse the baseline's responses from an earlier evaluation "
                             "(its OUTPUT/generations/baseline) instead of generating them "
                             "again; refused unless its run id shows the same baseline, "
                             "judge, prompts, seed and settings")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results")
    parser.add_argument("--verbose", action="store_true", help="show library INFO logs "
                        "(also accepted by `rso` itself)")
    args, beam_args = parser.parse_known_args(argv)
    if beam_args:  # only Beam's pipeline options pass on, as in `rso generate`
        from beam_pipelines.pipeline import beam_option_parser

        message = unknown_flags(parser, beam_args, beam_option_parser())
        if message:
            parser.error(message)
    if not (math.isfinite(args.tie_margin) and args.tie_margin >= 0):  # NaN too, before any work
        parser.error(f"--tie-margin must be a finite number >= 0, got {args.tie_margin}")
    if args.num_prompts is not None and args.num_prompts < 1:
        parser.error(f"--num-prompts must be >= 1, got {args.num_prompts}")
    return args, beam_args


def check_reusable(generations: str, run_id: str) -> dict[str, Any]:
    """The manifest of ``generations``; raises ConfigError unless it is a complete `rso
    generate` output whose run id is ``run_id`` (:meth:`GenerateConfig.resolved_run_id`: the
    same models by content, prompts, seed and settings give the same id, so its records are the
    ones a new run would write) and whose record files are those its manifest lists (checksums,
    none missing)."""
    if not rso_io.exists(generations):
        raise ConfigError(f"--baseline-generations {generations} does not exist")
    inside = rso_io.join(generations, "generations", "baseline")
    if not layout.is_complete(generations) and rso_io.exists(inside):
        raise ConfigError(f"--baseline-generations {generations} is an evaluation's output "
                          f"directory, not its baseline's generations: give {inside}")
    try:
        check_complete(generations)
        manifest = read_manifest(generations)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--baseline-generations: {e}") from None
    found = manifest.get("run_id") if isinstance(manifest, dict) else None
    if found != run_id:
        raise ConfigError(f"--baseline-generations {generations} holds run {found}, not "
                          f"{run_id}: another baseline, judge, prompt set, seed or setting; "
                          "leave the flag out to generate the baseline again")
    try:
        verify_records(generations, manifest)
    except ValueError as e:  # a record file removed, partly copied or changed
        raise ConfigError(f"--baseline-generations: {e}") from None
    return manifest


# `rso generate`'s flags that `rso evaluate` names otherwise (``--policy``: the side's model)
GENERATE_FLAGS = {"--input": "--prompts", "--reward-model": "--judge",
                  "--max-prompts": "--num-prompts"}


@contextlib.contextmanager
def evaluate_flags(side: str):
    """Rewrites a ConfigError of one side's `rso generate` run (its config's checks, the run)
    into `rso evaluate`'s flags: ``--input 'x' matches no file`` is about --prompts, and
    ``--policy`` of the baseline's run is --baseline."""
    names = {**GENERATE_FLAGS, "--policy": f"--{side}"}
    try:
        yield
    except ConfigError as e:
        e.args = (re.sub(r"--[a-z-]+(?![\w-])", lambda m: names.get(m[0], m[0]), str(e)),
                  *e.args[1:])
        raise


def local_absolute(path: str | None) -> str | None:
    """A local path made absolute (a URL such as ``gs://...`` as it is), for the record."""
    return path if path is None or "://" in path else os.path.abspath(path)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """evaluation.json's ``settings``: what shaped the comparison besides the models."""
    return {**{k: getattr(args, k) for k in (
        "prompts", "input_format", "engine", "dtype", "max_new_tokens", "batch_size",
        "num_prompts", "seed", "tie_margin", "judge_kind")},
        "baseline_generations": local_absolute(args.baseline_generations)}


def complete_evaluation(output: str) -> dict[str, Any] | None:
    """The ``evaluation.json`` in ``output`` when the evaluation is whole: readable, and both
    generation runs it read complete where it records them (an evaluation whose responses were
    removed since is not). None otherwise."""
    try:
        with rso_io.open_file(rso_io.join(output, EVALUATION), "r") as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return None
    sides = earlier.get("generations") if isinstance(earlier, dict) else None
    if not isinstance(sides, dict) or not all(
            isinstance(p, str) and layout.is_complete(p) for p in sides.values()):
        return None
    return earlier


def finished_evaluation(argv: Sequence[str]) -> dict[str, Any] | None:
    """The whole evaluation (:func:`complete_evaluation`) in the ``--output`` of `rso evaluate
    ARGV` when it is what that command would write: the same :func:`settings` and the same
    content ids of the policy, baseline and judge (:func:`rso.model_id.model_id`). None when
    there is none or it differs (a rerun then replaces it, with ``--overwrite``)."""
    args, _ = parse_args(argv)
    earlier = complete_evaluation(args.output)
    if earlier is None:
        return None
    wanted = {"policy": model_id(args.policy), "baseline": model_id(args.baseline),
              "judge": model_id(args.judge)}
    same = earlier.get("settings") == settings(args) and earlier.get("models") == wanted
    return earlier if same else None


def evaluate(args: argparse.Namespace, beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """Runs the evaluation described in the module docstring; returns evaluation.json's
    content. Raises ConfigError (bad settings, existing results without overwrite)."""
    from beam_pipelines.config import same_path
    from beam_pipelines.pipeline import staged_run

    target = rso_io.join(args.output, EVALUATION)
    if rso_io.exists(target) and not args.overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite to replace it")
    outputs, configs, rows = {}, {}, {}
    for side, model in (("policy", args.policy), ("baseline", args.baseline)):
        outputs[side] = rso_io.join(args.output, "generations", side)
        with evaluate_flags(side):
            # without evaluation.json the side directories are an unfinished evaluation's
            # (interrupted while publishing): replaced, as --overwrite would
            configs[side] = generation_config(model, args, outputs[side]).replace(
                overwrite=args.overwrite or not rso_io.exists(target))
            configs[side].validate()
    reuse = args.baseline_generations is not None
    if reuse:
        outputs["baseline"] = args.baseline_generations
        reused = check_reusable(args.baseline_generations,
                                configs["baseline"].resolved_run_id())
    # Each side generates into a staging directory; nothing is published until every step that
    # can fail has run, so a failed or interrupted evaluation leaves the previous one whole.
    with contextlib.ExitStack() as publish:
        for side in SIDES:
            source = outputs[side]
            if side == "baseline" and reuse:
                manifest = reused
                log.info(f"[{side}] reusing {source} (run {manifest['run_id']})")
            else:
                log.info(f"[{side}] generating with {configs[side].policy} -> {source}")
                publish.enter_context(rso_io.cleaned_up_on_failure(source))  # no empty dirs
                with evaluate_flags(side):
                    source = publish.enter_context(staged_run(configs[side], beam_args)).path
                manifest = read_manifest(source)
            rows[side] = read_records(source, layout.SFT_PREFIX, SFT_COLUMNS)
            dead = (manifest.get("counters") or {}).get("dead_letters", 0)
            log.info(f"[{side}] {counted(len(rows[side]), 'response')}, "
                     f"{counted(dead, 'dead letter')}")
        pairs, unpaired = pair_by_prompt(rows["policy"], rows["baseline"])
        if args.judge_kind == "pointwise":
            margins = [p["reward"] - b["reward"] for p, b in pairs]
        else:
            log.info(f"[judge] scoring {len(pairs)} pairs with the pairwise judge, both orders")
            messages = prompt_messages(args.prompts, args.input_format,
                                       {p["prompt_id"] for p, _ in pairs})
            margins = pairwise_margins(pairs, configs["policy"], messages)
        result, comparisons = report(pairs, margins, args.tie_margin, args.judge_kind)
        evaluation = {
            "settings": settings(args),
            "models": {"policy": model_id(args.policy), "baseline": model_id(args.baseline),
                       "judge": model_id(args.judge)},
            "generations": outputs,
            "unpaired": unpaired,
            **result,
        }
        files = render_plots(result, pairs, margins, args.judge_kind)
        files[COMPARISONS] = "".join(json.dumps(c, ensure_ascii=False, sort_keys=True) + "\n"
                                     for c in comparisons).encode()
        files[EVALUATION] = (json.dumps(evaluation, indent=2, sort_keys=True) + "\n").encode()
        # Publish: the old results stop counting as complete before their generations are
        # replaced (leaving the block commits each side's staged run into its directory), and
        # an earlier run's own baseline goes when this one reads its baseline from elsewhere.
        if rso_io.exists(target):
            rso_io.remove(target)
        own = rso_io.join(args.output, "generations", "baseline")
        if reuse and rso_io.exists(own) and not same_path(own, outputs["baseline"]):
            rso_io.remove_tree(own)
    rso_io.makedirs(args.output)
    for name, data in files.items():  # evaluation.json last: it marks complete results
        with rso_io.open_file(rso_io.join(args.output, name), "wb") as f:
            f.write(data)
    return evaluation


def main(argv: Sequence[str] | None = None) -> int:
    args, beam_args = parse_args(argv)
    console.configure(args.verbose)
    try:
        with console.details_hidden(not args.verbose):  # each side's counters and cost table
            ev = evaluate(args, beam_args)
    except ConfigError as e:
        print(f"rso evaluate: error: {e}", file=sys.stderr)
        return 2
    if ev["num_prompts"]:
        log.info("[result] win rate %.3f, 95%% CI [%.3f, %.3f], over %s: %s, %s (half a win "
                 "each), %s", ev["win_rate"], *ev["win_rate_ci95"],
                 counted(ev["num_prompts"], "prompt"), counted(ev["wins"], "win"),
                 counted(ev["ties"], "tie"), counted(ev["losses"], "loss", "losses"))
    else:
        log.warning("[result] no prompt has a response from both models: no win rate")
    unpaired = sum(len(v) for v in ev["unpaired"].values())
    if unpaired:
        log.warning("[result] %s answered by one model only (see unpaired)",
                    counted(unpaired, "prompt"))
    log.info("wrote %s", rso_io.join(args.output, EVALUATION))
    return 0


if __name__ == "__main__":
    sys.exit(main())
