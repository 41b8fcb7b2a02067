"""The training loop on pairs sampled from the tiny policy: overfitting, step 0, input formats,
gradient accumulation, reference handling and failures."""
from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.pair_data import build_pairs, write_output_dir
from trainer.config import TrainConfig
from trainer.metrics import read_metrics
from trainer.reference import CACHE_FILE, ReferenceMismatchError
from trainer.train import NonFiniteLossError, train


@pytest.fixture(scope="module")
def records(tiny_policy):
    return build_pairs(tiny_policy, num_prompts=8, pairs_per_prompt=2)


@pytest.fixture(scope="module")
def data_dir(records, tmp_path_factory):
    return write_output_dir(str(tmp_path_factory.mktemp("pairs")), records)


def config(policy: str, data: str, output: str, **overrides) -> TrainConfig:
    """Small, fast settings: lr and gamma large enough for a 2-layer model to move quickly."""
    values = dict(data=[data], policy=policy, output=output, lr=1e-3, gamma=0.5, batch_size=4,
                  max_steps=3, progress=False, tensorboard=False, plots=False)
    values.update(overrides)
    return TrainConfig(**values)


def train_records(result) -> list[dict]:
    return [r for r in read_metrics(result.metrics_path) if r["split"] == "train"]


def params(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(checkpoint, "model.safetensors"))


@pytest.fixture(scope="module")
def overfit(tiny_policy, records, tmp_path_factory):
    """Four pairs, 16 steps, with evaluation, TensorBoard and plots on."""
    tmp = tmp_path_factory.mktemp("overfit")
    few = write_output_dir(str(tmp / "data"), records[:4], num_shards=1)
    cfg = config(tiny_policy, few, str(tmp / "run"), max_steps=16, scheduler="constant",
                 eval_data=[few], eval_every=8, tensorboard=True, plots=True)
    return train(cfg)


def test_step_zero_is_log2_with_a_tiny_reference_gap(overfit):
    metrics = read_metrics(overfit.metrics_path)
    gap = next(r for r in metrics if r["split"] == "reference")
    assert gap["sequences"] == 8 and gap["gap_max"] < 1e-3
    first = train_records(overfit)[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2.0), abs=1e-4)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-3)


def test_a_few_pairs_overfit(overfit):
    train_metrics = train_records(overfit)
    assert len(train_metrics) == 16 and overfit.finished
    assert train_metrics[-1]["loss"] < 0.3 * train_metrics[0]["loss"]
    assert train_metrics[-1]["accuracy"] == 1.0
    assert overfit.eval["accuracy"] == 1.0 and overfit.eval["pairs"] == 4
    assert train_metrics[-1]["reward_chosen"] > train_metrics[-1]["reward_rejected"]


def test_metrics_hold_what_the_benchmark_reads(overfit):
    last = train_records(overfit)[-1]
    for name in ("loss", "accuracy", "reward_margin", "reward_chosen", "reward_rejected",
                 "logp_chosen", "logp_rejected", "grad_norm", "lr", "pairs", "tokens",
                 "pairs_per_s", "tokens_per_s", "peak_rss_gib", "padding", "epoch"):
        assert name in last and math.isfinite(last[name]), name
    summary = read_metrics(overfit.metrics_path)[-1]
    assert summary["split"] == "summary" and summary["steps"] == 16
    assert summary["pairs"] == 64 and summary["pairs_per_s"] > 0 and summary["peak_rss_gib"] > 0


def test_outputs_plots_tensorboard_and_safetensors_checkpoint(overfit):
    plots = os.listdir(os.path.join(overfit.output, "plots"))
    assert {"loss.png", "accuracy.png", "rewards.png", "lr.png"} <= set(plots)
    with open(os.path.join(overfit.output, "plots", "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = os.listdir(os.path.join(overfit.output, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)
    files = os.listdir(overfit.checkpoint)
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"trainer_state.pt", "trainer_state.json", "tokenizer.json", "config.json"} <= set(files)


def test_parquet_and_tfrecord_give_the_same_losses(tiny_policy, data_dir, tmp_path):
    runs = {fmt: train(config(tiny_policy, data_dir, str(tmp_path / fmt), data_format=fmt))
            for fmt in ("parquet", "tfrecord")}
    a, b = (train_records(runs[fmt]) for fmt in ("parquet", "tfrecord"))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    assert [r["pairs"] for r in a] == [r["pairs"] for r in b]
    pa, pb = params(runs["parquet"].checkpoint), params(runs["tfrecord"].checkpoint)
    assert all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)


def test_grad_accum_and_checkpointing_match_one_big_batch(tiny_policy, data_dir, tmp_path):
    """4 pairs in one micro-batch == 2 micro-batches of 2 (no shuffling or bucketing, so the
    same pairs land in the same step); gradient checkpointing changes nothing either."""
    same_order = dict(shuffle_buffer=1, bucket_batches=1, max_steps=2)
    big = train(config(tiny_policy, data_dir, str(tmp_path / "big"), **same_order))
    accum = train(config(tiny_policy, data_dir, str(tmp_path / "accum"), batch_size=2,
                         grad_accum=2, gradient_checkpointing=True, **same_order))
    assert [r["loss"] for r in train_records(big)] == pytest.approx(
        [r["loss"] for r in train_records(accum)], abs=1e-5)
    pa, pb = params(big.checkpoint), params(accum.checkpoint)
    assert all(torch.allclose(pa[k], pb[k], atol=1e-5) for k in pa)


@pytest.mark.parametrize("loss", ["hinge-norm", "hinge", "ipo"])
def test_other_losses_train(tiny_policy, data_dir, tmp_path, loss):
    result = train(config(tiny_policy, data_dir, str(tmp_path / loss), loss=loss,
                          optimizer="adafactor", max_steps=2))
    first = train_records(result)[0]["loss"]
    expected = {"hinge-norm": 1.0, "ipo": (1 / (2 * 0.5)) ** 2}.get(loss)
    if expected is not None:  # at step 0, d_w = d_l = 0
        assert first == pytest.approx(expected, abs=1e-3)
    assert all(math.isfinite(r["loss"]) for r in train_records(result))


def test_bf16_autocast_on_cpu_is_opt_in(tiny_policy, data_dir, tmp_path):
    result = train(config(tiny_policy, data_dir, str(tmp_path / "bf16"), precision="bf16",
                          max_steps=1))
    metrics = read_metrics(result.metrics_path)
    # The reference check runs in fp32 whatever the training precision.
    assert next(r for r in metrics if r["split"] == "reference")["gap_max"] < 1e-3
    loss = train_records(result)[0]["loss"]
    assert math.isfinite(loss) and loss != math.log(2.0)  # bf16 log-probs are not exact


def _shifted(records, shift):
    return [dict(r, ref_chosen_logps=r["ref_chosen_logps"] + shift) for r in records]


def test_foreign_reference_warns_stops_or_is_recomputed(tiny_policy, records, tmp_path, caplog):
    foreign = write_output_dir(str(tmp_path / "foreign"), _shifted(records, -0.7))
    with caplog.at_level(logging.WARNING, logger="rso.trainer"):
        result = train(config(tiny_policy, foreign, str(tmp_path / "warn"), max_steps=1))
    assert "another model, tokenizer or precision" in caplog.text
    assert train_records(result)[0]["loss"] != pytest.approx(math.log(2.0), abs=1e-3)

    with pytest.raises(ReferenceMismatchError, match="up to 0.7"):
        train(config(tiny_policy, foreign, str(tmp_path / "strict"), strict_reference=True))

    recomputed = train(config(tiny_policy, foreign, str(tmp_path / "recompute"),
                              recompute_reference=True, max_steps=1))
    assert os.path.exists(os.path.join(recomputed.output, CACHE_FILE))
    assert train_records(recomputed)[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)


def test_recompute_reference_accepts_missing_reference(tiny_policy, records, tmp_path):
    broken = write_output_dir(str(tmp_path / "nan"),
                              [dict(r, ref_rejected_logps=math.nan) for r in records])
    result = train(config(tiny_policy, broken, str(tmp_path / "run"), recompute_reference=True,
                          max_steps=1))
    assert train_records(result)[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)


def test_non_finite_loss_names_step_and_prompts(tiny_policy, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    with torch.no_grad():
        model.lm_head.weight[7, 0] = math.nan
    diverged = str(tmp_path / "nan_policy")
    model.save_pretrained(diverged)
    AutoTokenizer.from_pretrained(tiny_policy).save_pretrained(diverged)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 1; pairs: prompt_id "
                                                 r"[0-9a-f]{64} \(.*pairs-0000\d-of-00002\."
                                                 r"parquet: row \d+\)"):
        train(config(diverged, data_dir, str(tmp_path / "r")))


def test_eval_split_and_max_length(tiny_policy, data_dir, records, tmp_path, caplog):
    from trainer.data import in_eval_split

    def length(r):
        return len(r["prompt_token_ids"]) + max(len(r["chosen_token_ids"]),
                                                len(r["rejected_token_ids"]))

    limit = sorted({length(r) for r in records})[-2]  # skips the longest pairs
    held = [r for r in records if in_eval_split(r["prompt_id"], 0.3) and length(r) <= limit]
    trained = [r for r in records if not in_eval_split(r["prompt_id"], 0.3) and
               length(r) <= limit]
    assert held and trained and len(held) + len(trained) < len(records)
    with caplog.at_level(logging.WARNING, logger="rso.trainer"):
        result = train(config(tiny_policy, data_dir, str(tmp_path / "run"), eval_fraction=0.3,
                              max_length=limit, batch_size=2, max_steps=None, epochs=1))
    assert "skipping" in caplog.text
    assert result.eval["pairs"] == len(held)
    assert result.summary["pairs"] == len(trained)
    assert result.steps == math.ceil(len(trained) / 2)


def test_log_lines_during_the_progress_bar_get_their_own_lines(capsys):
    """A log line written while the bar is shown goes above the bar, not into its line; the
    console's handlers are restored when the bar closes."""
    import sys

    from trainer.metrics import Progress

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    before = list(root.handlers)
    root.addHandler(handler)
    try:
        progress = Progress(total=2, initial=0, enabled=True)
        progress.update({"loss": 0.69, "accuracy": 0.5, "pairs_per_s": 1.0})
        logging.getLogger("trainer.test").warning("REFERENCE-CHECK-LINE")
        progress.update({"loss": 0.68, "accuracy": 0.5, "pairs_per_s": 1.0})
        progress.close()
        assert root.handlers == before + [handler]
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    lines = [part for line in err.splitlines() for part in line.split("\r")]
    assert "trainer.test: REFERENCE-CHECK-LINE" in lines  # a line of its own
