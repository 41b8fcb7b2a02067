"""WriteOutputs on the real Beam runner: records read back with pyarrow, Hugging Face datasets and
our TFRecord reader; manifest counters and statistics; _SUCCESS last; refusal and clearing of
existing outputs; empty outputs; best-of-n SFT records; gs:// through the GCS emulator."""
from __future__ import annotations

import glob
import io
import json
import math
import os

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines.elements import DeadLetter, PromptSummary
from beam_pipelines.manifest import NUM_BINS
from beam_pipelines.plots import PLOT_NAMES
from beam_pipelines.read import ReadPrompts
from beam_pipelines.write import OutputExistsError, WriteOutputs, prepare_output
from rso import schema, tfrecord

RUNNER = ["--runner=FnApiRunner"]  # what DirectRunner falls back to, without trying Prism
SECRET = "s3cr3t-value-that-must-not-leak"


def record(i: int, chosen_reward: float, rejected_reward: float) -> dict:
    return {
        "prompt_id": f"p{i}", "prompt": f"<|user|> question {i} <|assistant|>",
        "prompt_token_ids": [4, 10 + i, 5], "chosen": f"good answer {i}",
        "rejected": "bad answer ünïcode", "chosen_token_ids": [20, 21, 3],
        "rejected_token_ids": [30 + i], "ref_chosen_logps": -3.25 - i,
        "ref_rejected_logps": -1.0 / 3.0, "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward, "chosen_finish_reason": "stop",
        "rejected_finish_reason": "length", "selection": "rso", "pairing": "first-round",
        "beta": math.inf if i == 2 else 0.5, "num_candidates": 4, "num_accepted": 2,
        "policy_model": "tiny-policy@abc", "reward_model": "tiny-rm@def", "run_id": "run-test",
    }


RECORDS = [record(0, 1.5, 0.25), record(1, 0.75, -2.0), record(2, 3.0, 2.5)]
SUMMARIES = [
    PromptSummary("p0", 4, 4, 0, 2, False, [1.5, 0.25, -1.0, 0.0], [1.5, 0.25], 1, 0, 40),
    PromptSummary("p1", 4, 3, 1, 2, False, [0.75, -2.0, 0.5], [0.75, -2.0], 1, 0, 31),
    PromptSummary("p2", 4, 4, 0, 2, False, [3.0, 2.5, 2.5, 1.0], [3.0, 2.5], 1, 0, 12),
    PromptSummary("p3", 4, 1, 3, 1, True, [0.5], [0.5], 0, 0, 8),  # under-filled, no pair
]
READ_DEAD = [DeadLetter("read", "invalid_json", "in.jsonl: bad", None, '{"prompt": '),
             DeadLetter("reward", "non_finite_reward", "nan", "p9", {"text": "x"})]
CONFIG = {"input": "in.jsonl", "num_candidates": 4, "beta": 0.5, "hf_token": SECRET,
          "tracking_uri": f"https://user:{SECRET}@example.com/x"}


def write(output: str, records=(), dead=(), summaries=(), **kwargs) -> None:
    with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
        inputs = {"pairs": p | "R" >> beam.Create(list(records)),
                  "dead_letters": p | "D" >> beam.Create(list(dead))}
        if summaries:
            inputs["summaries"] = p | "S" >> beam.Create(list(summaries))
        _ = inputs | WriteOutputs(output, kwargs.pop("config", CONFIG), "run-test",
                                  {"apache-beam": beam.__version__},
                                  {"policy": "tiny-policy@abc"}, **kwargs)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One output directory written from RECORDS (+ 2 invalid records), READ_DEAD, SUMMARIES."""
    out = str(tmp_path_factory.mktemp("out") / "run")
    os.environ["RSO_TEST_ENV_SECRET"] = SECRET  # the manifest must not copy the environment
    try:
        write(out, RECORDS + [{"prompt_id": "broken", "prompt": 3}, record(5, math.nan, 0.0)],
              READ_DEAD, SUMMARIES)
    finally:
        del os.environ["RSO_TEST_ENV_SECRET"]
    return out


def _one(pattern: str) -> str:
    (path,) = glob.glob(pattern)
    return path


def _manifest(out: str) -> dict:
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def test_parquet_reads_back_with_pyarrow_field_by_field(written):
    table = pq.read_table(_one(f"{written}/pairs-*.parquet"))
    assert table.schema.equals(schema.arrow_schema())
    rows = sorted(table.to_pylist(), key=lambda r: r["prompt_id"])
    assert rows == RECORDS  # exact: float64 and int lists survive, beta=inf included


def test_parquet_reads_back_with_hugging_face_datasets(written):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=glob.glob(f"{written}/pairs-*.parquet"),
                               split="train")
    assert ds.column_names == list(schema.COLUMN_NAMES)
    assert sorted(ds.to_list(), key=lambda r: r["prompt_id"]) == RECORDS


def test_tfrecord_reads_back_field_by_field(written):
    examples = [schema.from_example(b) for b in tfrecord.read_records(
        _one(f"{written}/pairs-*.tfrecord.gz"))]
    got = sorted(examples, key=lambda r: r["prompt_id"])
    assert len(got) == len(RECORDS)
    for g, want in zip(got, RECORDS):
        for col in schema.COLUMNS:
            if col.kind == schema.DOUBLE:  # float32 in tf.train.Example
                assert g[col.name] == pytest.approx(want[col.name], rel=1e-6), col.name
            else:
                assert g[col.name] == want[col.name], col.name


def test_dead_letters_file_holds_every_dropped_thing(written):
    with open(_one(f"{written}/dead_letter-*.jsonl"), encoding="utf-8") as f:
        dead = [json.loads(line) for line in f]
    assert sorted((d["stage"], d["reason"], d["prompt_id"]) for d in dead) == [
        ("read", "invalid_json", None), ("reward", "non_finite_reward", "p9"),
        ("write", "invalid_record", "broken"), ("write", "invalid_record", "p5")]
    by_id = {d["prompt_id"]: d for d in dead}
    assert by_id["broken"]["input"] == {"prompt_id": "broken", "prompt": 3}
    assert "missing column" in by_id["broken"]["detail"]
    assert "non-finite chosen_reward" in by_id["p5"]["detail"]
    assert by_id["p5"]["input"]["rejected_token_ids"] == [35]


def test_manifest_counters_are_exact(written):
    m = _manifest(written)
    assert m["run_id"] == "run-test" and m["versions"] == {"apache-beam": beam.__version__}
    assert m["models"] == {"policy": "tiny-policy@abc"}
    assert m["counters"] == {
        "prompts": 4, "candidates_generated": 16, "tokens_generated": 91, "candidates": 12,
        "duplicates": 4,
        "accepted": 7, "underfilled_prompts": 1, "pairs": 3, "ties_dropped": 0,
        "records_written": 3, "dead_letters": 4}
    assert m["dead_letters"] == {
        "total": 4, "by_reason": {"invalid_json": 1, "invalid_record": 2,
                                  "non_finite_reward": 1},
        "by_stage": {"read": 1, "reward": 1, "write": 2},
        "by_stage_reason": {"read/invalid_json": 1, "reward/non_finite_reward": 1,
                            "write/invalid_record": 2},
        "candidates": 1}
    acc = m["acceptance"]
    assert acc["underfilled_fraction"] == 0.25
    assert acc["mean_accepted_over_candidates"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 4 + 1) / 4)
    assert acc["prompts_by_num_accepted"] == {"1": 1, "2": 3}
    assert m["files"]["parquet"] == [os.path.basename(_one(f"{written}/pairs-*.parquet"))]


def test_manifest_reward_statistics(written):
    stats = _manifest(written)["reward_statistics"]
    series = {"candidate": [r for s in SUMMARIES for r in s.candidate_rewards],
              "accepted": [r for s in SUMMARIES for r in s.accepted_rewards],
              "chosen": [r["chosen_reward"] for r in RECORDS],
              "rejected": [r["rejected_reward"] for r in RECORDS],
              "margin": [r["chosen_reward"] - r["rejected_reward"] for r in RECORDS]}
    assert set(stats) == set(series) | {"prompt_reward_std", "prompt_accepted_gain"}
    for name, values in series.items():
        s, v = stats[name], np.array(values)
        assert s["count"] == len(v)
        assert s["mean"] == pytest.approx(v.mean()) and s["std"] == pytest.approx(v.std())
        assert (s["min"], s["max"]) == (v.min(), v.max())
        assert s["quantiles"]["values"][0] == v.min() and s["quantiles"]["values"][-1] == v.max()
        assert s["quantiles"]["values"] == sorted(s["quantiles"]["values"])
        hist = s["histogram"]
        assert len(hist["counts"]) == NUM_BINS and len(hist["edges"]) == NUM_BINS + 1
        assert sum(hist["counts"]) == len(v)
        assert np.array_equal(np.histogram(v, bins=hist["edges"])[0], hist["counts"])
    # Every reward series shares the candidates' bins, so they can be compared.
    assert stats["accepted"]["histogram"]["edges"] == stats["candidate"]["histogram"]["edges"]
    assert stats["candidate"]["histogram"]["edges"][0] == -2.0
    assert stats["candidate"]["histogram"]["edges"][-1] == 3.0


def test_manifest_holds_no_secret(written):
    with open(os.path.join(written, "manifest.json"), encoding="utf-8") as f:
        text = f.read()
    assert SECRET not in text and "RSO_TEST_ENV_SECRET" not in text
    config = json.loads(text)["config"]
    assert config["hf_token"] == "<redacted>"
    assert config["tracking_uri"] == "https://<redacted>@example.com/x"
    assert config["num_candidates"] == 4 and config["input"] == "in.jsonl"


def test_plots_and_success_written_last(written):
    files = [os.path.join(written, f) for f in os.listdir(written)]
    for name in PLOT_NAMES:
        with open(os.path.join(written, name), "rb") as f:
            data = f.read()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    success = os.path.join(written, "_SUCCESS")
    assert os.path.exists(success)
    assert all(os.path.getmtime(success) >= os.path.getmtime(f) for f in files)
    assert not glob.glob(f"{written}/beam-temp-*")  # Beam's staging folders are gone


def test_existing_complete_output_is_refused_then_replaced(written, tmp_path):
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output(written)
    p = beam.Pipeline(options=PipelineOptions(RUNNER))
    with pytest.raises(OutputExistsError):  # also when the pipeline is built
        _ = {"pairs": p | beam.Create([])} | WriteOutputs(written, {}, "r", {}, {})
    out = str(tmp_path / "again")
    write(out, RECORDS[:1], summaries=SUMMARIES[:1])
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("a user's file")
    removed = prepare_output(out, overwrite=True)
    assert os.path.basename(removed[0]) == "_SUCCESS"
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_incomplete_output_is_cleared_without_overwrite(tmp_path):
    out = tmp_path / "stale"
    os.makedirs(out / "beam-temp-pairs-123")
    for name in ("pairs-00002-of-00003.parquet", "dead_letter-00000-of-00001.jsonl",
                 "manifest.json", "beam-temp-pairs-123/x.parquet", "keep.txt"):
        (out / name).write_text("old")
    prepare_output(str(out))  # no _SUCCESS: a crashed run, not a result
    assert sorted(os.listdir(out)) == ["keep.txt"]
    write(str(out), RECORDS, summaries=SUMMARIES)
    assert len(glob.glob(f"{out}/pairs-*.parquet")) == 1  # the stale shard did not survive


def test_empty_output_is_valid(tmp_path):
    out = str(tmp_path / "empty")
    write(out, records=[], dead=READ_DEAD[:1])
    table = pq.read_table(_one(f"{out}/pairs-*.parquet"))
    assert table.num_rows == 0 and table.schema.equals(schema.arrow_schema())
    assert list(tfrecord.read_records(_one(f"{out}/pairs-*.tfrecord.gz"))) == []
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    m = _manifest(out)
    assert m["counters"]["prompts"] == 0 and m["counters"]["records_written"] == 0
    assert m["counters"]["dead_letters"] == 1 and m["reward_statistics"] == {}
    assert m["acceptance"]["underfilled_fraction"] is None
    assert all(os.path.getsize(os.path.join(out, n)) > 0 for n in PLOT_NAMES)


def test_best_of_n_sft_records(tmp_path):
    out = str(tmp_path / "sft")
    sft = {"prompt_id": "p0", "prompt": "q", "prompt_token_ids": [1], "completion": "a",
           "completion_token_ids": [2, 3], "ref_logps": -1.5, "reward": 0.5,
           "finish_reason": "stop", "selection": "best-of-n", "policy_model": "pol",
           "reward_model": "rm", "run_id": "run-test"}
    write(out, [sft, record(0, 1.0, 0.0)], summaries=SUMMARIES[:1],
          columns=schema.SFT_COLUMNS, prefix="sft")
    assert pq.read_table(_one(f"{out}/sft-*.parquet")).to_pylist() == [sft]
    got = [schema.from_example(b, columns=schema.SFT_COLUMNS)
           for b in tfrecord.read_records(_one(f"{out}/sft-*.tfrecord.gz"))]
    assert got == [sft]
    m = _manifest(out)
    assert m["dead_letters"]["by_reason"] == {"invalid_record": 1}  # a pair is not an SFT row
    assert m["reward_statistics"]["completion"]["mean"] == 0.5


def test_gcs_read_and_write(gcs_bucket):
    """Prompts read from gs:// and an output directory written to gs:// (local emulator)."""
    src = f"{gcs_bucket}/inputs/prompts.jsonl"
    with FileSystems.create(src) as f:
        f.write(b'{"prompt_id": "p0", "prompt": "hello"}\n{"prompt": ""}\n'
                b'{"prompt_id": "p1", "prompt": "world"}\n')
    out = f"{gcs_bucket}/runs/one"
    for stale in ("beam-temp-pairs-0/shard.parquet", "pairs-00001-of-00002.parquet"):
        with FileSystems.create(f"{out}/{stale}") as f:  # left by a run that crashed
            f.write(b"old")
    assert sorted(prepare_output(out)) == [f"{out}/beam-temp-pairs-0/shard.parquet",
                                           f"{out}/pairs-00001-of-00002.parquet"]

    def to_record(p):
        i = int(p.prompt_id[1:])
        return {**record(i, 1.0 + i, 0.0), "prompt": p.prompt}

    with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
        read = p | ReadPrompts(src)
        prompts, dead = read.main, read.dead_letters
        _ = {"pairs": prompts | beam.Map(to_record), "dead_letters": dead} | WriteOutputs(
            out, CONFIG, "run-test", {}, {})

    names = sorted(m.path.rsplit("/", 1)[1] for m in FileSystems.match([f"{out}/*"])[0]
                   .metadata_list)
    assert names == sorted(["_SUCCESS", "manifest.json", "pairs-00000-of-00001.parquet",
                            "pairs-00000-of-00001.tfrecord.gz",
                            "dead_letter-00000-of-00001.jsonl", *PLOT_NAMES])
    with FileSystems.open(f"{out}/pairs-00000-of-00001.parquet") as f:
        rows = pq.read_table(io.BytesIO(f.read())).to_pylist()
    assert sorted((r["prompt_id"], r["prompt"]) for r in rows) == [("p0", "hello"),
                                                                  ("p1", "world")]
    examples = list(tfrecord.read_records(f"{out}/pairs-00000-of-00001.tfrecord.gz"))  # gcsfs
    assert sorted(schema.from_example(b)["prompt"] for b in examples) == ["hello", "world"]
    with FileSystems.open(f"{out}/manifest.json") as f:
        m = json.loads(f.read())
    assert m["counters"]["records_written"] == 2
    assert m["dead_letters"]["by_reason"] == {"empty_prompt": 1}
    with FileSystems.open(f"{out}/dead_letter-00000-of-00001.jsonl") as f:
        (dead_line,) = f.read().decode().splitlines()
    assert json.loads(dead_line)["detail"].startswith(src)
    with pytest.raises(OutputExistsError):
        prepare_output(out)
    prepare_output(out, overwrite=True)
    assert FileSystems.match([f"{out}/*"])[0].metadata_list == []
