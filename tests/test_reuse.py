"""Incremental runs (--reuse-candidates ROOT): only prompts no earlier partition stored are
decoded; tiny models, the in-process portable runner, real Parquet stores."""
from __future__ import annotations

import glob
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from beam_pipelines.pipeline import main as generate
from tests.test_pipeline_e2e import VALID
from tests.test_select import GENERATION, SELECTION, manifest, records

OLD, NEW = VALID[:2], VALID[2:]


def write_prompts(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def store_rows(out: str) -> list[dict]:
    return [r for f in sorted(glob.glob(os.path.join(out, "candidates-*.parquet")))
            for r in pq.read_table(f).to_pylist()]


def decoding(out: str) -> dict:
    return manifest(out)["accounting"]["decoding"]


def without_run_id(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "run_id"} for r in rows]


@pytest.fixture(scope="module")
def nights(tiny_policy, tiny_reward_model, tmp_path_factory):
    """Two nights under one root: night 1 reads 2 prompts, night 2 the same 2 and 2 new ones.
    An incomplete partition (a failed night: a store, no _SUCCESS) lies between them."""
    base = tmp_path_factory.mktemp("nights")
    root = base / "root"
    small = write_prompts(base / "small.jsonl", OLD)
    grown = write_prompts(base / "grown.jsonl", OLD + NEW)
    common = ["--policy", tiny_policy, "--reward-model", tiny_reward_model,
              "--reuse-candidates", str(root), *GENERATION, *SELECTION]
    night1 = str(root / "dt=2025-01-01")
    assert generate(["--input", small, "--output", night1, *common]) == 0
    failed = root / "dt=2025-01-02"
    failed.mkdir()
    for f in glob.glob(os.path.join(night1, "candidates-*.parquet")):
        shutil.copy(f, failed)  # no manifest, no _SUCCESS: ignored
    night2 = str(root / "dt=2025-01-03")
    assert generate(["--input", grown, "--output", night2, *common]) == 0
    return {"root": str(root), "night1": night1, "night2": night2, "small": small,
            "grown": grown, "common": common, "base": base}


def test_the_second_night_decodes_only_new_prompts(nights):
    first, second = decoding(nights["night1"]), decoding(nights["night2"])
    assert (first["prompts_decoded"], first["prompts_reused"]) == (len(OLD), 0)
    assert (second["prompts_decoded"], second["prompts_reused"]) == (len(NEW), len(OLD))
    stored2 = store_rows(nights["night2"])
    # tokens and candidates decoded tonight are exactly what tonight's store holds
    assert second["tokens_decoded"] == sum(len(r["response_token_ids"]) for r in stored2)
    assert second["candidates_decoded"] == len(stored2)
    assert second["candidates_reused"] == len(store_rows(nights["night1"])) > 0
    reuse = manifest(nights["night2"])["reuse"]
    assert [(p["path"].rstrip("/").rsplit("/", 1)[-1], p["prompts_reused"])
            for p in reuse["reused_from"]] == [("dt=2025-01-01", len(OLD))]
    assert reuse["reused_from"][0]["run_id"] == manifest(nights["night1"])["run_id"]
    assert manifest(nights["night2"])["accounting"]["balanced"] is True
    # reuse writes a store whatever --write-candidates said: the manifest says what was done
    assert manifest(nights["night2"])["config"]["write_candidates"] is True


def test_the_union_of_the_stores_holds_each_prompt_once(nights):
    ids = []
    for night in ("night1", "night2"):
        ids += sorted({r["prompt_id"] for r in store_rows(nights[night])})
    assert len(ids) == len(set(ids)) == len(OLD) + len(NEW)


def test_records_of_reused_prompts_equal_the_first_nights(nights):
    old_ids = {r["prompt_id"] for r in store_rows(nights["night1"])}
    first = records(nights["night1"])
    second = [r for r in records(nights["night2"]) if r["prompt_id"] in old_ids]
    assert first and without_run_id(second) == without_run_id(first)
    # the pairs cover the whole prompt file of the night
    assert {r["prompt_id"] for r in records(nights["night2"])} > old_ids


def test_a_changed_reward_model_rescores_without_decoding(nights, tiny_policy,
                                                           tiny_reward_model, tmp_path):
    out = str(tmp_path / "reweighted")
    assert generate(["--input", nights["grown"], "--output", out, "--policy", tiny_policy,
                     "--reward-model", f"{tiny_reward_model},weight=2",
                     "--reuse-candidates", nights["root"], *GENERATION, *SELECTION]) == 0
    d = decoding(out)
    assert (d["tokens_decoded"], d["prompts_decoded"], d["prompts_reused"]) == \
        (0, 0, len(OLD) + len(NEW))
    before = {(r["prompt_id"], r["candidate_index"]): r["reward"]
              for n in ("night1", "night2") for r in store_rows(nights[n])}
    after = store_rows(out)  # the re-scored candidates, with the new reward model id
    assert len(after) == len(before)
    assert all("*2" in r["reward_model"] for r in after)
    for r in after:
        assert r["reward"] == pytest.approx(2 * before[(r["prompt_id"], r["candidate_index"])],
                                            rel=1e-5)
    assert all(p["rescored"] for p in manifest(out)["reuse"]["reused_from"])


@pytest.mark.parametrize("change", ["sampling", "policy"])
def test_other_sampling_or_policy_reuses_nothing(nights, tiny_policy, tmp_path, change):
    argv = list(nights["common"])
    if change == "sampling":
        argv[argv.index("--max-new-tokens") + 1] = "6"
        reason = "other sampling parameters"
    else:
        policy = tmp_path / "policy-copy"
        shutil.copytree(tiny_policy, policy)
        cfg = json.loads((policy / "config.json").read_text())
        (policy / "config.json").write_text(json.dumps({**cfg, "rso_test_note": 1}))
        argv[argv.index("--policy") + 1] = str(policy)
        reason = "another policy"
    out = str(tmp_path / "other")
    assert generate(["--input", nights["grown"], "--output", out, *argv]) == 0
    d = decoding(out)
    assert (d["prompts_reused"], d["prompts_decoded"]) == (0, len(OLD) + len(NEW))
    assert d["tokens_decoded"] > 0
    reuse = manifest(out)["reuse"]
    assert reuse["reused_from"] == [] and reuse["considered"] == 0
    assert {s["reason"] for s in reuse["skipped"]} == {reason}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_corrupt_partition_is_a_clear_error(nights, tmp_path, capsys, damage):
    """A truncated store file, or a deleted one (which would silently decode its prompts
    again), stops the run at start naming the file."""
    root = tmp_path / "root"
    shutil.copytree(nights["night1"], root / "dt=2025-01-01")
    (store,) = glob.glob(str(root / "dt=2025-01-01" / "candidates-*.parquet"))
    if damage == "delete":
        os.remove(store)
    else:
        with open(store, "r+b") as f:
            f.truncate(os.path.getsize(store) // 2)
    argv = list(nights["common"])
    argv[argv.index("--reuse-candidates") + 1] = str(root)
    out = str(root / "dt=2025-01-02")
    assert generate(["--input", nights["grown"], "--output", out, *argv]) == 2
    err = capsys.readouterr().err
    assert "--reuse-candidates" in err and os.path.basename(store) in err
    assert ("corrupt" if damage == "truncate" else "missing") in err
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))


def test_reuse_refuses_its_own_root_and_candidates(nights, tmp_path, capsys):
    assert generate(["--input", nights["grown"], "--output", nights["root"],
                     *nights["common"]]) == 2
    assert "subdirectory" in capsys.readouterr().err
    assert generate(["--candidates", nights["night1"], "--output", str(tmp_path / "x"),
                     *nights["common"]]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_the_reuse_keys_of_the_manifest_are_documented(nights):
    import pathlib

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "MANIFEST.md").read_text()
    m = manifest(nights["night2"])
    keys = [*m["reuse"], *m["reuse"]["reused_from"][0], *m["accounting"]["decoding"]]
    assert not [k for k in keys if f"`{k}`" not in doc]


def test_a_reuse_root_that_is_a_file_or_a_partition_is_refused(nights, tmp_path, capsys):
    """A wrong --reuse-candidates would silently reuse nothing: refused at start, one line."""
    argv = list(nights["common"])
    at = argv.index("--reuse-candidates") + 1
    afile = tmp_path / "root.txt"
    afile.write_text("")
    for root, message in ((str(afile), "is a file"),
                          (nights["night1"], "give the root that holds the dt= partitions")):
        argv[at] = root
        out = tmp_path / "out"
        assert generate(["--input", nights["grown"], "--output", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_an_output_outside_the_reuse_root_is_warned_about(nights, tmp_path, caplog):
    """Reading a root whose name holds glob characters works (escaped); an --output that is not
    directly under the root is warned about, and a missing root is only the first night's
    case when --output is under it."""
    root = tmp_path / "nightly[1]"
    shutil.copytree(nights["night1"], root / "dt=2025-01-01")
    argv = list(nights["common"])
    at = argv.index("--reuse-candidates") + 1
    argv[at] = str(root)
    out = str(tmp_path / "elsewhere")
    with caplog.at_level("INFO"):
        assert generate(["--input", nights["grown"], "--output", out, *argv]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("not directly under it" in w for w in warnings)
    assert (decoding(out)["prompts_reused"], decoding(out)["prompts_decoded"]) == (
        len(OLD), len(NEW))
    from beam_pipelines.config import GenerateConfig
    from beam_pipelines.reuse import find_partitions

    caplog.clear()
    missing = str(tmp_path / "missing")
    for output, level in ((str(tmp_path / "missing" / "dt=2025-01-01"), "INFO"),
                          (str(tmp_path / "other"), "WARNING")):
        config = GenerateConfig(input=nights["grown"], output=output, policy="p",
                                reuse_candidates=missing)
        with caplog.at_level("INFO"):
            assert find_partitions(config) == ([], [])
        (record,) = [r for r in caplog.records if "does not exist" in r.getMessage()]
        assert record.levelname == level
        caplog.clear()


def test_select_on_an_incremental_store_warns_that_it_holds_part_of_the_night(
        nights, tiny_policy, tmp_path, caplog):
    from beam_pipelines.pipeline import select_main

    warned = {}
    for night in ("night2", "night1"):
        caplog.clear()
        with caplog.at_level("INFO"):
            assert select_main(["--candidates", nights[night], "--output",
                                str(tmp_path / night), "--policy", tiny_policy]) == 0
        warned[night] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                         and "incremental run" in r.getMessage()]
    assert warned["night1"] == []  # decoded everything it read: nothing to warn about
    (text,) = warned["night2"]
    assert "dt=2025-01-01" in text and f"--reuse-candidates {nights['root']}" in text
    assert {r["prompt_id"] for r in records(str(tmp_path / "night2"))} == {
        r["prompt_id"] for r in store_rows(nights["night2"])}  # what the warning says
