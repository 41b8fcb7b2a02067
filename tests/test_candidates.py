"""The candidate store's rows round-trip to the element the select stage sees."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_pipelines.candidates import candidate_rows, clear_rewards, group_from_rows
from beam_pipelines.elements import Candidate, PromptCandidates, RenderedPrompt
from rso import schema


def group():
    prompt = RenderedPrompt("p1", "Human: hi\n\nAssistant:", (1, 5, 6))
    return PromptCandidates(prompt, [
        Candidate("a", (7, 2), "stop", -1.5, reward=0.25, reward_scores=(0.5, -1.0)),
        Candidate("b 🙂", (8, 9, 9), "length", -3.0, reward=-2.0, reward_scores=(-1.0, 2.0)),
    ])


def test_rows_follow_the_schema_and_round_trip_through_parquet(tmp_path):
    rows = candidate_rows(group(), sft_logp_dtype="bfloat16", policy_model="pol@sha256:1",
                          reward_model="rm*1", sampling_params="{}", run_id="run-x")
    for row in rows:
        schema.validate_record(row, columns=schema.CANDIDATE_COLUMNS)
    path = tmp_path / "candidates-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema.arrow_schema(schema.CANDIDATE_COLUMNS)),
                   path)
    back = pq.read_table(path).to_pylist()
    assert group_from_rows(list(reversed(back))) == group()


def test_bad_rows_are_named():
    rows = candidate_rows(group(), sft_logp_dtype="float32", policy_model="p", reward_model="r",
                          sampling_params="{}", run_id="r")
    with pytest.raises(ValueError, match="candidate_index"):
        group_from_rows(rows[1:])


def test_clear_rewards():
    cleared = clear_rewards(group())
    assert [c.reward for c in cleared.candidates] == [None, None]
    assert cleared.candidates[0].token_ids == (7, 2)


def test_every_column_is_documented():
    import pathlib

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "CANDIDATES.md").read_text()
    missing = [c.name for c in schema.CANDIDATE_COLUMNS if f"`{c.name}`" not in doc]
    assert not missing
