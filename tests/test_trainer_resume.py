"""Exact resume: a run stopped (or killed) and resumed ends with the parameters of an
uninterrupted run. The policy gets attention dropout, so the RNG state matters too."""
from __future__ import annotations

import itertools
import json
import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from rso.config import ConfigError
from tests.pair_data import build_pairs, write_output_dir
from tests.processes import signalled
from trainer.checkpoint import list_checkpoints, load_trainer_state
from trainer.config import TrainConfig
from trainer.metrics import read_metrics
from trainer.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="module")
def dropout_policy(tiny_policy, tmp_path_factory):
    """The tiny policy with attention dropout 0.2: training consumes torch's RNG."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path_factory.mktemp("dropout_policy"))
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, attention_dropout=0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_policy).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(dropout_policy, tmp_path_factory):
    records = build_pairs(dropout_policy, num_prompts=8, pairs_per_prompt=2)
    return write_output_dir(str(tmp_path_factory.mktemp("pairs")), records)


def config(policy, data, output, **overrides) -> TrainConfig:
    # 16 pairs, micro-batches of 2, 2 per step: 4 steps per epoch, so 7 steps cross an epoch.
    values = dict(data=[data], policy=policy, output=output, lr=1e-3, gamma=0.5, batch_size=2,
                  grad_accum=2, max_steps=7, save_every=2, shuffle_buffer=4, bucket_batches=2,
                  progress=False, tensorboard=False, plots=False, num_threads=1)
    values.update(overrides)
    return TrainConfig(**values)


class Killed(Exception):
    """Raised by :func:`killed_after`: leaves the loop without saving, like a killed process."""


def killed_after(steps: int):
    """A ``should_stop`` for a fresh run that "kills" it after step ``steps``: it is asked once
    after every step, and raising leaves ``train`` without saving the step."""
    calls = itertools.count(1)

    def should_stop() -> bool:
        if next(calls) >= steps:
            raise Killed(steps)
        return False

    return should_stop


def final_params(result) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(result.checkpoint, "model.safetensors"))


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


def train_losses(result) -> list[tuple[int, float]]:
    return train_losses_of(result.output)


def train_losses_of(output: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(output, "metrics.jsonl"))
            if r["split"] == "train"]


@pytest.fixture(scope="module", params=[
    dict(optimizer="adamw", scheduler="linear"),
    dict(optimizer="adafactor", scheduler="cosine", warmup_steps=2)], ids=["adamw", "adafactor"])
def uninterrupted(request, dropout_policy, data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    return request.param, train(config(dropout_policy, data_dir, out, **request.param))


@pytest.mark.parametrize("stop_after", [3, 5])
def test_stop_and_resume_ends_with_the_same_parameters(uninterrupted, dropout_policy, data_dir,
                                                       tmp_path, stop_after):
    settings, full = uninterrupted
    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        train(config(dropout_policy, data_dir, out, **settings),
              should_stop=killed_after(stop_after))
    assert [s for s, _ in train_losses_of(out)] == list(range(1, stop_after + 1))
    # Killed after step 3 (5): the newest checkpoint is step 2 (4), so one step is redone.
    saved = load_trainer_state(list_checkpoints(out)[-1])["state"]
    assert saved["step"] == stop_after - 1
    resumed = train(config(dropout_policy, data_dir, out, resume=True, **settings))
    assert resumed.finished and resumed.steps == 7
    assert_same_params(final_params(resumed), final_params(full))
    # The metrics file reads as one run: every step once, with the same losses.
    assert [s for s, _ in train_losses(resumed)] == list(range(1, 8))
    assert [loss for _, loss in train_losses(resumed)] == pytest.approx(
        [loss for _, loss in train_losses(full)], abs=1e-6)


def test_resume_uses_the_saved_rng_state(uninterrupted, dropout_policy, data_dir, tmp_path):
    """Guards the test above: with another torch RNG state in the checkpoint, dropout draws
    differ and so do the final parameters."""
    settings, full = uninterrupted
    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        train(config(dropout_policy, data_dir, out, **settings), should_stop=killed_after(3))
    path = os.path.join(list_checkpoints(out)[-1], "trainer_state.pt")
    state = load_trainer_state(os.path.dirname(path))
    state["rng"]["torch"] = torch.Generator().manual_seed(99).get_state()
    torch.save(state, path)
    resumed = train(config(dropout_policy, data_dir, out, resume=True, **settings))
    a, b = final_params(resumed), final_params(full)
    assert any(not torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def _lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return f.read().count("\n")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_process_resumes_to_the_same_parameters(dropout_policy, data_dir, tmp_path, sig):
    """A real `python -m trainer.train` process is signalled once it has saved a checkpoint,
    then resumed: same final parameters as an uninterrupted run. SIGKILL may land mid-save;
    SIGTERM makes the trainer save the step it is on and exit with 143."""
    steps = 40
    settings = dict(max_steps=steps, save_every=1 if sig == signal.SIGKILL else 0,
                    keep_checkpoints=2)
    out = str(tmp_path / "killed")
    flags = ["--data", data_dir, "--policy", dropout_policy, "--output", out, "--lr", "1e-3",
             "--gamma", "0.5", "--batch-size", "2", "--grad-accum", "2", "--max-steps",
             str(steps), "--save-every", str(settings["save_every"]), "--keep-checkpoints", "2",
             "--shuffle-buffer", "4", "--bucket-batches", "2", "--no-progress",
             "--no-tensorboard", "--no-plots", "--num-threads", "1"]
    metrics = os.path.join(out, "metrics.jsonl")
    # once step 2 is done (and, for SIGKILL, saved)
    returncode, stderr = signalled(
        ["train", *flags], lambda: (len(list_checkpoints(out)) >= 2 if sig == signal.SIGKILL
                                    else _lines(metrics) >= 3), sig, "finished step 2")
    stopped_at = load_trainer_state(list_checkpoints(out)[-1])["state"]["step"]
    assert stopped_at < steps, "the process finished before it could be stopped"
    if sig == signal.SIGTERM:
        assert returncode == 143, stderr
        assert f"stopped at step {stopped_at}" in stderr
    resumed = train(config(dropout_policy, data_dir, out, resume=True, **settings))
    full = train(config(dropout_policy, data_dir, str(tmp_path / "full"), **settings))
    assert_same_params(final_params(resumed), final_params(full))


def test_existing_run_needs_resume_or_overwrite(dropout_policy, data_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    done = train(config(dropout_policy, data_dir, out, max_steps=2))
    with pytest.raises(ConfigError, match="pass --resume .* or --overwrite"):
        train(config(dropout_policy, data_dir, out, max_steps=2))
    with pytest.raises(ConfigError, match="setting\\(s\\) batch_size differ"):
        train(config(dropout_policy, data_dir, out, max_steps=2, batch_size=4, resume=True))
    files = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
             for d, _, names in os.walk(out) for f in names}
    with monkeypatch.context() as m:  # and it loads no model to find that out
        m.setattr("trainer.train.load_policy", lambda *a, **k: pytest.fail("model loaded"))
        again = train(config(dropout_policy, data_dir, out, max_steps=2, resume=True))
    assert again.steps == 2 and again.finished and again.checkpoint == done.checkpoint
    # a finished run resumed takes no step and leaves every file as it was (`rso demo` reruns
    # resume each finished training)
    assert {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(out) for f in names} == files
    fresh = train(config(dropout_policy, data_dir, out, max_steps=1, overwrite=True))
    assert fresh.steps == 1
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["checkpoint-00000001"]


def test_resume_without_checkpoint_starts_fresh_and_keeps_the_newest(dropout_policy, data_dir,
                                                                     tmp_path):
    out = str(tmp_path / "run")
    result = train(config(dropout_policy, data_dir, out, max_steps=5, save_every=1,
                          keep_checkpoints=2, resume=True))
    assert result.steps == 5
    assert [os.path.basename(c) for c in list_checkpoints(out)] == [
        "checkpoint-00000004", "checkpoint-00000005"]
    with open(os.path.join(result.checkpoint, "trainer_state.json")) as f:
        state = json.load(f)
    assert state["state"]["step"] == 5 and state["config"]["batch_size"] == 2
    # 5 steps of 2 micro-batches: epoch 0 (8 batches) done, 2 batches into epoch 1.
    assert (state["state"]["epoch"], state["state"]["batches_in_epoch"]) == (1, 2)


def _stopped_after_step_2(policy, data, out, **settings) -> None:
    """A 4-step run killed after step 2, with checkpoint-00000002 saved."""
    with pytest.raises(Killed):
        train(config(policy, data, out, max_steps=4, save_every=2, **settings),
              should_stop=killed_after(2))
    assert [os.path.basename(c) for c in list_checkpoints(out)] == ["checkpoint-00000002"]


def _final_run_info(result) -> dict:
    with open(os.path.join(result.checkpoint, "trainer_state.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name, new", [("lr", 3e-3), ("weight_decay", 0.25),
                                       ("max_grad_norm", 0.01), ("gamma", 0.1), ("loss", "ipo")])
def test_a_changed_setting_is_refused_or_applied_and_recorded(dropout_policy, data_dir,
                                                              tmp_path, name, new):
    out = str(tmp_path / "run")
    _stopped_after_step_2(dropout_policy, data_dir, out)
    old = getattr(config(dropout_policy, data_dir, out), name)
    changed = config(dropout_policy, data_dir, out, max_steps=4, save_every=2, resume=True,
                     **{name: new})
    with pytest.raises(ConfigError, match=rf"setting\(s\) {name} differ from the interrupted "
                                          rf"run's \({name}: {old} -> {new}\).*--allow-change "
                                          rf"{name} to apply the new values from step 2 on"):
        train(changed)
    # Applied from step 3 on; stopped (as by SIGTERM) after step 3, then resumed once more with
    # the new value, which is now the run's: the final checkpoint still records the change.
    stopped = train(changed.replace(allow_change=[name.replace("_", "-")]),
                    should_stop=lambda: True)
    assert stopped.steps == 3 and not stopped.finished
    resumed = train(changed)
    assert resumed.steps == 4 and resumed.finished
    info = _final_run_info(resumed)
    assert info["changes"] == [{"step": 2, "setting": name, "from": old, "to": new}]
    assert info["config"][name] == new
    # ... and the new value is the one in effect:
    group = load_trainer_state(resumed.checkpoint)["optimizer"]["param_groups"][0]
    logged = {s: r for s, r in [(r["step"], r) for r in read_metrics(resumed.metrics_path)
                                if r["split"] == "train"]}
    if name == "lr":
        from trainer.optim import lr_multiplier

        assert group["initial_lr"] == new
        assert logged[3]["lr"] == pytest.approx(new * lr_multiplier(2, 0, 4, "linear"))
        assert logged[2]["lr"] == pytest.approx(old * lr_multiplier(1, 0, 4, "linear"))
    if name == "weight_decay":
        assert group["weight_decay"] == new
    if name == "loss":  # ipo with gamma 0.5 starts at (1 / (2 * 0.5)) ** 2 = 1, log 2 before
        assert logged[2]["loss"] < 0.8 < logged[3]["loss"]


def test_fixed_settings_cannot_be_allowed_to_change(dropout_policy, data_dir, tmp_path):
    with pytest.raises(ConfigError, match="--allow-change: batch_size cannot change"):
        train(config(dropout_policy, data_dir, str(tmp_path / "r"), resume=True,
                     allow_change=["batch_size"]))
    with pytest.raises(ConfigError, match="--allow-change only applies with --resume"):
        train(config(dropout_policy, data_dir, str(tmp_path / "r"), allow_change=["lr"]))


def test_resume_compares_the_data_by_content_not_path(dropout_policy, data_dir, tmp_path):
    import shutil

    out = str(tmp_path / "run")
    _stopped_after_step_2(dropout_policy, data_dir, out)
    # Regenerated with another seed: no pair in common, same layout and file names.
    other = write_output_dir(str(tmp_path / "regenerated"),
                             build_pairs(dropout_policy, num_prompts=8, pairs_per_prompt=2,
                                         seed=1))
    with pytest.raises(ConfigError, match=r"setting\(s\) data differ .*content [0-9a-f]{12}\) "
                                          r"-> .*content [0-9a-f]{12}\)"):
        train(config(dropout_policy, other, out, max_steps=4, save_every=2, resume=True))
    # The same files under another path: the run continues exactly.
    moved = shutil.copytree(data_dir, str(tmp_path / "moved"))
    resumed = train(config(dropout_policy, moved, out, max_steps=4, save_every=2, resume=True))
    full = train(config(dropout_policy, data_dir, str(tmp_path / "full"), max_steps=4,
                        save_every=2))
    assert_same_params(final_params(resumed), final_params(full))
    info = _final_run_info(resumed)
    assert info["changes"] == [] and info["config"]["data"] == [moved]
    # Allowed explicitly, the new data is trained on and the change recorded.
    out2 = str(tmp_path / "run2")
    _stopped_after_step_2(dropout_policy, data_dir, out2)
    switched = train(config(dropout_policy, other, out2, max_steps=4, save_every=2,
                            resume=True, allow_change=["data"]))
    (change,) = _final_run_info(switched)["changes"]
    assert change["setting"] == "data" and change["step"] == 2 and other in change["to"]


DEMO_TRAINING = """
import sys
from rso_cli import cli, demo

def train(argv):
    return demo.train_in_child(argv)

cli.COMMANDS["demo"] = ("__main__:train", "")
sys.exit(cli.main(["demo", *sys.argv[1:]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_signal_to_the_demo_reaches_its_training_child(dropout_policy, data_dir, tmp_path,
                                                         sig, code, line):
    """`rso demo` trains in a child process; SIGTERM to the demo killed that child where it
    stood (no checkpoint, its _LOCK left), and so did SIGINT sent to the demo alone (`kill
    -INT`: a terminal's Ctrl-C reaches the whole process group, this does not). The demo now
    stops the child as SIGTERM does: the trainer saves the step it is on and stops, and the
    demo's rerun resumes there."""
    out = str(tmp_path / "policy")
    flags = ["--data", data_dir, "--policy", dropout_policy, "--output", out, "--lr", "1e-3",
             "--batch-size", "2", "--max-steps", "1000000", "--no-progress",
             "--no-tensorboard", "--no-plots", "--num-threads", "1"]
    returncode, stderr = signalled(flags, lambda: _lines(os.path.join(out, "metrics.jsonl")) >= 3,
                                   sig, "finished two steps", python=("-c", DEMO_TRAINING))
    assert returncode == code, stderr
    assert re.search(r"stopped at step (\d+)", stderr), stderr  # the child saved its step
    assert stderr.rstrip().endswith(f"rso demo: {line}"), stderr
    assert load_trainer_state(list_checkpoints(out)[-1])["state"]["step"] >= 2
    assert not os.path.exists(os.path.join(out, "_LOCK"))


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_leaves_a_resumable_run(dropout_policy, data_dir, tmp_path):
    """Ctrl-C (SIGINT) on `rso train` printed a KeyboardInterrupt traceback (two under `rso
    demo`, whose training child gets the signal too): now one line, exit 130, and the saved
    checkpoints stay loadable for --resume."""
    out = str(tmp_path / "interrupted")
    flags = ["--data", data_dir, "--policy", dropout_policy, "--output", out, "--lr", "1e-3",
             "--batch-size", "2", "--max-steps", "1000000", "--save-every", "1",
             "--keep-checkpoints", "2", "--no-progress", "--no-tensorboard", "--no-plots",
             "--num-threads", "1"]
    returncode, stderr = signalled(["train", *flags], lambda: len(list_checkpoints(out)) >= 2,
                                   signal.SIGINT, "saved two checkpoints")
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.rstrip().endswith("rso train: interrupted"), stderr
    assert load_trainer_state(list_checkpoints(out)[-1])["state"]["step"] >= 1
