"""trainer.data: resolving sources, validating rows, streaming, shuffling and length bucketing."""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest

from rso.schema import to_example
from rso.tfrecord import write_records
from tests.pair_data import build_pairs, write_output_dir, write_parquet
from trainer.data import (
    DataError,
    PairSource,
    bucket_batches,
    in_eval_split,
    read_pairs,
    resolve_files,
    shuffle_buffer,
)


@pytest.fixture(scope="module")
def records(tiny_policy):
    return build_pairs(tiny_policy, num_prompts=10, pairs_per_prompt=2)


@pytest.fixture(scope="module")
def out_dir(records, tmp_path_factory):
    return write_output_dir(str(tmp_path_factory.mktemp("pairs")), records, num_shards=3)


def test_directory_resolves_to_its_pair_files(out_dir):
    parquet = resolve_files([out_dir])
    assert [os.path.basename(p) for p in parquet] == [
        f"pairs-{s:05d}-of-00003.parquet" for s in range(3)]
    tfrecord = resolve_files([out_dir], "tfrecord")
    assert all(p.endswith(".tfrecord.gz") for p in tfrecord) and len(tfrecord) == 3
    assert resolve_files([os.path.join(out_dir, "*.tfrecord.gz"), out_dir + "/"]) == (
        tfrecord + parquet)


def test_unfinished_directory_is_refused(records, tmp_path):
    unfinished = write_output_dir(str(tmp_path / "run"), records[:4], success=False)
    with pytest.raises(DataError, match="_SUCCESS") as e:
        resolve_files([unfinished])
    assert unfinished in str(e.value)
    with pytest.raises(DataError, match="no such"):
        resolve_files([str(tmp_path / "absent")])
    with pytest.raises(DataError, match="matches no file"):
        resolve_files([str(tmp_path / "absent-*.parquet")])


def test_parquet_and_tfrecord_give_the_same_pairs(out_dir, records):
    from_parquet = [p for f in resolve_files([out_dir], "parquet") for p in read_pairs(f)]
    from_tfrecord = [p for f in resolve_files([out_dir], "tfrecord") for p in read_pairs(f)]
    assert len(from_parquet) == len(from_tfrecord) == len(records)
    for a, b in zip(from_parquet, from_tfrecord):
        assert (a.prompt_id, a.prompt_token_ids, a.chosen_token_ids, a.rejected_token_ids) == (
            b.prompt_id, b.prompt_token_ids, b.chosen_token_ids, b.rejected_token_ids)
        # TFRecord stores float32; Parquet keeps float64.
        assert np.float32(a.ref_chosen_logps) == np.float32(b.ref_chosen_logps)
        assert np.float32(a.ref_rejected_logps) == np.float32(b.ref_rejected_logps)
    assert from_parquet[0].where.endswith("pairs-00000-of-00003.parquet: row 0")


def _bad(records, row, **changes):
    bad = [dict(r) for r in records[:5]]
    bad[row].update(changes)
    return bad


@pytest.mark.parametrize("change, message", [
    ({"chosen_token_ids": []}, "row 3: chosen_token_ids is empty"),
    ({"prompt_token_ids": []}, "row 3: prompt_token_ids is empty"),
    ({"ref_rejected_logps": math.nan}, "row 3: ref_rejected_logps is nan"),
    ({"ref_chosen_logps": math.inf}, "row 3: ref_chosen_logps is inf"),
    ({"ref_chosen_logps": 2.0}, "row 3: ref_chosen_logps is 2.0 > 0"),
    ({"rejected_token_ids": [5, 9999]}, "row 3: rejected_token_ids holds a token id outside"),
])
@pytest.mark.parametrize("fmt", ["parquet", "tfrecord.gz"])
def test_bad_rows_name_file_and_row(records, tmp_path, change, message, fmt):
    path = str(tmp_path / f"bad.{fmt}")
    rows = _bad(records, 3, **change)
    if fmt == "parquet":
        write_parquet(path, rows)
    else:
        write_records(path, (to_example(r) for r in rows))
    with pytest.raises(DataError) as e:
        list(read_pairs(path, vocab_size=256))
    assert str(e.value).startswith(f"{path}: {message}")


def test_missing_column_names_file(records, tmp_path):
    path = str(tmp_path / "pairs-missing.parquet")
    columns = [c for c in records[0] if c != "ref_chosen_logps"]
    write_parquet(path, records[:3], columns=columns)
    with pytest.raises(DataError, match=r"pairs-missing\.parquet: row 0: missing column\(s\) "
                                        r"ref_chosen_logps"):
        list(read_pairs(path))


def test_missing_feature_names_file_and_row(records, tmp_path):
    from rso.example_proto import Example

    path = str(tmp_path / "pairs-missing.tfrecord")
    examples = [to_example(r) for r in records[:3]]
    ex = Example()
    ex.ParseFromString(examples[2])
    del ex.features.feature["rejected_token_ids"]
    examples[2] = ex.SerializeToString()
    write_records(path, examples)
    with pytest.raises(DataError, match=r"pairs-missing\.tfrecord: row 2: missing feature "
                                        r"rejected_token_ids"):
        list(read_pairs(path))


def test_nan_reference_is_fine_when_recomputed(records, tmp_path):
    path = str(tmp_path / "nan.parquet")
    write_parquet(path, _bad(records, 1, ref_chosen_logps=math.nan))
    assert len(list(read_pairs(path, require_reference=False))) == 5


def test_reference_cache_replaces_stored_values(records, tmp_path):
    path = str(tmp_path / "p.parquet")
    write_parquet(path, records[:3])
    pairs = list(read_pairs(path))
    cache = {p.key: (-1.0 - i, -2.0 - i) for i, p in enumerate(pairs)}
    cached = list(read_pairs(path, reference=cache))
    assert [(p.ref_chosen_logps, p.ref_rejected_logps) for p in cached] == [
        (-1.0, -2.0), (-2.0, -3.0), (-3.0, -4.0)]
    del cache[pairs[2].key]
    with pytest.raises(DataError, match="row 2: pair not in the reference cache"):
        list(read_pairs(path, reference=cache))


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(100))
    a = list(shuffle_buffer(items, 16, np.random.default_rng(1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffle_buffer(items, 16, np.random.default_rng(1)))
    assert list(shuffle_buffer(items, 1, np.random.default_rng(1))) == items


def test_bucketing_keeps_every_pair_once_and_cuts_padding(out_dir):
    source = PairSource(resolve_files([out_dir]))
    pairs = list(source.pairs())
    n, bs = len(pairs), 3
    epoch = list(source.epoch(0, seed=7, batch_size=bs, window_batches=4, buffer_size=8))
    assert len(epoch) == math.ceil(n / bs)
    assert sorted(p.where for b in epoch for p in b) == sorted(p.where for p in pairs)
    assert sum(len(b) < bs for b in epoch) <= 1

    def padding(batches):
        return sum(max(p.length for p in b) - p.length for b in batches for p in b)

    unbucketed = list(source.epoch(0, seed=7, batch_size=bs, window_batches=1, buffer_size=8))
    assert padding(epoch) < padding(unbucketed)
    again = list(source.epoch(0, seed=7, batch_size=bs, window_batches=4, buffer_size=8))
    assert [[p.where for p in b] for b in again] == [[p.where for p in b] for b in epoch]
    other = list(source.epoch(1, seed=7, batch_size=bs, window_batches=4, buffer_size=8))
    assert [[p.where for p in b] for b in other] != [[p.where for p in b] for b in epoch]


def test_bucket_windows_are_sorted_without_rng():
    class P:
        def __init__(self, n):
            self.length = n

    batches = list(bucket_batches([P(n) for n in [5, 1, 4, 2, 3, 9]], 2, 3, None))
    assert [[p.length for p in b] for b in batches] == [[1, 2], [3, 4], [5, 9]]


def test_eval_split_is_stable_and_about_the_fraction():
    ids = [f"prompt-{i}" for i in range(4000)]
    held = [i for i in ids if in_eval_split(i, 0.1)]
    assert 300 < len(held) < 500
    assert held == [i for i in ids if in_eval_split(i, 0.1)]
    assert not any(in_eval_split(i, 0.0) for i in ids)


def test_source_keep_rule_and_count(out_dir, tmp_path):
    copy = shutil.copytree(out_dir, str(tmp_path / "copy"))
    source = PairSource(resolve_files([copy]), keep=lambda p: p.length <= 12)
    kept = list(source.pairs())
    assert source.count() == len(kept) and all(p.length <= 12 for p in kept)
