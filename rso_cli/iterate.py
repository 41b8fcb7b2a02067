"""`rso iterate --rounds R`: iterative RSO, each round's policy proposing the next round's data.

Round r (0-based), under ``--output ROOT``:

1. ``rso generate`` with policy ``pi_r`` (round 0: ``--policy``) into ``ROOT/round-r/data``:
   candidates sampled from ``pi_r``, so the stored ``sft_logp`` (the reference log-probs) are
   ``pi_r``'s: ``pi_r`` is round r's proposal and also its reference, as Liu et al. (2024,
   section 5) suggest against reward-model drift. ``--seed`` + r draws a different
   ``--max-prompts`` shard and different samples each round.
2. ``rso train`` from ``pi_r`` on those pairs into ``ROOT/round-r/policy``; its final checkpoint
   is ``pi_{r+1}``.

Every round's data, model and metrics are kept; ``ROOT/round-r/round.json`` marks a finished
round, so running the same command again continues where an interrupted run stopped: finished
rounds are skipped, an unfinished round keeps its data when it is what the round would generate
(the same run id) and resumes its training from the last checkpoint (``--overwrite`` redoes
every round). ``ROOT/iterate.json`` and the printed table
summarise them: pairs, mean chosen / rejected proxy reward, the policy's content id and the last
train metrics. Extra ``rso generate`` flags go in ``--generate-args``, extra ``rso train`` flags
in ``--train-args`` (quoted strings, split like a shell); both are checked before round 1
runs (a misspelt flag is refused at once, not when round 1 reaches its training).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence

from rso import console
from rso.config import ArgumentParser

log = logging.getLogger("rso_cli.iterate")
DONE = "round.json"  # ROOT/round-R/round.json: the round's summary, written when it is complete


def round_dirs(root: str, r: int) -> tuple[str, str]:
    """(data, policy) directories of round ``r``."""
    base = os.path.join(root, f"round-{r}")
    return os.path.join(base, "data"), os.path.join(base, "policy")


def summarise_round(r: int, policy: str, data: str, train_out: str) -> dict:
    """One row of the summary: what round ``r`` made, read back from its outputs."""
    import pyarrow.parquet as pq

    from rso import layout
    from rso.model_id import model_id
    from trainer.checkpoint import latest_checkpoint
    from trainer.metrics import METRICS_FILE, read_metrics

    rows = [row for path in layout.pair_files(data, "parquet")
            for row in pq.read_table(path, columns=["chosen_reward", "rejected_reward"])
            .to_pylist()]
    metrics = read_metrics(os.path.join(train_out, METRICS_FILE))
    train = [m for m in metrics if m.get("split") == "train"]
    mean = (lambda xs: sum(xs) / len(xs) if xs else float("nan"))  # noqa: E731
    return {
        "round": r, "proposal_policy": model_id(policy), "data": data,
        "pairs": len(rows),
        "mean_chosen_reward": mean([x["chosen_reward"] for x in rows]),
        "mean_rejected_reward": mean([x["rejected_reward"] for x in rows]),
        "trained_policy": latest_checkpoint(train_out),
        "final_train_loss": train[-1].get("loss") if train else None,
        "final_train_accuracy": train[-1].get("accuracy") if train else None,
    }


def generate_argv(args: argparse.Namespace, r: int, policy: str) -> list[str]:
    """The ``rso generate`` flags of round ``r`` (proposal ``policy``)."""
    rewards = [a for rm in args.reward_model for a in ("--reward-model", rm)]
    return ["--input", args.input, "--output", round_dirs(args.output, r)[0], "--policy", policy,
            *rewards, "--seed", str(args.seed + r),
            *(["--overwrite"] if args.overwrite else []), *shlex.split(args.generate_args)]


def train_argv(args: argparse.Namespace, r: int, policy: str, resume: bool) -> list[str]:
    """The ``rso train`` flags of round ``r`` (from ``policy``)."""
    data, train_out = round_dirs(args.output, r)
    return ["--data", data, "--policy", policy, "--output", train_out,
            "--seed", str(args.seed + r), *(["--overwrite"] if args.overwrite else []),
            *(["--resume"] if resume else []), *shlex.split(args.train_args)]


# what iterate sets in each round's commands: the nested args may not set them too
GENERATE_OWN = ("--input", "--output", "--policy", "--reward-model", "--seed", "--overwrite")
TRAIN_OWN = ("--data", "--policy", "--output", "--seed", "--overwrite", "--resume")


def check_round_flags(args: argparse.Namespace) -> str | None:
    """Why round 0's ``rso generate`` or ``rso train`` flags would be refused (an unknown or
    malformed flag in ``--generate-args`` / ``--train-args``), or None: checked before any round
    runs, not when round 0 reaches its training. argparse's own errors (a value that is not a
    number) exit 2 here with the nested command's one line."""
    from beam_pipelines.config import GenerateConfig
    from beam_pipelines.pipeline import beam_option_parser
    from rso.config import ConfigError
    from trainer.config import TrainConfig

    for flag, value, own in (("--generate-args", args.generate_args, GENERATE_OWN),
                             ("--train-args", args.train_args, TRAIN_OWN)):
        try:
            given = {t.split("=", 1)[0] for t in shlex.split(value) if t.startswith("--")}
        except ValueError as e:  # shlex: an unclosed quote
            return f"{flag}: {e}"
        taken = sorted(given & set(own))
        if taken:
            return (f"{flag}: {', '.join(taken)} is set by rso iterate for each round (its own "
                    f"flags: {', '.join(own)}); leave it out")
    for command, parse in (
            ("rso generate", lambda: GenerateConfig.parse_args(
                generate_argv(args, 0, args.policy), prog="rso generate",
                passthrough=beam_option_parser())),
            ("rso train", lambda: TrainConfig.parse_args(
                train_argv(args, 0, args.policy, False), prog="rso train"))):
        try:
            parse()
        except ConfigError as e:
            return f"round 1's {command} would refuse its flags: {e}"
    return None


def format_table(rows: list[dict]) -> str:
    lines = [f"{'round':>5} {'pairs':>6} {'chosen r':>9} {'rejected r':>11} {'loss':>7}  policy"]
    for row in rows:
        loss = row["final_train_loss"]
        lines.append(f"{row['round']:>5} {row['pairs']:>6} {row['mean_chosen_reward']:>9.3f} "
                     f"{row['mean_rejected_reward']:>11.3f} "
                     f"{loss if loss is None else format(loss, '7.4f'):>7}  "
                     f"{row['proposal_policy']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="rso iterate", description=console.help_text(__doc__),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, required=True,
                        help="R: rounds of generate + train (round r samples from round r-1's "
                             "policy)")
    parser.add_argument("--policy", required=True, help="the SFT policy (round 0's proposal)")
    parser.add_argument("--input", required=True, help="prompts (as rso generate --input)")
    parser.add_argument("--reward-model", required=True, action="append",
                        help="as rso generate --reward-model (repeatable)")
    parser.add_argument("--output", required=True, help="ROOT: round-R/{data,policy} go here")
    parser.add_argument("--seed", type=int, default=0,
                        help="run seed of round 0; round r uses seed + r (default: 0)")
    parser.add_argument("--generate-args", default="",
                        help="extra rso generate flags, quoted (one flag alone: "
                             "--generate-args=--write-candidates)")
    parser.add_argument("--train-args", default="",
                        help="extra rso train flags, quoted (one flag alone: "
                             "--train-args=--no-progress)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every round (default: rounds finished earlier are kept and "
                             "skipped, so an interrupted run continues where it stopped)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    from beam_pipelines.pipeline import main as generate
    from rso_cli.reruns import data_run_id, wanted_run_id
    from trainer.checkpoint import latest_checkpoint
    from trainer.train import main as train

    problem = check_round_flags(args)
    if problem:
        parser.error(problem)
    policy, rows = args.policy, []
    for r in range(args.rounds):
        data, train_out = round_dirs(args.output, r)
        done = os.path.join(os.path.dirname(data), DONE)
        if os.path.exists(done) and not args.overwrite:
            with open(done) as f:
                rows.append(json.load(f))
            policy = rows[-1]["trained_policy"]
            log.info("round %d/%d: finished earlier (%s), skipped", r + 1, args.rounds, done)
            continue
        gen_argv = generate_argv(args, r, policy)
        # An unfinished round (interrupted): its data is kept when it is what this round would
        # generate (the same run id), replaced otherwise; its training resumes.
        earlier = None if args.overwrite else data_run_id(data)
        if earlier is not None and earlier == wanted_run_id(gen_argv):
            log.info("round %d/%d: data generated earlier (run %s), kept", r + 1, args.rounds,
                     earlier)
        else:
            log.info("round %d/%d: generate with %s", r + 1, args.rounds, policy)
            rc = generate(gen_argv + (["--overwrite"] if earlier else []))  # other settings
            if rc:
                return rc
        resume = not args.overwrite and os.path.isdir(train_out)
        log.info("round %d/%d: train from %s%s", r + 1, args.rounds, policy,
                 " (resuming)" if resume else "")
        rc = train(train_argv(args, r, policy, resume))
        if rc:
            return rc
        rows.append(summarise_round(r, policy, data, train_out))
        with open(done, "w") as f:  # written last: the round is complete
            json.dump(rows[-1], f, indent=2)
        policy = latest_checkpoint(train_out)
        if policy is None:
            print(f"rso iterate: error: round {r} wrote no checkpoint", file=sys.stderr)
            return 1
    with open(os.path.join(args.output, "iterate.json"), "w") as f:
        json.dump({"rounds": rows, "final_policy": policy}, f, indent=2)
    print(format_table(rows))
    print(f"final policy: {policy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
