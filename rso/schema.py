"""The preference-pair record of SPEC section 5, defined once for the pipeline and the trainer.

One record per pair. Parquet columns and tf.train.Example features carry the same names:
strings are bytes features, integers int64, floats float (float32 in TFRecord; Parquet keeps
float64). Names follow Hugging Face TRL's preference format so TRL can read the files directly.
Nothing here imports Beam or torch.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from rso.example_proto import Example

STRING, INT, DOUBLE, INT_LIST, DOUBLE_LIST = "string", "int", "double", "int_list", "double_list"


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: str
    doc: str


COLUMNS: tuple[Column, ...] = (
    Column("prompt_id", STRING, "stable id: given by the input, else sha256 of the prompt text"),
    Column("prompt", STRING, "the rendered prompt text"),
    Column("prompt_token_ids", INT_LIST, "token ids of the rendered prompt"),
    Column("chosen", STRING, "chosen response text"),
    Column("rejected", STRING, "rejected response text"),
    Column("chosen_token_ids", INT_LIST, "generated token ids of the chosen response"),
    Column("rejected_token_ids", INT_LIST, "generated token ids of the rejected response"),
    Column("ref_chosen_logps", DOUBLE, "sft_logp of the chosen response (SPEC 1)"),
    Column("ref_rejected_logps", DOUBLE, "sft_logp of the rejected response (SPEC 1)"),
    Column("chosen_reward", DOUBLE, "reward of the chosen response"),
    Column("rejected_reward", DOUBLE, "reward of the rejected response"),
    Column("chosen_finish_reason", STRING, '"stop" or "length"'),
    Column("rejected_finish_reason", STRING, '"stop" or "length"'),
    Column("selection", STRING, "selection method (SPEC 3)"),
    Column("pairing", STRING, "pairing method (SPEC 4)"),
    Column("beta", DOUBLE, "sampling beta (inf allowed)"),
    Column("num_candidates", INT, "N after dedup"),
    Column("num_accepted", INT, "k actually kept for this prompt"),
    Column("policy_model", STRING, "policy model id with revision or content hash"),
    Column("reward_model", STRING, "reward model id(s) with revision or content hash"),
    Column("run_id", STRING, "the run that wrote the record"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)

# best-of-n writes SFT targets (RAFT) instead of pairs: TRL's prompt-completion format.
SFT_COLUMNS: tuple[Column, ...] = (
    Column("prompt_id", STRING, "stable id of the prompt"),
    Column("prompt", STRING, "the rendered prompt text"),
    Column("prompt_token_ids", INT_LIST, "token ids of the rendered prompt"),
    Column("completion", STRING, "the best of the N responses"),
    Column("completion_token_ids", INT_LIST, "its generated token ids"),
    Column("ref_logps", DOUBLE, "its sft_logp (SPEC 1)"),
    Column("reward", DOUBLE, "its reward"),
    Column("finish_reason", STRING, '"stop" or "length"'),
    Column("selection", STRING, "selection method (best-of-n)"),
    Column("policy_model", STRING, "policy model id with revision or content hash"),
    Column("reward_model", STRING, "reward model id(s) with revision or content hash"),
    Column("run_id", STRING, "the run that wrote the record"),
)
# The candidate store (`rso generate --write-candidates`, `candidates-*.parquet`): every scored
# candidate of every prompt, one row each, in the order the engine returned them, so that
# `rso select` and `rso sweep` can re-select without decoding again. See docs/CANDIDATES.md.
CANDIDATE_COLUMNS: tuple[Column, ...] = (
    Column("prompt_id", STRING, "stable id of the prompt"),
    Column("prompt", STRING, "the rendered prompt text"),
    Column("prompt_token_ids", INT_LIST, "token ids of the rendered prompt"),
    Column("prompt_messages", STRING, "JSON list of [role, content]: the conversation before "
           "rendering, which a reward model renders with its own template"),
    Column("candidate_index", INT, "position among the prompt's candidates (engine order, 0..N-1)"),
    Column("response", STRING, "the response text: the tokenizer's decoding of response_token_ids"),
    Column("response_token_ids", INT_LIST, "generated token ids (EOS included when generated)"),
    Column("finish_reason", STRING, '"stop" or "length"'),
    Column("sft_logp", DOUBLE, "sum of raw log pi_sft over the response tokens (SPEC 1)"),
    Column("sft_logp_dtype", STRING, "precision sft_logp was computed in (e.g. bfloat16)"),
    Column("reward_scores", DOUBLE_LIST, "each reward model's score, in --reward-model order"),
    Column("reward", DOUBLE, "the combined reward used for selection (SPEC 2)"),
    Column("policy_model", STRING, "policy model id with content hash"),
    Column("reward_model", STRING, "reward model id(s) with content hash and weights"),
    Column("sampling_params", STRING, "JSON: n, temperature, top_p, top_k, max_new_tokens, seed"),
    Column("run_id", STRING, "the run that generated the candidate"),
)
BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}

_ARROW_TYPES = {STRING: pa.string(), INT: pa.int64(), DOUBLE: pa.float64(),
                INT_LIST: pa.list_(pa.int64()), DOUBLE_LIST: pa.list_(pa.float64())}


class SchemaError(ValueError):
    """A record that does not follow SPEC 5; the message names the column."""


def arrow_schema(columns: tuple[Column, ...] = COLUMNS) -> pa.Schema:
    return pa.schema([pa.field(c.name, _ARROW_TYPES[c.kind], nullable=False) for c in columns])


def validate_record(record: Mapping[str, Any], where: str = "record",
                    columns: tuple[Column, ...] = COLUMNS) -> None:
    """Raises SchemaError if a column is missing or of the wrong kind."""
    missing = [c.name for c in columns if c.name not in record]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {', '.join(missing)}")
    for c in columns:
        v = record[c.name]
        ok = {
            STRING: isinstance(v, str),
            INT: isinstance(v, int) and not isinstance(v, bool),
            DOUBLE: isinstance(v, (int, float)) and not isinstance(v, bool),
            INT_LIST: isinstance(v, (list, tuple)) and all(isinstance(t, int) for t in v),
            DOUBLE_LIST: isinstance(v, (list, tuple)) and all(
                isinstance(t, (int, float)) and not isinstance(t, bool) for t in v),
        }[c.kind]
        if not ok:
            raise SchemaError(f"{where}: column {c.name} must be {c.kind}, got {type(v).__name__}")


def to_example(record: Mapping[str, Any], columns: tuple[Column, ...] = COLUMNS) -> bytes:
    """Serialises a record as a tf.train.Example."""
    ex = Example()
    features = ex.features.feature
    for c in columns:
        v = record[c.name]
        if c.kind == STRING:
            features[c.name].bytes_list.value.append(v.encode("utf-8"))
        elif c.kind == INT:
            features[c.name].int64_list.value.append(int(v))
        elif c.kind == DOUBLE:
            features[c.name].float_list.value.append(float(v))
        elif c.kind == DOUBLE_LIST:
            features[c.name].float_list.value.extend(float(t) for t in v)
        else:
            features[c.name].int64_list.value.extend(int(t) for t in v)
    return ex.SerializeToString(deterministic=True)


def from_example(data: bytes, where: str = "record",
                 columns: tuple[Column, ...] = COLUMNS) -> dict[str, Any]:
    """Parses a tf.train.Example into a record; raises SchemaError for a missing feature."""
    ex = Example()
    ex.ParseFromString(data)
    features = ex.features.feature
    out: dict[str, Any] = {}
    for c in columns:
        if c.name not in features:
            raise SchemaError(f"{where}: missing feature {c.name}")
        f = features[c.name]
        if c.kind == STRING:
            out[c.name] = f.bytes_list.value[0].decode("utf-8") if f.bytes_list.value else ""
        elif c.kind == INT:
            out[c.name] = int(f.int64_list.value[0]) if f.int64_list.value else 0
        elif c.kind == DOUBLE:
            out[c.name] = float(f.float_list.value[0]) if f.float_list.value else math.nan
        elif c.kind == DOUBLE_LIST:
            out[c.name] = [float(t) for t in f.float_list.value]
        else:
            out[c.name] = list(f.int64_list.value)
    return out
