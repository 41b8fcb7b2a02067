"""The `rso` command: one subcommand per application, each in its own module.

Each subcommand imports only what it needs, so `rso train` runs where Beam is not installed.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module whose main(argv) runs it, one-line help)
COMMANDS = {
    "generate": ("beam_pipelines.pipeline",
                 "build RSO preference pairs with Apache Beam (vLLM or transformers + reward "
                 "models)"),
    "select": ("beam_pipelines.pipeline:select_main",
               "re-select and pair stored candidates (no decoding): another beta, method, "
               "pairing or reward model"),
    "train": ("trainer.train",
              "optimise a policy on the pairs (sigmoid-norm/DPO, hinge-norm, hinge/SLiC, ipo)"),
    "reward": ("trainer.reward_train",
               "`rso reward train`: fit a Bradley-Terry (or pairwise) reward model on preference "
               "pairs"),
    "iterate": ("rso_cli.iterate",
                "R rounds of generate + train, each round's policy proposing the next round's "
                "data"),
    "sweep": ("rso_cli.sweep",
              "expected reward gain and KL for several betas, from a stored candidate set"),
    "inspect": ("rso_cli.inspect_output",
                "summarise and plot a `generate` output: rewards, margins, length bias, dead "
                "letters"),
    "evaluate": ("rso_cli.evaluate",
                 "win rate of a policy against a baseline under a judge reward model, with a "
                 "95% CI"),
    "demo": ("rso_cli.demo", "the whole loop on SmolLM2-135M-Instruct and bundled HH-RLHF data, "
                             "offline"),
}
OWN_VERBOSE = ("reward", "evaluate", "demo")  # commands whose parser has --verbose
USAGE = ("usage: rso {" + ",".join(COMMANDS) + "} [flags] [--verbose]\n\n"
         + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
         + "\n\n`rso COMMAND --help` lists every flag of a command. `--verbose` shows the INFO "
           "logs of the\nlibraries underneath (Beam, vLLM, transformers), hidden by default. "
           "generate, select,\ntrain and reward train also read --config FILE.yaml (flags "
           "override it).\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = argv[0]
    name = "rso " + " ".join(argv[:2] if command == "reward" and argv[1:2] == ["train"] else
                             argv[:1])
    try:
        from rso import console

        console.configure("--verbose" in argv)
        console.raise_on_sigterm()
        # a command with its own --verbose (what it shows more: nested runs' details) gets the
        # flag; the others would refuse it as unknown
        rest = argv[1:] if command in OWN_VERBOSE else [a for a in argv[1:] if a != "--verbose"]
        if command not in COMMANDS:
            print(f"rso: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
        module, _, function = COMMANDS[command][0].partition(":")
        run = getattr(importlib.import_module(module), function or "main")
        return int(run(rest) or 0)
    except BaseException as e:
        from rso.console import interrupted, terminated

        if not interrupted(e):
            raise
        if terminated(e):  # 143 = 128 + SIGTERM, as the trainers exit when stopped by it
            print(f"{name}: terminated (SIGTERM)", file=sys.stderr)
            return 143
        # Ctrl-C: one line, not a traceback (or two: `rso demo`'s training child gets the
        # signal too). Outputs are staged and published only when complete, so an interrupted
        # run leaves the previous one in place. On a terminal the line starts below the "^C"
        # the terminal echoed where the cursor was (a progress bar's line); in a log it does
        # not start with a blank line.
        print(f"{chr(10) if sys.stderr.isatty() else ''}{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
