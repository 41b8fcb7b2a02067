"""Corrupt and truncated training files: the pipeline's manifest records each record file's
sha256 and size, `rso train` checks them before reading, and a file that cannot be decoded is
an error naming the file (and row), never a raw traceback or silently different pairs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rso.schema import arrow_schema
from tests.pair_data import build_pairs, write_output_dir
from trainer.data import DataError, data_id, read_pairs, verify_files
from trainer.train import main


@pytest.fixture(scope="module")
def records(tiny_policy):
    return build_pairs(tiny_policy, num_prompts=6, pairs_per_prompt=2)


@pytest.fixture(scope="module")
def clean_dir(records, tmp_path_factory):
    return write_output_dir(str(tmp_path_factory.mktemp("pairs")), records)


@pytest.fixture
def data_dir(clean_dir, tmp_path):
    return shutil.copytree(clean_dir, str(tmp_path / "pairs"))


def _pairs(path: str) -> list[tuple]:
    return [(p.prompt_id, p.prompt_token_ids, p.chosen_token_ids, p.rejected_token_ids,
             p.ref_chosen_logps, p.ref_rejected_logps) for p in read_pairs(path)]


def _column_chunk(path: str, column: str = "rejected_token_ids") -> tuple[int, int]:
    """(first byte, size) of ``column``'s pages in row group 0."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    col = next(meta.column(i) for i in range(meta.num_columns)
               if meta.column(i).path_in_schema.startswith(column))
    start = col.dictionary_page_offset or col.data_page_offset
    return start, col.total_compressed_size


def _data_page_offset(path: str) -> int:
    return _column_chunk(path)[0]


def _silent_flip(path: str, tmp: str) -> int:
    """The first byte of rejected_token_ids' pages whose flip still decodes, to other pairs."""
    before = _pairs(path)
    start, size = _column_chunk(path)
    for offset in range(start, start + size):
        shutil.copy(path, tmp)
        _flip(tmp, offset)
        try:
            if _pairs(tmp) != before:
                return offset
        except DataError:
            continue
    raise AssertionError("no silent flip found")


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def test_pipeline_manifest_records_sha256_and_size_of_every_record_file(records, tmp_path):
    """The Beam write stage (real FnApiRunner) hashes what it wrote; the trainer accepts it."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipelines.write import WriteOutputs

    out = str(tmp_path / "run")
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        _ = {"pairs": p | beam.Create(records)} | WriteOutputs(out, {}, "run-x", {}, {})
    with open(os.path.join(out, "manifest.json")) as f:
        files = json.load(f)["files"]
    names = files["parquet"] + files["tfrecord"]
    assert sorted(files["checksums"]) == sorted(names) and len(names) == 2
    for name in names:
        with open(os.path.join(out, name), "rb") as f:
            data = f.read()
        assert files["checksums"][name] == {"sha256": hashlib.sha256(data).hexdigest(),
                                            "bytes": len(data)}
    for fmt in ("parquet", "tfrecord"):
        assert len(verify_files([out], fmt)) == 1
    _flip(os.path.join(out, files["tfrecord"][0]), 40)
    with pytest.raises(DataError, match=files["tfrecord"][0] + ": content differs"):
        verify_files([out], "tfrecord")


def test_one_flipped_byte_in_a_data_page_is_caught_by_the_manifest(data_dir, capsys,
                                                                   tiny_policy, tmp_path):
    shard = os.path.join(data_dir, "pairs-00001-of-00002.parquet")
    before = _pairs(shard)
    # Without page checksums (Beam writes none) some flips decode silently to other token ids:
    _flip(shard, _silent_flip(shard, str(tmp_path / "probe.parquet")))
    changed = _pairs(shard)
    assert changed != before and [p[3] for p in changed] != [p[3] for p in before]
    with pytest.raises(DataError, match=f"{shard}: content differs from manifest.json"):
        verify_files([data_dir])
    rc = main(["--data", data_dir, "--policy", tiny_policy, "--output", str(tmp_path / "run"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"rso train: error: {shard}: content differs" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "run")


def test_truncated_missing_and_foreign_shards_are_errors(data_dir):
    shard = os.path.join(data_dir, "pairs-00000-of-00002.parquet")
    with open(shard, "rb") as f:
        original = f.read()
    assert [f.path for f in verify_files([data_dir])] == [
        shard, os.path.join(data_dir, "pairs-00001-of-00002.parquet")]
    with open(shard, "r+b") as f:
        f.truncate(len(original) // 2)
    with pytest.raises(DataError, match=f"{shard}: content differs"):
        verify_files([data_dir])
    os.remove(shard)
    with pytest.raises(DataError, match="pairs-00000-of-00002.parquet listed in manifest.json "
                                        "but missing"):
        verify_files([data_dir])
    with open(shard, "wb") as f:
        f.write(original)
    shutil.copy(shard, os.path.join(data_dir, "pairs-00002-of-00002.parquet"))
    with pytest.raises(DataError, match="pairs-00002-of-00002.parquet: not listed in "
                                        "manifest.json"):
        verify_files([data_dir])
    assert len(verify_files([data_dir], "tfrecord")) == 2  # the other format is untouched


def test_content_id_follows_content_not_path(clean_dir, data_dir):
    assert data_id(verify_files([clean_dir])) == data_id(verify_files([data_dir]))
    assert data_id(verify_files([clean_dir])) != data_id(verify_files([clean_dir], "tfrecord"))


def test_parquet_page_checksums_are_verified(records, tmp_path):
    """A file written with page checksums (pyarrow write_page_checksum) needs no manifest."""
    path = str(tmp_path / "pairs-x.parquet")
    pq.write_table(pa.Table.from_pylist(records, schema=arrow_schema()), path,
                   write_page_checksum=True)
    clean = str(tmp_path / "clean.parquet")
    pq.write_table(pa.Table.from_pylist(records, schema=arrow_schema()), clean)
    # The same flip that goes unnoticed without page checksums:
    offset = _silent_flip(clean, str(tmp_path / "probe.parquet"))
    _flip(path, offset - _data_page_offset(clean) + _data_page_offset(path))
    with pytest.raises(DataError, match=rf"{path}: row 0: unreadable, the Parquet file is "
                                        rf"corrupt or truncated \(OSError: .*CRC"):
        _pairs(path)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.95, 0.999])
@pytest.mark.parametrize("name", ["pairs-00000-of-00002.parquet",
                                  "pairs-00000-of-00002.tfrecord.gz"])
def test_truncated_file_read_directly_names_the_file(clean_dir, tmp_path, name, fraction):
    path = str(tmp_path / name)
    with open(os.path.join(clean_dir, name), "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * fraction)])
    if fraction == 0.0 and name.endswith(".gz"):
        assert _pairs(path) == []  # an empty TFRecord file holds no records
        return
    with pytest.raises(DataError, match=rf"^{path}: (row \d+: )?.*(corrupt or truncated|"
                                        rf"truncated)"):
        _pairs(path)


def test_gzip_damage_in_a_tfrecord_names_the_file(clean_dir, tmp_path):
    name = "pairs-00000-of-00002.tfrecord.gz"
    src = os.path.join(clean_dir, name)
    with open(src, "rb") as f:
        data = f.read()
    # the deflate stream: after the 10-byte header and the file name (flag FNAME), before the
    # 8-byte trailer (crc32, size)
    start = data.index(b"\0", 10) + 1 if data[3] & 0x08 else 10
    for offset in range(start, len(data) - 8, max(1, (len(data) - 8 - start) // 12)):
        path = str(tmp_path / f"{offset}-{name}")
        shutil.copy(src, path)
        _flip(path, offset)
        with pytest.raises(DataError, match=rf"^{path}: (row|record) \d+: "):
            _pairs(path)
