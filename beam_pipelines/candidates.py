"""The candidate store: every scored candidate, kept so that selection can be redone without
decoding (``rso generate --write-candidates``, then ``rso select`` / ``rso sweep``).

One Parquet row per candidate (``rso.schema.CANDIDATE_COLUMNS``, documented in
``docs/CANDIDATES.md``), written as ``OUTPUT/candidates-SSSSS-of-NNNNN.parquet`` by the run's
write stage, so it becomes visible with the run's ``_SUCCESS``. A prompt's rows carry
``candidate_index`` 0..N-1 in the order the engine returned them (the order selection sees:
dedup keeps first occurrences and Algorithm 1 indexes into it), so reading them back and
grouping by prompt gives exactly the element the select stage saw in the original run.

- :func:`candidate_rows` / :func:`group_from_rows`: element <-> rows, pure functions.
- :class:`ReadCandidates`: a store -> ``(prompt_id, PromptCandidates)``, as the reward stage
  emits them.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam

from beam_pipelines.elements import Candidate, PromptCandidates, RenderedPrompt
from beam_pipelines.read import parquet_rows
from rso import layout
from rso.config import ConfigError
from rso.storage import join, open_file

# The settings that shape the candidates a policy samples for a rendered prompt.
SAMPLING_KEYS = ("num_candidates", "temperature", "top_p", "top_k", "max_new_tokens", "seed",
                 "max_model_len", "engine", "dtype")


def sampling_params_json(config: Any) -> str:
    """The sampling parameters that shaped the candidates, as canonical JSON (sorted keys): the
    store's ``sampling_params`` column and part of what makes stored candidates reusable."""
    return json.dumps({
        "n": config.num_candidates, "temperature": config.temperature, "top_p": config.top_p,
        "top_k": config.top_k, "max_new_tokens": config.max_new_tokens, "seed": config.seed,
        "max_model_len": config.max_model_len, "engine": config.engine,
        "dtype": config.generation_dtype}, sort_keys=True)


def stored_sampling_params(stored_config: Mapping[str, Any]) -> str:
    """:func:`sampling_params_json` of the run whose manifest ``config`` is ``stored_config``
    (ConfigError when its sampling settings are not valid settings)."""
    from beam_pipelines.config import GenerateConfig

    return sampling_params_json(GenerateConfig.from_dict(
        {k: stored_config[k] for k in SAMPLING_KEYS if k in stored_config}))


def candidate_rows(group: PromptCandidates, *, sft_logp_dtype: str, policy_model: str,
                   reward_model: str, sampling_params: str, run_id: str) -> list[dict]:
    """One store row per candidate of a scored group (rewards set), in candidate order."""
    p = group.prompt
    return [{
        "prompt_id": p.prompt_id, "prompt": p.prompt,
        "prompt_token_ids": list(p.prompt_token_ids),
        "prompt_messages": json.dumps([list(m) for m in p.messages]), "candidate_index": i,
        "response": c.text, "response_token_ids": list(c.token_ids),
        "finish_reason": c.finish_reason, "sft_logp": float(c.sft_logp),
        "sft_logp_dtype": sft_logp_dtype,
        "reward_scores": [float(s) for s in (c.reward_scores or (c.reward,))],
        "reward": float(c.reward), "policy_model": policy_model, "reward_model": reward_model,
        "sampling_params": sampling_params, "run_id": run_id,
    } for i, c in enumerate(group.candidates)]


def group_from_rows(rows: Sequence[Mapping[str, Any]]) -> PromptCandidates:
    """The scored group of one prompt from its store rows (any order). ValueError when the rows
    disagree on the prompt or their indices are not 0..N-1 once each."""
    rows = sorted(rows, key=lambda r: r["candidate_index"])
    first = rows[0]
    indices = [r["candidate_index"] for r in rows]
    if indices != list(range(len(rows))):
        raise ValueError(f"prompt {first['prompt_id']}: candidate_index values {indices[:8]} "
                         f"are not 0..{len(rows) - 1}")
    if any(list(r["prompt_token_ids"]) != list(first["prompt_token_ids"]) for r in rows):
        raise ValueError(f"prompt {first['prompt_id']}: rows disagree on prompt_token_ids")
    # Stores written before prompt_messages existed have none: reward models then see the
    # rendered prompt as one user turn.
    messages = tuple((str(role), str(content)) for role, content
                     in json.loads(first.get("prompt_messages") or "[]"))
    prompt = RenderedPrompt(first["prompt_id"], first["prompt"],
                            tuple(int(t) for t in first["prompt_token_ids"]), messages)
    return PromptCandidates(prompt, [Candidate(
        text=r["response"], token_ids=tuple(int(t) for t in r["response_token_ids"]),
        finish_reason=r["finish_reason"], sft_logp=float(r["sft_logp"]),
        reward=float(r["reward"]), reward_scores=tuple(float(s) for s in r["reward_scores"]))
        for r in rows])


def store_manifest(directory: str, flag: str = "--candidates") -> dict:
    """The manifest of a complete run (ConfigError when the directory, its ``_SUCCESS`` or a
    readable manifest is missing)."""
    from rso import storage

    if not storage.exists(directory):
        raise ConfigError(f"{flag} {directory}: no such directory")
    if not layout.is_complete(directory):
        raise ConfigError(f"{flag} {directory}: no {layout.SUCCESS}: not a complete run")
    try:
        with open_file(join(directory, layout.MANIFEST), "r") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {directory}: cannot read its {layout.MANIFEST}: {e}") \
            from None


def store_identity(directory: str) -> tuple[str, str]:
    """(content id of the input, reward model ids) of the run that wrote the store: what a
    re-selection's run id is derived from, so the same settings give the same run id."""
    models = store_manifest(directory).get("models", {})
    return models.get("input", directory), models.get("reward", "")


def check_store(directory: str, policy: str) -> None:
    """ConfigError unless ``directory`` is a complete store whose candidates ``policy`` (the
    same weights, by content id) generated: its stored sft_logp are that policy's, and fp32
    re-scoring and the records' ``policy_model`` use it."""
    from rso.model_id import model_id

    stored = store_manifest(directory).get("models", {}).get("policy")
    given = model_id(policy)
    if stored and stored.rsplit("@", 1)[-1] != given.rsplit("@", 1)[-1]:
        raise ConfigError(f"--candidates {directory} were generated by {stored}; --policy "
                          f"{policy} is {given}: give the policy that generated them")


def verified_store_files(directory: str, flag: str = "--candidates",
                         manifest: dict | None = None) -> list[str]:
    """The store's files, each checked against the sha256 its run recorded in the manifest
    (``manifest``, when the caller has read it already), and every file the manifest lists
    present: ConfigError (naming ``flag``) for a run without a store or a missing, corrupt,
    truncated or replaced file."""
    from rso.checksums import ChecksumError, verify

    manifest = store_manifest(directory, flag) if manifest is None else manifest
    files = layout.candidate_files(directory)
    listed = manifest.get("files", {}).get("candidates") or []
    if not files and not listed:
        raise ConfigError(f"{flag} {directory}: the run wrote no candidate store (run "
                          f"rso generate with --write-candidates)")
    try:
        verify(files, manifest, directory, listed)
    except ChecksumError as e:
        raise ConfigError(f"{flag}: {e}") from None
    return files


class ReadCandidates(beam.PTransform):
    """A candidate store -> ``(prompt_id, PromptCandidates)`` with stored rewards, one element
    per prompt (rows grouped by prompt_id). The files are checked against their recorded
    sha256 first."""

    def __init__(self, directory: str):
        super().__init__()
        self._files = verified_store_files(directory)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (pbegin
                | "Files" >> beam.Create(self._files)
                | "ReadParquet" >> beam.FlatMap(parquet_rows)  # by name, not as a glob
                | "KeyByPrompt" >> beam.Map(lambda row: (row["prompt_id"], row))
                | "GroupByPrompt" >> beam.GroupByKey()
                | "ToGroups" >> beam.MapTuple(lambda pid, rows: (pid, group_from_rows(list(rows)))))


def clear_rewards(group: PromptCandidates) -> PromptCandidates:
    """``group`` with every candidate's reward cleared, for re-scoring with other models."""
    return dataclasses.replace(group, candidates=[
        dataclasses.replace(c, reward=None, reward_scores=()) for c in group.candidates])
