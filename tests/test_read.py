"""ReadPrompts on the real Beam runner: mixed bad input, duplicates, --max-prompts shards,
Parquet, globs over several (gzipped) files, the real HH-RLHF file."""
from __future__ import annotations

import glob
import gzip
import json
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import prompts as P
from beam_pipelines.read import ReadPrompts, shard_key
from rso.config import ConfigError

DATA = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
# The in-process runner DirectRunner falls back to (it would first try to download Prism).
RUNNER = ["--runner=FnApiRunner"]


def _write_lines(path, lines: list[bytes]) -> str:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def read(tmp_path, input_pattern: str, **kwargs):
    """Runs ReadPrompts; returns (prompts, dead letters as dicts, counters by name)."""
    out = tmp_path / f"collected-{len(list(tmp_path.glob('collected-*')))}"
    with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
        read_out = p | ReadPrompts(input_pattern, **kwargs)
        prompts, dead = read_out.main, read_out.dead_letters
        _ = (prompts | "P" >> beam.Map(lambda x: json.dumps(P.as_dict(x)))
             | "WP" >> beam.io.WriteToText(str(out / "prompts")))
        _ = (dead | "D" >> beam.Map(lambda d: d.to_json())
             | "WD" >> beam.io.WriteToText(str(out / "dead")))
    result = p.result

    def load(name):
        rows = []
        for f in sorted(glob.glob(str(out / f"{name}-*"))):
            with open(f, encoding="utf-8") as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
        return rows

    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    return load("prompts"), load("dead"), counters


MIXED = [
    _j({"prompt_id": "bread", "prompt": "How do I bake bread?"}),
    _j({"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    _j({"chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: No.",
        "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: Knock knock."}),
    b'{"prompt": "broken',                                   # invalid JSON
    _j({"prompt": "   "}),                                    # empty prompt
    b'{"prompt": "caf\xe9 au lait"}',                         # latin-1, not UTF-8
    _j({"prompt_id": "dup", "prompt": "zebra"}),              # same id, two prompts
    _j({"prompt_id": "dup", "prompt": "aardvark"}),
    _j({"prompt": "How do I bake bread?", "note": "same text twice, no id"}),
    _j({"prompt": "How do I bake bread?"}),
    b"",                                                      # blank: skipped, counted
    _j({"text": "no prompt field"}),
]


def test_mixed_file_outputs_and_dead_letters_are_exact(tmp_path):
    path = _write_lines(tmp_path / "mixed.jsonl", MIXED)
    prompts, dead, counters = read(tmp_path, path)

    bread_sha = P.prompt_id_for(prompt="How do I bake bread?")
    by_id = {p["prompt_id"]: p for p in prompts}
    assert set(by_id) == {"bread", "dup", bread_sha,
                          P.prompt_id_for(messages=(("user", "What is the capital of France?"),)),
                          P.prompt_id_for(messages=(("user", "Tell me a joke."),))}
    assert by_id["dup"]["prompt"] == "aardvark"  # survivor: smallest (source, content)
    assert by_id[bread_sha]["prompt"] == "How do I bake bread?"
    assert all(p["source"] == path for p in prompts)

    got = sorted((d["reason"], d["stage"], d["prompt_id"], json.dumps(d["input"], sort_keys=True))
                 for d in dead)
    assert got == sorted([
        ("invalid_json", "read", None, json.dumps('{"prompt": "broken')),
        ("empty_prompt", "read", None, json.dumps(_j({"prompt": "   "}).decode())),
        ("undecodable", "read", None, json.dumps('{"prompt": "caf\\xe9 au lait"}')),
        ("missing_prompt", "read", None, json.dumps(_j({"text": "no prompt field"}).decode())),
        ("duplicate_prompt_id", "read", "dup",
         json.dumps({"prompt_id": "dup", "prompt": "zebra", "messages": None, "source": path},
                    sort_keys=True)),
        ("duplicate_prompt_id", "read", bread_sha,
         json.dumps({"prompt_id": bread_sha, "prompt": "How do I bake bread?", "messages": None,
                     "source": path}, sort_keys=True)),
    ])
    assert all(path in d["detail"] for d in dead)
    assert counters["input_records"] == len(MIXED)
    assert counters["blank_lines"] == 1
    assert counters["prompts_read"] == 5
    assert counters["dead_letter_duplicate_prompt_id"] == 2
    assert counters["dead_letter_undecodable"] == 1


def test_duplicate_survivor_does_not_depend_on_order(tmp_path):
    lines = [_j({"prompt_id": "x", "prompt": p}) for p in ("mango", "apple", "kiwi")]
    a = read(tmp_path, _write_lines(tmp_path / "a.jsonl", lines))
    b = read(tmp_path, _write_lines(tmp_path / "b.jsonl", lines[::-1]))
    assert [p["prompt"] for p in a[0]] == [p["prompt"] for p in b[0]] == ["apple"]
    assert sorted(d["input"]["prompt"] for d in a[1]) == ["kiwi", "mango"]


def test_max_prompts_is_an_exact_deterministic_shard(tmp_path):
    lines = [_j({"prompt": f"question number {i}"}) for i in range(20)]
    path = _write_lines(tmp_path / "many.jsonl", lines)
    ids = lambda run: sorted(p["prompt_id"] for p in run[0])  # noqa: E731
    first = read(tmp_path, path, max_prompts=5, seed=1)
    again = read(tmp_path, path, max_prompts=5, seed=1)
    other_seed = read(tmp_path, path, max_prompts=5, seed=2)
    everything = read(tmp_path, path, max_prompts=50, seed=1)
    assert len(ids(first)) == 5 and ids(first) == ids(again)
    assert ids(other_seed) != ids(first) and len(ids(other_seed)) == 5
    assert len(ids(everything)) == 20
    # The shard is the 5 prompts with the smallest hash(seed, prompt_id).
    all_prompts = [P.parse_json_line(line, path) for line in lines]
    expected = sorted(all_prompts, key=lambda p: shard_key(1, p))[:5]
    assert ids(first) == sorted(p.prompt_id for p in expected)
    assert first[1] == [] and first[2]["prompts_not_in_shard"] == 15


def test_parquet_input(tmp_path):
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({
        "prompt_id": ["a", None, None],
        "prompt": ["Is it going to rain today?", None, ""],
        "messages": pa.array([None, [{"role": "user", "content": "Tell me a joke."}], None],
                             type=msg_type),
    })
    path = str(tmp_path / "prompts.parquet")
    pq.write_table(table, path)
    prompts, dead, _ = read(tmp_path, path)
    assert sorted((p["prompt_id"], p["prompt"], p["messages"]) for p in prompts) == sorted([
        ("a", "Is it going to rain today?", None),
        (P.prompt_id_for(messages=(("user", "Tell me a joke."),)), None,
         [["user", "Tell me a joke."]]),
    ])
    assert all(p["source"] == path for p in prompts)
    assert [(d["reason"], d["input"]["prompt"]) for d in dead] == [("empty_prompt", "")]


def test_glob_over_two_files_one_gzipped(tmp_path):
    os.makedirs(tmp_path / "in")
    one = _write_lines(tmp_path / "in" / "part-1.jsonl", [_j({"prompt": "first"})])
    two = _write_lines(tmp_path / "in" / "part-2.jsonl.gz",
                       [_j({"prompt": "second"}), _j({"prompt": "third"})])
    prompts, dead, _ = read(tmp_path, str(tmp_path / "in" / "part-*"))
    assert sorted((p["prompt"], p["source"]) for p in prompts) == [
        ("first", one), ("second", two), ("third", two)]
    assert dead == []


def test_real_hh_rlhf_file_reads_every_line(tmp_path):
    prompts, dead, counters = read(tmp_path, DATA)
    assert counters["input_records"] == 2312
    assert len(prompts) == 2310 and len({p["prompt_id"] for p in prompts}) == 2310
    assert sorted(d["reason"] for d in dead) == ["duplicate_prompt_id"] * 2
    assert len(prompts) + len(dead) == 2312  # nothing lost silently


def test_bad_configuration_fails_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="matches no file"):
        beam.Pipeline(options=PipelineOptions(RUNNER)) | ReadPrompts(str(tmp_path / "none-*"))
    _write_lines(tmp_path / "a.jsonl", [_j({"prompt": "x"})])
    pq.write_table(pa.table({"prompt": ["y"]}), str(tmp_path / "b.parquet"))
    with pytest.raises(ConfigError, match="both Parquet and other files"):
        beam.Pipeline(options=PipelineOptions(RUNNER)) | ReadPrompts(str(tmp_path / "*"))
    # Value checks are declared once, on the config fields (not repeated in ReadPrompts).
    from beam_pipelines.config import GenerateConfig

    with pytest.raises(ConfigError, match="input-format"):
        GenerateConfig(input_format="csv")
    with pytest.raises(ConfigError, match="max-prompts"):
        GenerateConfig(max_prompts=0)


# ----------------------------------------------------------------------------- damaged input
def test_truncated_gzip_keeps_the_lines_before_the_cut_and_names_the_file(tmp_path):
    """Python's gzip raises EOFError on a cut .gz file; Beam's ReadFromText stopped silently."""
    os.makedirs(tmp_path / "in")
    good = _write_lines(tmp_path / "in" / "a.jsonl", [_j({"prompt": "intact"})])
    lines = [_j({"prompt_id": f"p{i:03d}", "prompt": f"prompt number {i} " + "x" * 200})
             for i in range(300)]
    full = gzip.compress(b"\n".join(lines) + b"\n")
    cut = str(tmp_path / "in" / "b.jsonl.gz")
    with open(cut, "wb") as f:
        f.write(full[:len(full) // 2])
    prompts, dead, counters = read(tmp_path, str(tmp_path / "in" / "*"))

    from_cut = sorted(p["prompt_id"] for p in prompts if p["source"] == cut)
    assert 0 < len(from_cut) < 300
    assert from_cut == [f"p{i:03d}" for i in range(len(from_cut))]  # every line before the cut
    assert [p["source"] for p in prompts if p["prompt"] == "intact"] == [good]
    [d] = dead
    assert (d["stage"], d["reason"]) == ("read", "corrupt_input_file")
    assert d["input"]["file"] == cut and d["input"]["line"] == len(from_cut) + 1
    assert d["input"]["byte_offset"] > 0 and cut in d["detail"] and "EOFError" in d["detail"]
    assert counters["dead_letter_corrupt_input_file"] == 1


def test_corrupt_parquet_among_good_ones_is_a_dead_letter_naming_it(tmp_path):
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"prompt": ["one", "two"]}), str(tmp_path / "in" / "a.parquet"))
    pq.write_table(pa.table({"prompt": ["three"]}), str(tmp_path / "in" / "c.parquet"))
    bad = str(tmp_path / "in" / "b.parquet")
    with open(bad, "wb") as f:
        f.write(b"PAR1 this is not a parquet file at all")
    prompts, dead, counters = read(tmp_path, str(tmp_path / "in" / "*.parquet"))

    assert sorted(p["prompt"] for p in prompts) == ["one", "three", "two"]
    [d] = dead
    assert (d["stage"], d["reason"], d["input"]) == (
        "read", "corrupt_input_file", {"file": bad, "row_group": None})
    assert bad in d["detail"]
    assert counters["input_files"] == 3


def test_corrupt_parquet_row_group_keeps_the_others(tmp_path):
    path = str(tmp_path / "groups.parquet")
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(4)]}), path,
                   row_group_size=2, compression="snappy")
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(1).column(0).data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start:start + 20] = b"\xff" * 20  # the second row group's page header
    open(path, "wb").write(bytes(data))
    prompts, dead, _ = read(tmp_path, path)

    assert sorted(p["prompt"] for p in prompts) == ["prompt 0", "prompt 1"]
    [d] = dead
    assert (d["reason"], d["input"]) == ("corrupt_input_file", {"file": path, "row_group": 1})
    assert "row group 1 of 2" in d["detail"]


def test_json_nested_thousands_deep_is_an_invalid_json_dead_letter(tmp_path):
    deep = b"[" * 3000 + b"]" * 3000
    path = _write_lines(tmp_path / "deep.jsonl", [_j({"prompt": "fine"}), deep,
                                                  _j({"prompt": "also fine"})])
    prompts, dead, counters = read(tmp_path, path)
    assert sorted(p["prompt"] for p in prompts) == ["also fine", "fine"]
    [d] = dead
    assert (d["stage"], d["reason"]) == ("read", "invalid_json")
    assert "nested too deeply" in d["detail"] and d["input"] == deep.decode()
    assert counters["dead_letter_invalid_json"] == 1


def test_lone_surrogate_is_an_invalid_unicode_dead_letter(tmp_path):
    path = _write_lines(tmp_path / "s.jsonl", [_j({"prompt": "fine"}),
                                               b'{"prompt_id": "s1", "prompt": "a \\ud83d b"}'])
    prompts, dead, counters = read(tmp_path, path)
    assert [p["prompt"] for p in prompts] == ["fine"]
    [d] = dead
    assert (d["stage"], d["reason"]) == ("read", "invalid_unicode") and "surrogate" in d["detail"]
