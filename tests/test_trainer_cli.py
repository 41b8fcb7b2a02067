"""`rso train` entry point and config, schedules, plots, gs:// data, and no Beam import."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from rso.config import ConfigError
from tests.pair_data import build_pairs, write_output_dir
from trainer.config import TrainConfig
from trainer.metrics import read_metrics
from trainer.optim import lr_multiplier
from trainer.plots import plot_metrics
from trainer.train import main, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def records(tiny_policy):
    return build_pairs(tiny_policy, num_prompts=6, pairs_per_prompt=2)


@pytest.fixture(scope="module")
def data_dir(records, tmp_path_factory):
    return write_output_dir(str(tmp_path_factory.mktemp("pairs")), records)


def losses(output: str) -> list[float]:
    return [r["loss"] for r in read_metrics(os.path.join(output, "metrics.jsonl"))
            if r["split"] == "train"]


def test_flags_override_the_config_file(tiny_policy, data_dir, tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump({
        "data": [data_dir], "policy": tiny_policy, "output": str(tmp_path / "ignored"),
        "loss": "hinge-norm", "gamma": 0.5, "lr": 1e-3, "max_steps": 5, "batch_size": 4,
        "progress": False, "tensorboard": False, "plots": False}))
    out = str(tmp_path / "run")
    rc = main(["--config", str(config_file), "--output", out, "--max-steps", "2",
               "--loss", "sigmoid-norm", "--optimizer", "adafactor", "--grad-accum", "2",
               "--batch-size", "2"])
    assert rc == 0
    assert len(losses(out)) == 2 and losses(out)[0] == pytest.approx(math.log(2.0), abs=1e-4)
    with open(os.path.join(out, "checkpoint-00000002", "trainer_state.json")) as f:
        saved = json.load(f)["config"]
    assert (saved["optimizer"], saved["grad_accum"], saved["batch_size"], saved["gamma"]) == (
        "adafactor", 2, 2, 0.5)
    assert not os.path.exists(tmp_path / "ignored")


def test_unfinished_directory_fails_with_a_clear_message(tiny_policy, records, tmp_path,
                                                         capsys):
    partial = write_output_dir(str(tmp_path / "partial"), records, success=False)
    rc = main(["--data", partial, "--policy", tiny_policy, "--output", str(tmp_path / "run"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"rso train: error: {partial}: no _SUCCESS file" in err


@pytest.mark.parametrize("flags, message", [
    ([], "--data is required"),
    (["--data", "d", "--gamma", "0"], "--gamma must be a positive"),
    (["--data", "d", "--gamma", "2e4"], r"--gamma 20000 is outside \[0.0001, 10000\]"),
    (["--data", "d", "--output", "gs://b/run"], "--output must be a local directory"),
    (["--data", "d", "--eval-fraction", "1.5"], "--eval-fraction must be in"),
    (["--data", "d", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--data", "d", "--resume", "--overwrite"], "exclude each other"),
    (["--data", "d", "--policy", "/no/such/model"], "policy directory not found"),
    # AdamW settings torch refuses only at the first step, or takes silently (NaN)
    (["--data", "d", "--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--data", "d", "--lr", "-1"], "--lr must be a finite number >= 0, got -1"),
    (["--data", "d", "--adam-beta1", "2"], r"--adam-beta1 must be in \[0, 1\), got 2"),
    (["--data", "d", "--adam-eps", "-1"], "--adam-eps must be a finite number > 0"),
    (["--data", "d", "--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
    (["--data", "d", "--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
    (["--data", "OUT", "--output", "OUT"], "is the --data directory"),
])
def test_bad_configuration_fails_at_start(tiny_policy, tmp_path, flags, message):
    base = {"--policy": tiny_policy, "--output": str(tmp_path / "run")}
    for i in range(0, len(flags), 2):
        base.pop(flags[i], None)
    argv = [x for kv in base.items() for x in kv] + flags
    argv = [str(tmp_path / "run") if a == "OUT" else a for a in argv]
    with pytest.raises(ConfigError, match=message):
        TrainConfig.parse_args(argv)


def test_a_policy_that_cannot_load_is_one_line_and_leaves_no_folder(tiny_policy, data_dir,
                                                                      tmp_path, capsys):
    """A policy whose weights file is damaged: one error line (was a safetensors traceback),
    and none of the folders the run had made for its --output (and its lock) is left; a folder
    that was there before stays."""
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(tiny_policy, broken)
    open(os.path.join(broken, "model.safetensors"), "wb").close()
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "a" / "b"
    assert main(["--data", data_dir, "--policy", broken, "--output", str(out), "--no-progress",
                 "--no-tensorboard", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"rso train: error: cannot load the policy {broken}: " in err
    assert "Traceback" not in err
    assert os.listdir(tmp_path / "kept") == []


def test_unknown_config_key_is_an_error(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("data: [x]\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key\\(s\\): learning_rate"):
        TrainConfig.parse_args(["--config", str(config_file)])


def test_schedules():
    # warm-up 2 of 10 steps, then decay over the remaining 8
    assert [lr_multiplier(s, 2, 10, "linear") for s in (0, 1, 2, 6, 10)] == [
        0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_multiplier(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(2, 2, 10, "cosine") == 1.0 and lr_multiplier(10, 2, 10, "cosine") == 0.0
    assert lr_multiplier(9, 2, 10, "constant") == 1.0
    assert lr_multiplier(0, 0, 1, "linear") == 1.0


def test_logged_lr_follows_the_schedule(tiny_policy, data_dir, tmp_path):
    cfg = TrainConfig(data=[data_dir], policy=tiny_policy, output=str(tmp_path / "run"),
                      lr=1e-3, batch_size=4, max_steps=4, warmup_steps=2, scheduler="linear",
                      progress=False, tensorboard=False, plots=False, save_every=0)
    result = train(cfg)
    lrs = [r["lr"] for r in read_metrics(result.metrics_path) if r["split"] == "train"]
    assert lrs == pytest.approx([1e-3 * lr_multiplier(s, 2, 4, "linear") for s in range(4)])


def test_plots_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"split": "train", "step": s, "loss": 1.0 / s, "accuracy": 0.5, "lr": 1e-3}
            for s in range(1, 5)] + [{"split": "eval", "step": 4, "loss": 0.3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    written = plot_metrics(str(path), str(tmp_path / "plots"))
    assert sorted(os.path.basename(p) for p in written) == ["accuracy.png", "loss.png", "lr.png"]


def test_trains_from_gs(tiny_policy, data_dir, gcs_bucket, tmp_path):
    """The same pairs from gs:// (local emulator, rso.storage/gcsfs) give the same losses."""
    from rso.storage import filesystem

    remote = f"{gcs_bucket}/trainer-test/pairs"
    fs, path = filesystem(gcs_bucket)
    for name in os.listdir(data_dir):
        fs.put_file(os.path.join(data_dir, name), f"{path}/trainer-test/pairs/{name}")
    common = dict(policy=tiny_policy, lr=1e-3, gamma=0.5, batch_size=4, max_steps=2,
                  progress=False, tensorboard=False, plots=False)
    local = train(TrainConfig(data=[data_dir], output=str(tmp_path / "local"), **common))
    remote_run = train(TrainConfig(data=[remote], output=str(tmp_path / "remote"), **common))
    glob_run = train(TrainConfig(data=[remote + "/pairs-*.tfrecord.gz"],
                                 output=str(tmp_path / "glob"), **common))
    assert losses(remote_run.output) == losses(local.output)
    assert losses(glob_run.output) == pytest.approx(losses(local.output), abs=1e-6)


def test_trainer_does_not_import_beam():
    code = ("import sys, trainer.train, trainer.plots; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('apache_beam', 'beam_pipelines', 'vllm')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_heap_retention_limit_is_set_on_glibc_and_yields_to_the_user(monkeypatch):
    from trainer.memory import limit_heap_retention

    assert limit_heap_retention() is True  # this machine runs glibc
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert limit_heap_retention() is False


def _rso_train(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rso_cli.cli", "train", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("content, message", [
    (None, r"missing\.yaml: no such file"),
    ("data: [a\nlr: 1\n", r"bad\.yaml: line 2, column 3: not valid YAML \(expected ',' or ']'"),
    ("data: x\n  lr: 1\n", r"bad\.yaml: line 2, column 5: not valid YAML \(mapping values"),
])
def test_config_file_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / ("missing.yaml" if content is None else "bad.yaml")
    if content is not None:
        path.write_text(content)
    proc = _rso_train("--config", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rso train: error: "), proc.stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("loss, gamma", [("ipo", "1e-20"), ("sigmoid-norm", "1e30"),
                                         ("hinge-norm", "1e-5")])
def test_gamma_outside_the_float32_range_is_refused_at_start(tiny_policy, tmp_path, loss, gamma):
    proc = _rso_train("--data", str(tmp_path), "--policy", tiny_policy, "--output",
                      str(tmp_path / "run"), "--loss", loss, "--gamma", gamma)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert f"--gamma {float(gamma):g} is outside [0.0001, 10000]" in proc.stderr
    assert "overflows" in proc.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("loss, gamma", [("ipo", 1e-4), ("sigmoid-norm", 1e4),
                                         ("hinge-norm", 1e4), ("hinge", 1e4)])
def test_gamma_at_the_ends_of_its_range_trains(tiny_policy, data_dir, tmp_path, loss, gamma):
    result = train(TrainConfig(data=[data_dir], policy=tiny_policy, output=str(tmp_path / "r"),
                               loss=loss, gamma=gamma, lr=1e-3, batch_size=4, max_steps=2,
                               progress=False, tensorboard=False, plots=False))
    assert result.finished
    assert all(math.isfinite(loss) for loss in losses(result.output))


def test_a_redirected_log_gets_progress_lines_not_bar_frames(tiny_policy, data_dir, tmp_path):
    """With stderr not a terminal (a log file, CI, a pipe) the bar's `\\r` frames made one long
    line with the log lines inside it; now progress is a log line a minute and one at the end."""
    proc = _rso_train("--data", data_dir, "--policy", tiny_policy, "--output",
                      str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "2",
                      "--no-tensorboard", "--no-plots", "--num-threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    end = [line for line in proc.stderr.splitlines() if "trainer.progress" in line]
    assert len(end) == 1 and "train: 100% 3/3 [" in end[0] and "loss=" in end[0], proc.stderr


def test_finished_run_is_known_without_loading_a_model(tiny_policy, data_dir, tmp_path):
    """`rso demo` asks `finished_run` before it starts a trainer for a kept training: the final
    checkpoint only for the same settings and data, when the run closed with its summary."""
    from trainer.train import finished_run

    out = str(tmp_path / "run")
    argv = ["--data", data_dir, "--policy", tiny_policy, "--output", out, "--max-steps", "2",
            "--batch-size", "2", "--no-progress", "--no-tensorboard", "--no-plots"]
    assert finished_run(argv + ["--resume"]) is None  # nothing there yet
    assert main(argv) == 0
    final = os.path.join(out, "checkpoint-00000002")
    assert finished_run(argv + ["--resume"]) == final
    assert finished_run(argv + ["--resume", "--lr", "1e-3"]) is None  # the trainer refuses it
    assert finished_run(argv + ["--resume", "--max-steps", "3"]) is None  # one more step
    # stopped after its last checkpoint but before the closing summary: the trainer decides
    metrics = os.path.join(out, "metrics.jsonl")
    kept = [line for line in open(metrics) if '"summary"' not in line]
    with open(metrics, "w") as f:
        f.writelines(kept)
    assert finished_run(argv + ["--resume"]) is None
