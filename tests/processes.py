"""An `rso` command in a child process, stopped by a signal once it has reached a given point:
for the tests of Ctrl-C and SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def signalled(argv: Sequence[str], ready: Callable[[], bool], sig: int, waiting_for: str,
              settle: float = 0.0, python: Sequence[str] = ("-m", "rso_cli.cli")
              ) -> tuple[int, str]:
    """Runs ``python -m rso_cli.cli ARGV`` (``python``: other interpreter arguments before
    ARGV, e.g. ``-c SCRIPT``), sends ``sig`` once ``ready()`` is true (and
    ``settle`` seconds more), and returns its exit code and stderr. SIGINT's default action is
    restored in the child: a shell's background job (the suite started with ``&``) passes SIGINT
    on as ignored, and Python then never raises KeyboardInterrupt. The 600 s bound is on a hang
    (failing with "never ``waiting_for``"), not a timing: a loaded machine starts slowly."""
    proc = subprocess.Popen([sys.executable, *python, *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and not ready():
            assert time.monotonic() < deadline, f"the command never {waiting_for} in 600 s"
            time.sleep(0.02)
        time.sleep(settle)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stderr
