"""The `rso` command: `rso generate`, `rso train`, `rso demo`.

Each subcommand imports only what it needs, so `rso train` runs where Beam is not installed.
"""
from __future__ import annotations

import sys

USAGE = """usage: rso {generate,train,iterate,sweep,demo} [--config FILE.yaml] [flags]

  generate   build RSO preference pairs with Apache Beam (vLLM or transformers + reward models)
  train      optimise a policy on the pairs (sigmoid-norm/DPO, hinge-norm, hinge/SLiC, ipo)
  iterate    R rounds of generate + train, each round's policy proposing the next round's data
  sweep      expected reward gain and KL for several betas, from a stored candidate set
  demo       run `generate` on SmolLM2-135M-Instruct and bundled HH-RLHF prompts, offline

`rso COMMAND --help` lists every flag of a command. `--verbose` anywhere shows the INFO logs
of the libraries underneath (Beam, vLLM, transformers), hidden by default.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    from rso import console

    console.configure(verbose)
    command, rest = argv[0], argv[1:]
    if command == "generate":
        from beam_pipelines.pipeline import main as run
    elif command == "train":
        from trainer.train import main as run
    elif command == "iterate":
        from rso_cli.iterate import main as run
    elif command == "sweep":
        from rso_cli.sweep import main as run
    elif command == "demo":
        from rso_cli.demo import main as run
    else:
        print(f"rso: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
