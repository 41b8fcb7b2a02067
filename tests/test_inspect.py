"""`rso inspect`: on real tiny pipeline runs (transformers engine, DirectRunner) it writes every
file it documents, its numbers agree with the records and dead letters, it handles best-of-n
outputs, and it refuses an incomplete directory."""
from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import shutil

import pyarrow.parquet as pq
import pytest

from beam_pipelines.pipeline import main as generate
from rso import stats
from rso_cli import inspect_output as I
from rso_cli.cli import main as rso
from tests.test_pipeline_e2e import (
    BAD_LINES,
    _args,
    inputs,  # noqa: F401 - a fixture
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTED = re.compile(r"\binspect(?:_[a-z_]+)?\.(?:png|json)\b")


@pytest.fixture(scope="module")
def rso_run(tiny_policy, tiny_reward_model, inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rso") / "out")
    assert generate(_args(inputs, out, tiny_policy, tiny_reward_model,
                          "--engine", "transformers")) == 0
    return out


@pytest.fixture(scope="module")
def best_of_n_run(tiny_policy, tiny_reward_model, inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bon") / "out")
    assert generate(_args(inputs, out, tiny_policy, tiny_reward_model, "--engine",
                          "transformers", "--selection", "best-of-n")) == 0
    return out


def documented_files() -> set[str]:
    """The file names the module docstring and the README's `rso inspect` section list."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Inspect a run", 1)[1].split("\n## ", 1)[0]
    names = set(DOCUMENTED.findall(I.__doc__)) | set(DOCUMENTED.findall(section))
    assert names == set(I.WRITTEN_FILES), names ^ set(I.WRITTEN_FILES)
    return names


@pytest.mark.slow
def test_writes_every_documented_file_and_agrees_with_the_records(rso_run, tmp_path, capsys):
    plots = str(tmp_path / "plots")
    assert rso(["inspect", rso_run, "--plots", plots]) == 0
    for name in documented_files():
        path = os.path.join(plots, name)
        data = open(path, "rb").read()
        assert data.startswith(b"\x89PNG" if name.endswith(".png") else b"{"), name
    summary = json.load(open(os.path.join(plots, I.SUMMARY_FILE)))
    manifest = json.load(open(os.path.join(rso_run, "manifest.json")))
    (path,) = glob.glob(os.path.join(rso_run, "pairs-*.parquet"))
    rows = pq.read_table(path).to_pylist()

    assert summary["records"] == "pairs" and summary["selection"] == "rso"
    assert summary["rewards"]["chosen"]["count"] == len(rows) == manifest["counters"]["pairs"]
    assert summary["rewards"]["candidate"]["mean"] == manifest["reward_statistics"][
        "candidate"]["mean"]
    assert summary["reward_gain"]["accepted_minus_candidate"] == pytest.approx(
        manifest["reward_statistics"]["accepted"]["mean"]
        - manifest["reward_statistics"]["candidate"]["mean"])
    margins = [r["chosen_reward"] - r["rejected_reward"] for r in rows]
    assert summary["margins"]["mean"] == pytest.approx(sum(margins) / len(margins))
    longer = sum(len(r["chosen_token_ids"]) > len(r["rejected_token_ids"]) for r in rows)
    bias = summary["length_bias"]["chosen_longer"]
    assert (bias["count"], bias["n"]) == (longer, len(rows))
    assert bias["ci95"] == pytest.approx(list(stats.wilson_interval(longer, len(rows))))
    # Dead letters counted from the files, by reason, agree with the manifest.
    reasons = set(BAD_LINES.values()) - {"non_finite_reward"}
    assert reasons <= set(summary["dead_letters"]["by_reason"])
    assert summary["dead_letters"]["by_reason"] == manifest["dead_letters"]["by_reason"]
    console = capsys.readouterr().out
    assert "length bias: chosen longer in" in console and "prompt_too_long: 1" in console
    # The run's cost section, shown as one line per stage (rso.cost.format_lines).
    assert summary["cost"] == manifest["cost"]
    assert summary["cost"]["pairs"] == len(rows)
    stage_lines = [ln.split()[0] for ln in console.split("cost (busy", 1)[1].splitlines()[2:]]
    assert stage_lines[:len(manifest["cost"]["stages"])] == [
        "read", "render", "generate", "reward", "select", "records", "write"]
    assert "reward model 0 (pointwise): 6.00 sequences per prompt (expected 6)" in console
    assert "no --price-per-hour: resources only" in console
    d = manifest["accounting"]["decoding"]
    assert (f"decoding: decoded {d['prompts_decoded']} prompts ({d['candidates_decoded']} "
            f"candidates, {d['tokens_decoded']} tokens), reused 0 prompts") in console
    assert '"histogram"' not in console and '"edges"' not in console  # numbers, not blobs
    # Without --plots the files go into the output directory itself.
    assert I.main([rso_run]) == 0
    assert all(os.path.exists(os.path.join(rso_run, n)) for n in I.WRITTEN_FILES)


@pytest.mark.slow
def test_best_of_n_output(best_of_n_run, tmp_path):
    plots = str(tmp_path / "plots")
    assert I.main([best_of_n_run, "--plots", plots]) == 0
    assert sorted(os.listdir(plots)) == sorted(I.WRITTEN_FILES)
    summary = json.load(open(os.path.join(plots, I.SUMMARY_FILE)))
    (path,) = glob.glob(os.path.join(best_of_n_run, "sft-*.parquet"))
    rows = pq.read_table(path).to_pylist()
    assert summary["records"] == "sft" and summary["selection"] == "best-of-n"
    assert summary["rewards"]["completion"]["count"] == len(rows) == 5  # one per valid prompt
    assert summary["rewards"]["completion"]["max"] == max(r["reward"] for r in rows)
    assert "margins" not in summary and "length_bias" not in summary
    assert summary["cost"]["pairs_unit"] == "sft_targets"
    assert summary["cost"]["pairs"] == len(rows)
    # Each completion is one of the candidates the manifest summarises.
    cand = summary["rewards"]["candidate"]
    assert cand["min"] <= min(r["reward"] for r in rows) <= max(r["reward"] for r in rows) \
        <= cand["max"]


@pytest.mark.slow
def test_a_manifest_without_a_cost_section(rso_run, tmp_path, capsys):
    """Runs written before the cost section existed are still inspected."""
    old = str(tmp_path / "old")
    shutil.copytree(rso_run, old)
    path = os.path.join(old, "manifest.json")
    manifest = json.load(open(path))
    del manifest["cost"]
    json.dump(manifest, open(path, "w"))
    assert I.main([old, "--plots", str(tmp_path / "plots")]) == 0
    assert "cost: not in this manifest" in capsys.readouterr().out


def test_refuses_an_incomplete_directory(tmp_path, capsys):
    out = tmp_path / "partial"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert rso(["inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "_SUCCESS" in err
    assert not any(n.startswith("inspect") for n in os.listdir(out))
    # an `rso evaluate` output: the error names the two runs inside it
    policy = out / "generations" / "policy"
    policy.mkdir(parents=True)
    (policy / "_SUCCESS").write_text("")
    assert rso(["inspect", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"rso inspect: error: {out} is an `rso evaluate` output, not a pipeline run: "
        f"inspect {policy} or {out}/generations/baseline")


@pytest.mark.slow
def test_refuses_a_run_whose_success_marker_was_removed(rso_run, tmp_path, capsys):
    copy = str(tmp_path / "copy")
    shutil.copytree(rso_run, copy)
    os.remove(os.path.join(copy, "_SUCCESS"))
    assert I.main([copy]) == 2
    assert "not a complete pipeline output" in capsys.readouterr().err
@pytest.mark.slow
def test_length_bias_line_when_every_pair_has_equal_lengths(rso_run):
    """Responses cut at max_new_tokens all have one length: the summary says so instead of an
    empty interval."""
    summary, _ = I.summarize_output(rso_run)
    summary["length_bias"]["chosen_longer"] = stats.proportion(0, 5)
    summary["length_bias"]["chosen_longer_among_unequal"] = stats.proportion(0, 0)
    text = I.format_summary(summary)
    assert "length bias: none measurable: in all 5 pairs both responses have the same length" \
        in text
    assert "---" not in text and "among the 0 pairs" not in text and "0/5" not in text


@pytest.mark.slow
def test_says_when_dead_letter_files_disagree_with_the_manifest(rso_run, tmp_path, capsys):
    """The run's inputs include broken lines (dead letters); deleting their files afterwards
    must not pass silently."""
    copy = str(tmp_path / "copy")
    shutil.copytree(rso_run, copy)
    summary, _ = I.summarize_output(copy)
    assert summary["dead_letters"]["total"] == summary["dead_letters"]["manifest_total"] > 0
    assert "WARNING" not in I.format_summary(summary)
    for name in os.listdir(copy):
        if name.startswith("dead_letter"):
            os.remove(os.path.join(copy, name))
    summary, _ = I.summarize_output(copy)
    assert "WARNING: the manifest counts" in I.format_summary(summary)


def test_refuses_a_finished_marker_without_a_pipeline_manifest(tmp_path, capsys):
    out = tmp_path / "odd"
    out.mkdir()
    (out / "_SUCCESS").write_text("")
    assert rso(["inspect", str(out)]) == 2
    assert "has _SUCCESS but no manifest.json" in capsys.readouterr().err
    (out / "manifest.json").write_text("{}")
    assert rso(["inspect", str(out)]) == 2
    assert "not a pipeline run's manifest" in capsys.readouterr().err
    assert not any(n.startswith("inspect") for n in os.listdir(out))
