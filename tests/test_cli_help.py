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
