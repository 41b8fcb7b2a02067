"""Every command's --help runs and prints plain text: no argparse internals leak into it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


COMMANDS = [[], ["generate"], ["select"], ["train"], ["reward", "train"], ["evaluate"], ["demo"],
            ["iterate"], ["sweep"], ["inspect"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "rso" for c in COMMANDS])
def test_help_of_every_command(command):
    proc = subprocess.run([sys.executable, "-m", "rso_cli.cli", *command, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    # An unescaped "%" in a help text makes argparse print its own dict or a raw "%(...)".
    # nor the source's markup: Sphinx roles, RST literals, an empty default
    for leak in ("{'", "%(", "(default: )", "(default: None)", ":func:", ":mod:", ":class:",
                 ":meth:", ":data:", "``", "::\n"):
        assert leak not in proc.stdout, proc.stdout
    if command == ["train"]:
        assert "~15% speed" in proc.stdout
    if command == ["select"]:  # the store decides these: giving one is an error
        for flag in ("--num-candidates", "--temperature", "--max-new-tokens", "--input "):
            assert flag not in proc.stdout, proc.stdout
        assert "--beta" in proc.stdout and "--selection" in proc.stdout


def test_percent_in_any_help_text_is_printed_as_written():
    import argparse
    import dataclasses

    from rso.config import Config, option

    @dataclasses.dataclass
    class Odd(Config):
        rate: float = option(0.5, "50% of %(prog)s, 100%")

    parser = argparse.ArgumentParser(prog="odd")
    Odd.add_arguments(parser)
    assert "50% of %(prog)s, 100% (default: 0.5)" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("command,module", [("evaluate", "rso_cli.evaluate"),
                                            ("demo", "rso_cli.demo"),
                                            ("reward", "trainer.reward_train"),
                                            ("inspect", "rso_cli.inspect_output")])
def test_verbose_reaches_the_commands_that_parse_it(command, module, monkeypatch):
    """`rso demo --verbose` once lost its flag in the dispatcher, so the demo ran quiet (and
    re-quieted the libraries) although the user asked for everything."""
    import importlib

    from rso_cli import cli

    seen: list[list[str]] = []
    monkeypatch.setattr("rso.console.configure", lambda verbose=False: None)  # keep pytest's
    monkeypatch.setattr(importlib.import_module(module), "main",
                        lambda argv: seen.append(list(argv)) or 0)
    assert cli.main([command, "x", "--verbose"]) == 0
    assert seen == [["x", "--verbose"] if command in cli.OWN_VERBOSE else ["x"]]


# what each command requires, so that the misspelt flag is the only error
REQUIRED = {"sweep": ["--candidates", "c"], "inspect": ["out"],
            "evaluate": ["--policy", "p", "--baseline", "b", "--judge", "j", "--prompts", "x",
                         "--output", "o"],
            "iterate": ["--rounds", "1", "--policy", "p", "--input", "i", "--reward-model", "r",
                        "--output", "o"],
            "nightly-publish": ["publish", "root", "dt=2026-01-01"]}


# (`rso select` reads its --candidates store first: test_select covers its flags)
PARSED = [c for c in COMMANDS[1:] if c != ["select"]] + [["nightly-publish"]]


@pytest.mark.parametrize("command", PARSED, ids=[" ".join(c) for c in PARSED])
def test_a_misspelt_flag_is_one_line_naming_it_never_its_value(command, capsys):
    """Every command's parser (`rso.config.ArgumentParser`): a misspelt flag is refused, exit 2,
    in one line that names it with a "did you mean" and never echoes its value (a token given
    by mistake stays out of logs); argparse's own usage block is not printed. `rso demo`,
    `iterate`, `sweep`, `inspect` and the nightly publisher once printed argparse's usage and
    "unrecognized arguments: --reward-model VALUE"; abbreviations were accepted."""
    from deploy.nightly import publish
    from rso_cli import cli

    argv = [*REQUIRED.get(command[0], []), "--seeed", "s3cr3t-value", "-Xs3cr3t"]
    try:
        rc = publish.main(argv) if command == ["nightly-publish"] else cli.main([*command, *argv])
    except SystemExit as e:  # argparse's exit, or the command's own return code
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "usage:" not in err and "s3cr3t" not in err
    assert "unknown flag(s): --seeed" in err and "-X" in err


@pytest.mark.parametrize("command,flag,meant", [("demo", "--overw", "--overwrite"),
                                                ("nightly-publish", "--forc", "--force"),
                                                ("iterate", "--overw", "--overwrite"),
                                                ("sweep", "--replic", "--replicates"),
                                                ("inspect", "--plot", "--plots")])
def test_an_abbreviated_flag_is_refused(command, flag, meant, capsys):
    """`--overw` for `--overwrite` (or `--out` for `--output`) is not taken as the flag it
    abbreviates: a later flag of the same prefix would change its meaning."""
    from deploy.nightly import publish
    from rso_cli import cli

    argv = [*REQUIRED.get(command, []), flag, "1"]
    with pytest.raises(SystemExit, match="2"):  # (a subcommand's flag too: publish --force)
        publish.main(argv) if command == "nightly-publish" else cli.main([command, *argv])
    assert f"unknown flag(s): {flag} (did you mean {meant}?)" in capsys.readouterr().err
