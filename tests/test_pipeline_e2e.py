"""The whole pipeline on the DirectRunner with real engines and tiny models built offline.

Output is read back with pyarrow, Hugging Face `datasets`, our TFRecord reader and TensorFlow's,
and checked field by field against SPEC 5; bad inputs must land in the dead letters with their
reason while valid prompts still produce pairs.
"""
from __future__ import annotations

import glob
import json
import math
import os

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from beam_pipelines.pipeline import main as generate
from rso import schema, tfrecord
from tests.tensorflow_check import read_with_tensorflow

VALID = [
    {"prompt_id": "bread", "prompt": "How do I bake bread?"},
    {"prompt_id": "paris", "messages": [{"role": "user", "content": "What is the capital of "
                                                                    "France?"}]},
    {"prompt": "Tell me a joke."},
    {"prompt_id": "poem", "messages": [
        {"role": "user", "content": "Write a short poem about the sea."},
        {"role": "assistant", "content": "The sea is wide."},
        {"role": "user", "content": "Make it longer."}]},
]
POISON_WORD = "picture"  # the poisoned reward model returns NaN for any text containing it


def _write_inputs(path: str, extra_lines: list[bytes] = ()) -> None:
    with open(path, "wb") as f:
        for rec in VALID:
            f.write(json.dumps(rec).encode() + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")


BAD_LINES = {
    b'{"prompt": "unterminated': "invalid_json",
    b'{"text": "no prompt field"}': "missing_prompt",
    b'{"prompt_id": "empty", "prompt": "   "}': "empty_prompt",
    b'{"prompt_id": "bytes", "prompt": "caf\xe9"}': "undecodable",
    b'{"prompt_id": "long", "prompt": "' + b" ".join([b"water"] * 400) + b'"}':
        "prompt_too_long",
    b'{"prompt_id": "nan", "prompt": "Draw a ' + POISON_WORD.encode() + b' of a house"}':
        "non_finite_reward",
}


def _args(inputs, out, policy, rm, *extra):
    return ["--input", inputs, "--output", out, "--policy", policy, "--reward-model", rm,
            "--num-candidates", "6", "--num-samples", "4", "--max-new-tokens", "10",
            "--seed", "7", *extra]


def key(r: dict) -> tuple:
    """Identifies a pair record."""
    return r["prompt_id"], tuple(r["chosen_token_ids"]), tuple(r["rejected_token_ids"])


def _pairs(out: str) -> list[dict]:
    (path,) = glob.glob(os.path.join(out, "pairs-*.parquet"))
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("in") / "prompts.jsonl")
    _write_inputs(path, list(BAD_LINES))
    return path


@pytest.fixture(scope="module")
def poisoned_rm(tiny_reward_model, tmp_path_factory):
    """The tiny reward model with the embedding of POISON_WORD set to NaN."""
    import shutil

    from transformers import AutoTokenizer

    out = str(tmp_path_factory.mktemp("poisoned_rm"))
    shutil.copytree(tiny_reward_model, out, dirs_exist_ok=True)
    weights = load_file(os.path.join(out, "model.safetensors"))
    token = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(POISON_WORD)
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def vllm_run(tiny_policy, poisoned_rm, inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vllm") / "out")
    # bf16 explicitly: "auto" is float32 on CPUs without native bf16, and this run tests the
    # reduced-precision generation + fp32 re-scoring path
    assert generate(_args(inputs, out, tiny_policy, poisoned_rm, "--engine", "vllm",
                          "--dtype", "bfloat16", "--enforce-eager")) == 0
    return out


@pytest.fixture(scope="module")
def transformers_run(tiny_policy, poisoned_rm, inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "out")
    assert generate(_args(inputs, out, tiny_policy, poisoned_rm, "--engine", "transformers")) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", ["vllm_run", "transformers_run"])
def test_output_directory_follows_spec5(run, request, tiny_policy):
    out = request.getfixturevalue(run)
    names = sorted(os.listdir(out))
    assert "_SUCCESS" in names and "manifest.json" in names
    mtime = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in names}
    assert mtime["_SUCCESS"] >= max(mtime.values())  # written last (coarse clocks may tie)
    assert any(n.endswith(".png") for n in names)

    rows = _pairs(out)
    # The 4 valid prompts and none of the bad ones; k=4 kept of up to 6 (a candidate that
    # happens to contain the poisoned word is dropped), first-round: k//2 pairs each.
    assert {r["prompt_id"] for r in rows} == {"bread", "paris", "poem",
                                             schema_prompt_id("Tell me a joke.")}
    for pid in {r["prompt_id"] for r in rows}:
        mine = [r for r in rows if r["prompt_id"] == pid]
        assert len(mine) == mine[0]["num_accepted"] // 2
        assert mine[0]["num_accepted"] == min(4, mine[0]["num_candidates"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    for r in rows:
        schema.validate_record(r)
        assert r["chosen_reward"] > r["rejected_reward"]
        assert r["selection"] == "rso" and r["pairing"] == "first-round" and r["beta"] == 0.5
        assert 2 <= r["num_candidates"] <= 6
        assert r["run_id"].startswith("run-") and "@sha256:" in r["policy_model"]
        assert tok(r["prompt"], add_special_tokens=False)["input_ids"] == r["prompt_token_ids"]
        for side in ("chosen", "rejected"):
            ids = r[f"{side}_token_ids"]
            assert 1 <= len(ids) <= 10
            assert r[f"{side}_finish_reason"] in ("stop", "length")
            assert (r[f"{side}_finish_reason"] == "stop") == (ids[-1] == tok.eos_token_id)
            assert math.isfinite(r[f"ref_{side}_logps"]) and r[f"ref_{side}_logps"] < 0

    # The same records in the TFRecord file, read by us and by TensorFlow.
    (tf_path,) = glob.glob(os.path.join(out, "pairs-*.tfrecord.gz"))
    ours = [schema.from_example(b) for b in tfrecord.read_records(tf_path)]
    theirs = read_with_tensorflow([tf_path])
    by_key = {key(r): r for r in rows}
    assert sorted(map(key, ours)) == sorted(by_key)
    for ex, tf_ex in zip(ours, theirs):
        row = by_key[key(ex)]
        assert tf_ex["prompt_id"]["value"] == [ex["prompt_id"]]
        for col in schema.COLUMNS:
            if col.kind == schema.DOUBLE:
                assert ex[col.name] == pytest.approx(row[col.name], rel=1e-6)
                assert tf_ex[col.name]["value"][0] == pytest.approx(row[col.name], rel=1e-6)
            else:
                assert ex[col.name] == row[col.name], col.name

    # Hugging Face datasets loads the Parquet files (TRL's preference column names).
    import datasets

    ds = datasets.load_dataset("parquet", data_files=glob.glob(os.path.join(out, "*.parquet")),
                               split="train")
    assert len(ds) == len(rows) and {"prompt", "chosen", "rejected"} <= set(ds.column_names)


def schema_prompt_id(text: str) -> str:
    from beam_pipelines.prompts import prompt_id_for

    return prompt_id_for(prompt=text)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["vllm_run", "transformers_run"])
def test_every_bad_input_is_a_dead_letter_with_its_reason(run, request):
    out = request.getfixturevalue(run)
    dead = [json.loads(line) for p in glob.glob(os.path.join(out, "dead_letter-*.jsonl"))
            for line in open(p)]
    reasons = {d["reason"] for d in dead}
    assert set(BAD_LINES.values()) <= reasons, reasons
    nan = [d for d in dead if d["reason"] == "non_finite_reward"]
    assert len([d for d in nan if d["prompt_id"] == "nan"]) == 6  # all its candidates
    assert all(d["prompt_id"] == "nan" or POISON_WORD in d["input"]["text"] for d in nan)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    counters = manifest["counters"]
    assert counters["pairs"] == counters["records_written"] == len(_pairs(out)) >= 4
    assert counters["dead_letters"] == len(dead)
    by_reason = manifest["dead_letters"]["by_reason"]
    assert by_reason["non_finite_reward"] == len(nan)
    assert sum(by_reason.values()) == len(dead)
    assert manifest["models"]["policy"].startswith(os.path.basename(manifest["config"]["policy"]))


@pytest.mark.slow
def test_vllm_reference_logps_match_the_trainer_in_fp32(vllm_run, tiny_policy):
    """bf16 generation + default fp32 re-scoring: stored ref logps equal what the trainer's
    own log-prob computation gives for the initial policy (SPEC 1, issue: < 1e-3 nats)."""
    from transformers import AutoModelForCausalLM

    from rso.logprobs import sequence_logps

    manifest = json.load(open(os.path.join(vllm_run, "manifest.json")))
    assert manifest["config"]["rescore"] == "auto"
    rows = _pairs(vllm_run)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()
    with torch.no_grad():
        logps = sequence_logps(model, [r["prompt_token_ids"] for r in rows] * 2,
                               [r["chosen_token_ids"] for r in rows]
                               + [r["rejected_token_ids"] for r in rows], pad_id=1)
    stored = torch.tensor([r["ref_chosen_logps"] for r in rows]
                          + [r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
    assert (logps - stored).abs().max().item() < 1e-3


@pytest.mark.slow
def test_same_seed_writes_identical_pairs(vllm_run, tiny_policy, poisoned_rm, inputs, tmp_path):
    out = str(tmp_path / "again")
    assert generate(_args(inputs, out, tiny_policy, poisoned_rm, "--engine", "vllm",
                          "--dtype", "bfloat16", "--enforce-eager")) == 0
    first, second = sorted(_pairs(vllm_run), key=key), sorted(_pairs(out), key=key)
    assert first == second


def test_existing_complete_output_is_refused(transformers_run, tiny_policy, poisoned_rm, inputs,
                                            capsys):
    assert generate(_args(inputs, transformers_run, tiny_policy, poisoned_rm, "--engine",
                          "transformers")) == 2
    assert "already holds a complete run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "tfrecord"])
def test_trainer_step_zero_on_pipeline_pairs_is_log2(vllm_run, tiny_policy, tmp_path, fmt):
    """Issue 3: the trainer reads the pipeline's output (bf16 vLLM generation, fp32
    re-scored references) and, at step 0 with the same policy, sigmoid-norm is log 2 and the
    reference gap it reports is below 1e-3 nats per sequence."""
    from trainer.config import TrainConfig
    from trainer.metrics import read_metrics
    from trainer.train import train

    data = (vllm_run if fmt == "parquet"
            else glob.glob(os.path.join(vllm_run, "pairs-*.tfrecord.gz"))[0])
    result = train(TrainConfig(data=[data], policy=tiny_policy, output=str(tmp_path / "run"),
                               loss="sigmoid-norm", gamma=0.05, lr=1e-4, batch_size=4,
                               max_steps=1, progress=False, tensorboard=False, plots=False,
                               strict_reference=True))
    metrics = read_metrics(result.metrics_path)
    gap = next(r for r in metrics if r["split"] == "reference")
    # float32 TFRecord features round the stored log-probs (~1e-5 relative)
    assert gap["gap_max"] < (1e-3 if fmt == "parquet" else 2e-3)
    first = next(r for r in metrics if r["split"] == "train")
    assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-4)


# ----------------------------------------------------------------------------- failures
STAGES = ("read", "render", "generate", "reward", "select", "rescore", "records", "write")
INJECTED = {f"inj-{stage}": stage for stage in STAGES}
DEEP_JSON = b"[" * 3000 + b"]" * 3000
LONE_SURROGATE = b'{"prompt_id": "s1", "prompt": "broken \\ud83d emoji"}'


def _raise_for(monkeypatch, owner, name: str, prompt_id_of, stage: str, exc: type) -> None:
    """Replaces ``owner.name`` by a wrapper raising ``exc`` for the prompt ``inj-<stage>``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if prompt_id_of(*args, **kwargs) == f"inj-{stage}":
            raise exc(f"injected into {stage}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def _inject_every_stage(monkeypatch) -> None:
    """One exception the stage does not expect, in a function each stage calls (the
    FnApiRunner runs in-process, so the patched functions are the ones that run)."""
    from beam_pipelines import (
        generate_hf,
        prompts,
        records,
        render,
        rescore,
        reward_handlers,
        selection,
    )

    _raise_for(monkeypatch, prompts, "parse_json_line",
               lambda line, *a: "inj-read" if b"inj-read" in line else None, "read", RuntimeError)
    _raise_for(monkeypatch, render, "render_prompt", lambda tok, pid, *a: pid, "render",
               KeyError)
    _raise_for(monkeypatch, generate_hf.TransformersGenerationHandler, "_generate_one",
               lambda self, p, m: p.prompt_id, "generate", RuntimeError)
    _raise_for(monkeypatch, reward_handlers.PointwiseRewardHandler, "_plan",
               lambda self, pc, m: pc.prompt.prompt_id, "reward", ZeroDivisionError)
    _raise_for(monkeypatch, selection, "select_and_pair", lambda g, c: g.prompt.prompt_id,
               "select", KeyError)
    _raise_for(monkeypatch, rescore, "rescore_one", lambda m, pad, pc, b: pc.prompt.prompt_id,
               "rescore", RuntimeError)
    _raise_for(monkeypatch, records, "pair_records", lambda g, *a: g.prompt.prompt_id,
               "records", IndexError)
    _raise_for(monkeypatch, schema, "validate_record", lambda r, **k: r.get("prompt_id"),
               "write", KeyError)


def _truncated_gzip(path: str) -> None:
    """Two prompts (padded with incompressible hex), cut inside the second line."""
    lines = [json.dumps({"prompt_id": pid, "prompt": text, "pad": os.urandom(8000).hex()})
             .encode() for pid, text in (("gz-kept", "Is it going to rain today?"),
                                         ("gz-lost", "What is two plus two?"))]
    import gzip

    data = gzip.compress(b"\n".join(lines) + b"\n")
    with open(path, "wb") as f:
        f.write(data[:len(data) * 3 // 4])


def _dead_letters(out: str) -> list[dict]:
    return [json.loads(line) for p in glob.glob(os.path.join(out, "dead_letter-*.jsonl"))
            for line in open(p, encoding="utf-8")]


@pytest.mark.slow
def test_one_bad_element_in_every_stage_is_one_dead_letter(tiny_policy, tiny_reward_model,
                                                           tmp_path, monkeypatch):
    """Issue 6: deep JSON, a lone surrogate, a truncated .jsonl.gz and an unexpected exception
    in every stage each end as dead letters (stage, reason, input); the run completes and every
    valid prompt gets its pairs."""
    _inject_every_stage(monkeypatch)
    os.makedirs(tmp_path / "in")
    injected = [json.dumps({"prompt_id": pid, "prompt": "Tell me a joke."}).encode()
                for pid in INJECTED]
    _write_inputs(str(tmp_path / "in" / "prompts.jsonl"),
                  injected + [DEEP_JSON, LONE_SURROGATE])
    cut = str(tmp_path / "in" / "cut.jsonl.gz")
    _truncated_gzip(cut)
    out = str(tmp_path / "out")
    assert generate(_args(str(tmp_path / "in" / "*"), out, tiny_policy, tiny_reward_model,
                          "--engine", "transformers", "--rescore", "on")) == 0

    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    valid = {"bread", "paris", "poem", schema_prompt_id("Tell me a joke."), "gz-kept"}
    assert {r["prompt_id"] for r in _pairs(out)} == valid
    dead = _dead_letters(out)
    for pid, stage in INJECTED.items():
        mine = [d for d in dead if d["prompt_id"] == pid
                or (stage == "read" and pid in str(d["input"]))]
        assert mine and {d["stage"] for d in mine} == {stage}, (pid, mine)
        assert all("injected into " + stage in d["detail"] for d in mine)
        assert len(mine) == (2 if stage == "write" else 1)  # write: one per pair record
        reason = {"generate": "generation_failed", "reward": "reward_failed",
                  "rescore": "rescore_failed"}.get(stage, "unexpected_error")
        assert {d["reason"] for d in mine} == {reason}
    [deep] = [d for d in dead if "nested too deeply" in d["detail"]]
    assert (deep["stage"], deep["reason"], deep["input"]) == (
        "read", "invalid_json", DEEP_JSON.decode())
    [surrogate] = [d for d in dead if d["reason"] == "invalid_unicode"]
    assert surrogate["stage"] == "read" and '"s1"' in surrogate["input"]
    [corrupt] = [d for d in dead if d["reason"] == "corrupt_input_file"]
    assert corrupt["stage"] == "read" and corrupt["input"]["file"] == cut
    assert corrupt["input"]["line"] == 2
    assert len(dead) == len(INJECTED) + 1 + 3  # write: 2; deep, surrogate, truncated file
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["counters"]["dead_letters"] == len(dead)
    assert manifest["dead_letters"]["by_reason"]["unexpected_error"] == 6  # write: 2


@pytest.mark.slow
def test_corrupt_parquet_among_good_ones_completes(tiny_policy, tiny_reward_model, tmp_path):
    import pyarrow as pa

    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["How do I bake bread?"]}),
                   str(tmp_path / "in" / "a.parquet"))
    pq.write_table(pa.table({"prompt_id": ["c"], "prompt": ["Tell me a joke."]}),
                   str(tmp_path / "in" / "c.parquet"))
    bad = str(tmp_path / "in" / "b.parquet")
    with open(bad, "wb") as f:
        f.write(b"not parquet at all")
    out = str(tmp_path / "out")
    assert generate(_args(str(tmp_path / "in" / "*.parquet"), out, tiny_policy,
                          tiny_reward_model, "--engine", "transformers")) == 0
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert {r["prompt_id"] for r in _pairs(out)} == {"a", "c"}
    [d] = _dead_letters(out)
    assert (d["stage"], d["reason"], d["input"]["file"]) == ("read", "corrupt_input_file", bad)
