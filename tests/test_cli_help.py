"""Every command's --help runs and prints plain text: no argparse internals leak into it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", [[], ["generate"], ["train"], ["demo"]],
                         ids=["rso", "generate", "train", "demo"])
def test_help_of_every_command(command):
    proc = subprocess.run([sys.executable, "-m", "rso_cli.cli", *command, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    # An unescaped "%" in a help text makes argparse print its own dict or a raw "%(...)".
    for leak in ("{'", "%("):
        assert leak not in proc.stdout, proc.stdout
    if command == ["train"]:
        assert "~15% speed" in proc.stdout


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
