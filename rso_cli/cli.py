"""The `rso` command: `rso generate`, `rso train`, `rso reward train`, `rso demo`.

Each subcommand imports only what it needs, so `rso train` runs where Beam is not installed.
"""
from __future__ import annotations

import sys

USAGE = """usage: rso {generate,train,reward,demo} [--config FILE.yaml] [flags]

  generate   build RSO preference pairs with Apache Beam (vLLM or transformers + reward models)
  train      optimise a policy on the pairs (sigmoid-norm/DPO, hinge-norm, hinge/SLiC, ipo)
  reward     `rso reward train`: fit a Bradley-Terry reward model on preference pairs
  demo       run `generate` on SmolLM2-135M-Instruct and bundled HH-RLHF prompts, offline

`rso COMMAND --help` lists every flag of a command.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "generate":
        from beam_pipelines.pipeline import main as run
    elif command == "train":
        from trainer.train import main as run
    elif command == "reward":
        from trainer.reward_train import main as run
    elif command == "demo":
        from rso_cli.demo import main as run
    else:
        print(f"rso: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
