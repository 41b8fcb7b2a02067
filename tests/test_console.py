"""The console shows our lines and hides third-party INFO unless --verbose."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import logging, sys
from rso import console
console.configure(verbose=sys.argv[1] == "1")
logging.getLogger("beam_pipelines.read").info("OUR-LINE")
logging.getLogger("apache_beam.typehints").info("BEAM-INFO")
logging.getLogger("vllm.model_executor").warning("PER-WEIGHT-WARNING")
logging.getLogger("some.lib").warning("LIB-WARNING")
# A child process (vLLM's engine core, a Beam worker) whose torch warns at import time: torch's
# loggers have their own handler, configured from the environment.
import subprocess
subprocess.run([sys.executable, "-c", "import logging, torch; "
                "logging.getLogger('torch._library.triton').warning('TORCH-CHILD-WARNING')"],
               check=True)
"""


def run(verbose: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if verbose else "0"],
                         capture_output=True, text=True, timeout=120, check=True, env=env)
    return out.stderr


def test_quiet_by_default():
    err = run(False)
    assert "OUR-LINE" in err and "LIB-WARNING" in err
    assert "BEAM-INFO" not in err and "PER-WEIGHT-WARNING" not in err
    assert "TORCH-CHILD-WARNING" not in err


def test_verbose_shows_everything():
    err = run(True)
    for line in ("OUR-LINE", "BEAM-INFO", "PER-WEIGHT-WARNING", "LIB-WARNING",
                 "TORCH-CHILD-WARNING"):
        assert line in err


BAR_SCRIPT = """
import logging, sys
from tqdm import tqdm
from rso import console
console.configure(verbose=False)
bar = tqdm(total=3, desc="BAR", file=sys.stderr, mininterval=0)
bar.update(1)
logging.getLogger("trainer.train").info("MID-BAR")
bar.update(1)
bar.close()
"""


def test_a_line_logged_under_a_progress_bar_gets_a_line_of_its_own():
    """Trainer lines logged while its tqdm bar was open landed inside the bar's line."""
    err = subprocess.run([sys.executable, "-c", BAR_SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True).stderr
    line = next(line for line in err.split("\n") if "MID-BAR" in line)
    # what the terminal shows on that line: the text after its last carriage return
    assert "BAR" not in line.split("\r")[-1].replace("MID-BAR", ""), repr(err)
    assert line.split("\r")[-1].strip().endswith("trainer.train: MID-BAR"), repr(err)


def test_help_text_shows_docstring_markup_as_the_readme_writes_it():
    from rso.console import help_text

    doc = "See :class:`~a.b.Staged` and :func:`rso.stats.win_rate`: ``k`` pairs.\nWrites::\n"
    assert help_text(doc) == "See `Staged` and `rso.stats.win_rate`: `k` pairs.\nWrites:\n"
    assert help_text(None) == ""


CTRL_C_IN_BEAM = """
import sys
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from rso_cli import cli

def ctrl_c(x):
    raise KeyboardInterrupt

def pipeline(argv):
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        p | beam.Create([1, 2]) | beam.Map(ctrl_c)

cli.COMMANDS["generate"] = ("__main__:pipeline", "")
sys.exit(cli.main(["generate"]))
"""


def test_ctrl_c_inside_a_beam_stage_is_one_line():
    """Beam's runner re-raises a Ctrl-C in a stage as RuntimeError("KeyboardInterrupt [while
    running ...]") and logs it with its traceback: ~230 lines and exit 1, where `rso` says one
    line and exits 130."""
    proc = subprocess.run([sys.executable, "-c", CTRL_C_IN_BEAM], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "rso generate: interrupted"
    assert "\n\nrso generate: interrupted" not in proc.stderr  # no blank line in a log


def test_other_errors_are_not_taken_for_ctrl_c():
    from rso.console import interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("while running 'Generate'") from e
    except RuntimeError as e:
        assert interrupted(e)
    assert interrupted(RuntimeError("KeyboardInterrupt [while running 'Write']"))
    assert not interrupted(RuntimeError("CUDA out of memory")) and not interrupted(None)


def test_counts_are_written_in_their_number():
    from rso.console import counted

    assert [counted(n, "candidate") for n in (0, 1, 16)] == [
        "0 candidates", "1 candidate", "16 candidates"]
    assert counted(1, "loss", "losses") == "1 loss" and counted(2, "loss", "losses") == "2 losses"


@pytest.mark.slow
def test_sigterm_on_generate_leaves_nothing_and_is_one_line(tiny_policy, tiny_reward_model,
                                                             tmp_path):
    """SIGTERM (a scheduler's stop, `timeout`) killed `rso generate` where it stood: its
    output's _LOCK and staging directory stayed for the next run to clean up. It now unwinds
    like Ctrl-C: one line, exit 143, and the output it was creating is gone."""
    import signal

    from tests.processes import signalled

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"hello {i}"}) + "\n"
                               for i in range(400)))
    out = tmp_path / "nested" / "run"
    returncode, stderr = signalled(
        ["generate", "--input", str(prompts), "--output", str(out), "--policy", tiny_policy,
         "--reward-model", tiny_reward_model, "--engine", "transformers", "--num-candidates", "4",
         "--num-samples", "2", "--max-new-tokens", "48"],
        (out / "_LOCK").exists, signal.SIGTERM, "took its output's lock", settle=2)
    assert returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == "rso generate: terminated (SIGTERM)"
    assert not (tmp_path / "nested").exists()  # lock, staging and the new directories


def test_progress_off_a_terminal_is_log_lines(caplog, capsys):
    """stderr here is pytest's capture, not a terminal: tqdm's text as log lines, at most one
    per ``every_s`` (0: every update) and one at the end, and no `\\r` frame; nothing at all
    when disabled."""
    from rso.console import ProgressBar

    with caplog.at_level(logging.INFO, logger="rso.progress"):
        bar = ProgressBar(4, desc="features", unit="batch", every_s=0)
        bar.update()
        bar.set_postfix(loss="0.5")
        bar.update(3)
        bar.close()
        quiet = ProgressBar(4, desc="quiet", unit="batch", enabled=False)
        quiet.update(4)
        quiet.close()
        slow = ProgressBar(None, desc="slow", unit="batch", every_s=3600)
        slow.update(2)
        slow.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "rso.progress"]
    assert [line.split(" [")[0] for line in lines] == [
        "features:  25% 1/4", "features: 100% 4/4", "slow: 2batch"], lines
    assert lines[1].endswith("loss=0.5]")
    assert "\r" not in capsys.readouterr().err
