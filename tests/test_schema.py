"""SPEC 5 record schema: Parquet, tf.train.Example and the TFRecord framing agree."""
import math

import pyarrow as pa
import pytest

from rso import schema, tfrecord
from tests.tensorflow_check import read_with_tensorflow


def _record(i: int) -> dict:
    return {
        "prompt_id": f"p{i}", "prompt": "Human: héllo ✓", "prompt_token_ids": [1, 2, 3 + i],
        "chosen": "yes", "rejected": "no", "chosen_token_ids": [5, 6],
        "rejected_token_ids": [7], "ref_chosen_logps": -12.345678901234,
        "ref_rejected_logps": -3.25, "chosen_reward": 1.5, "rejected_reward": -0.5,
        "chosen_finish_reason": "stop", "rejected_finish_reason": "length", "selection": "rso",
        "pairing": "first-round", "beta": math.inf, "num_candidates": 64, "num_accepted": 8,
        "policy_model": "tiny@sha256:0", "reward_model": "rm@sha256:1", "run_id": "run-x",
    }


def test_example_round_trip_keeps_every_field():
    rec = _record(0)
    back = schema.from_example(schema.to_example(rec))
    for name in schema.COLUMN_NAMES:
        if isinstance(rec[name], float) and math.isfinite(rec[name]):
            assert back[name] == pytest.approx(rec[name], rel=1e-7)  # float32 in TFRecord
        else:
            assert back[name] == rec[name], name


def test_arrow_schema_accepts_records_and_keeps_float64():
    table = pa.Table.from_pylist([_record(0), _record(1)], schema=schema.arrow_schema())
    assert table.schema.field("ref_chosen_logps").type == pa.float64()
    assert table.column("ref_chosen_logps")[0].as_py() == -12.345678901234
    assert table.column("prompt_token_ids")[1].as_py() == [1, 2, 4]


def test_validate_record_names_the_bad_column():
    rec = _record(0)
    rec["chosen_token_ids"] = "5 6"
    with pytest.raises(schema.SchemaError, match="chosen_token_ids"):
        schema.validate_record(rec, where="pairs.parquet row 3")
    del rec["beta"]
    with pytest.raises(schema.SchemaError, match="beta"):
        schema.validate_record(rec)


def test_tfrecord_framing_round_trip_and_corruption(tmp_path):
    path = str(tmp_path / "x.tfrecord")
    assert tfrecord.write_records(path, [b"abc", b"", b"x" * 1000]) == 3
    assert list(tfrecord.read_records(path)) == [b"abc", b"", b"x" * 1000]
    data = bytearray(open(path, "rb").read())
    data[14] ^= 0xFF  # inside the first record's payload
    open(path, "wb").write(bytes(data))
    with pytest.raises(tfrecord.CorruptRecordError, match="record 0: bad data checksum"):
        list(tfrecord.read_records(path))


def test_tensorflow_reads_our_gzip_tfrecords(tmp_path):
    path = str(tmp_path / "pairs-00000-of-00001.tfrecord.gz")
    records = [_record(i) for i in range(3)]
    tfrecord.write_records(path, (schema.to_example(r) for r in records))
    parsed = read_with_tensorflow([path])
    assert len(parsed) == 3
    kinds = {schema.STRING: "bytes_list", schema.INT: "int64_list", schema.DOUBLE: "float_list",
             schema.INT_LIST: "int64_list"}
    for rec, ex in zip(records, parsed):
        assert set(ex) == set(schema.COLUMN_NAMES)
        for col in schema.COLUMNS:
            assert ex[col.name]["kind"] == kinds[col.kind], col.name
            value = ex[col.name]["value"]
            if col.kind == schema.INT_LIST:
                assert value == rec[col.name]
            elif col.kind == schema.DOUBLE:
                assert value[0] == pytest.approx(rec[col.name], rel=1e-6)
            else:
                assert value == [rec[col.name]]
