"""Incremental runs: ``rso generate --reuse-candidates ROOT`` decodes only the prompts whose
candidates no earlier run under ROOT stored (docs/CANDIDATES.md, "Incremental runs").

- :func:`find_partitions` (launcher, construction time, cheap): the complete earlier runs under
  ROOT (direct subdirectories with ``_SUCCESS`` and a candidate store, the run's own
  ``--output`` excluded) whose manifest names the same policy content and the same sampling
  parameters (:func:`beam_pipelines.candidates.sampling_params_json`), newest first; their
  store files are checked against the sha256 their manifests recorded (a corrupt partition is
  a ConfigError: it is repaired or moved out of ROOT, never silently decoded again).
- :class:`MatchStoredCandidates` (Beam): joins tonight's rendered prompts with the stored rows
  on prompt_id (CoGroupByKey); a prompt is reused when the newest partition holding it stored
  the same rendered prompt token ids. The stores are read by the workers, never by the
  launcher.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam

from beam_pipelines.candidates import (
    clear_rewards,
    group_from_rows,
    sampling_params_json,
    store_manifest,
    stored_sampling_params,
    verified_store_files,
)
from beam_pipelines.config import content_part, same_path
from beam_pipelines.elements import PromptCandidates, RenderedPrompt
from beam_pipelines.manifest import reused_from_count
from beam_pipelines.read import parquet_rows
from beam_pipelines.stage import StageOutput, StageParDo
from rso import layout
from rso.config import ConfigError
from rso.console import command_log
from rso.model_id import model_id
from rso.storage import basename, escape, exists, glob, join, parent

STAGE = "reuse"
FLAG = "--reuse-candidates"
DECODE = "decode"  # prompts no partition holds (or holds for other token ids): decoded tonight
RESCORE = "rescore"  # reused candidates whose reward models changed: rewards cleared


@dataclasses.dataclass(frozen=True)
class Partition:
    """A complete earlier run whose stored candidates can be reused."""
    path: str
    run_id: str
    written_at: str  # the manifest's UTC ISO time: newest first
    files: tuple[str, ...]  # its candidate files, checksums verified
    same_rewards: bool  # its rewards were computed by tonight's reward models and settings

    @property
    def name(self) -> str:
        return basename(self.path)


# Reward settings besides the model ids (content, weights, combination) that change a score.
REWARD_SETTINGS = ("reward_max_length", "pairwise_debias")


def _reward_key(reward_id: str, config: dict) -> tuple:
    return (tuple(content_part(part) for part in reward_id.split("+")),
            tuple(config.get(k) for k in REWARD_SETTINGS))


def find_partitions(config: Any) -> tuple[list[Partition], list[dict[str, str]]]:
    """The partitions under ``config.reuse_candidates`` whose candidates ``config`` may reuse,
    newest first (manifest ``written_at``, then name), and the complete ones it may not, as
    ``{"path", "reason"}``. A ROOT that does not exist yet (the first night) holds none. Logs
    a warning when ``config.output`` is not directly under ROOT (later runs will not reuse what
    this one decodes). Raises ConfigError naming a partition whose manifest cannot be read or
    whose store files differ from their recorded checksums."""
    root = config.reuse_candidates
    under_root = same_path(parent(config.output), root)
    if not under_root:
        command_log().warning(
            "%s %s: --output %s is not directly under it, so later runs with %s %s will not "
            "reuse what this run decodes; write each run to ROOT/dt=YYYY-MM-DD", FLAG, root,
            config.output, FLAG, root)
    if not exists(root):
        if under_root:  # the first night
            command_log().info("%s %s does not exist yet: nothing to reuse", FLAG, root)
        else:
            command_log().warning("%s %s does not exist: nothing to reuse", FLAG, root)
        return [], []
    policy = content_part(model_id(config.policy))
    sampling = sampling_params_json(config)
    rewards = _reward_key(config.model_ids()["reward"], config.to_dict())
    found, skipped = [], []
    for success in glob(join(escape(root), "*", layout.SUCCESS)):
        path = success.rstrip("/").rsplit("/", 1)[0]  # as listed (parent() makes it absolute)
        if same_path(path, config.output):
            continue
        manifest = store_manifest(path, FLAG)
        if not manifest.get("files", {}).get("candidates") and not layout.candidate_files(path):
            skipped.append({"path": path, "reason": "no candidate store"})
            continue
        stored = manifest.get("config", {})
        if content_part(manifest.get("models", {}).get("policy", "")) != policy:
            skipped.append({"path": path, "reason": "another policy"})
            continue
        try:
            same_sampling = stored_sampling_params(stored) == sampling
        except ConfigError:
            same_sampling = False
        if not same_sampling:
            skipped.append({"path": path, "reason": "other sampling parameters"})
            continue
        files = verified_store_files(path, FLAG, manifest)
        found.append(Partition(
            path, str(manifest.get("run_id", "")), str(manifest.get("written_at", "")),
            tuple(files),
            _reward_key(manifest.get("models", {}).get("reward", ""), stored) == rewards))
    found.sort(key=lambda p: (p.written_at, p.name), reverse=True)
    for p in found:
        command_log().info("reusing candidates of %s (run %s)", p.path, p.run_id)
    for s in skipped:
        command_log().info("not reusing %s: %s", s["path"], s["reason"])
    return found, skipped


class _Match(beam.DoFn):
    """``(prompt_id, {"prompt": [RenderedPrompt], "stored": [(rank, row)]})`` -> reused
    ``(prompt_id, PromptCandidates)`` (main, stored rewards), :data:`RESCORE` (rewards
    cleared) or :data:`DECODE` (RenderedPrompt)."""

    def __init__(self, same_rewards: Sequence[bool]):
        self._same_rewards = list(same_rewards)

    def process(self, element: tuple[str, dict]) -> Iterable[Any]:
        prompt_id, joined = element
        prompts: list[RenderedPrompt] = list(joined["prompt"])
        if not prompts:
            return  # stored, but not in tonight's prompt file
        stored = list(joined["stored"])
        rank = min((r for r, _ in stored), default=None)
        rows = [row for r, row in stored if r == rank]
        for prompt in prompts:
            group = _reusable(prompt, rows)
            if group is None:
                yield beam.pvalue.TaggedOutput(DECODE, prompt)
                continue
            yield beam.pvalue.TaggedOutput(reused_from_count(rank), 1)
            if self._same_rewards[rank]:
                yield prompt_id, group
            else:
                yield beam.pvalue.TaggedOutput(RESCORE, (prompt_id, clear_rewards(group)))


def _reusable(prompt: RenderedPrompt, rows: list[dict]) -> PromptCandidates | None:
    """The stored group of ``prompt`` with tonight's rendered prompt (its messages, for reward
    models), or None when ``rows`` are empty, rendered other token ids, or are not one
    complete group (a prompt_id the stored run read twice)."""
    if not rows or [int(t) for t in rows[0]["prompt_token_ids"]] != list(prompt.prompt_token_ids):
        return None
    try:
        group = group_from_rows(rows)
    except ValueError:
        return None
    return dataclasses.replace(group, prompt=prompt)


class MatchStoredCandidates(beam.PTransform):
    """``PCollection[RenderedPrompt]`` -> :class:`StageOutput` whose ``main`` holds the reused
    ``(prompt_id, PromptCandidates)`` with their stored rewards and whose ``side`` holds
    :data:`DECODE` (the RenderedPrompts to decode), :data:`RESCORE` (reused groups, rewards
    cleared, for the reward stage) and, per partition rank, ``(name, 1)`` counts of the
    prompts reused from it (:func:`reused_from_count`; summed into the manifest's ``reuse``)."""

    def __init__(self, partitions: Sequence[Partition]):
        super().__init__()
        self._partitions = list(partitions)

    def expand(self, rendered: beam.PCollection) -> StageOutput:
        p = rendered.pipeline
        keyed = rendered | "KeyPrompts" >> beam.Map(lambda r: (r.prompt_id, r))
        rank_of = {part.name: i for i, part in enumerate(self._partitions)}
        files = [f for part in self._partitions for f in part.files]
        if files:
            stored = (p
                      | "StoreFiles" >> beam.Create(files)
                      | "ReadStores" >> beam.FlatMap(  # names, not patterns: e.g. run[1]
                          lambda f: ((f, row) for row in parquet_rows(f)))
                      | "KeyRows" >> beam.Map(lambda fr: (
                          fr[1]["prompt_id"], (rank_of[basename(parent(fr[0]))],
                                               fr[1]))))
        else:
            stored = p | "NoStores" >> beam.Create([])
        tags = [DECODE, RESCORE, *(reused_from_count(i) for i in range(len(self._partitions)))]
        joined = {"prompt": keyed, "stored": stored} | "Join" >> beam.CoGroupByKey()
        out = joined | "Match" >> StageParDo(
            STAGE, _Match([part.same_rewards for part in self._partitions]), side_tags=tags)
        counts = [p | "NoCounts" >> beam.Create([])]
        counts += [out.side[t] | f"Name_{t}" >> beam.Map(lambda n, t=t: (t, n))
                   for t in tags[2:]]
        side = {DECODE: out.side[DECODE], RESCORE: out.side[RESCORE],
                "counts": tuple(counts) | "FlattenCounts" >> beam.Flatten()}
        return StageOutput(out.main, out.dead_letters, side, out.usage)
