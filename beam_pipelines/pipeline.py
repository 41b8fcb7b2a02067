"""`rso generate`: the RSO data pipeline, composed from one PTransform per stage.

    read -> render -> generate -> reward -> select+pair -> [re-score in fp32] -> records -> write

Every stage returns a :class:`~beam_pipelines.stage.StageOutput` ``(main, dead_letters,
side)``; the dead letters of all stages are flattened and written with the pairs.

Runs unchanged on the DirectRunner, Dataflow and Flink: every flag that is not a pipeline
setting (see ``config.py``) is a Beam pipeline option (``--runner``, ``--project``, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import manifest
from beam_pipelines.candidates import (
    ReadCandidates,
    candidate_rows,
    clear_rewards,
    sampling_params_json,
    store_manifest,
)
from beam_pipelines.config import GenerateConfig
from beam_pipelines.generate import GenerateCandidates, warn_if_not_pi_sft
from beam_pipelines.handlers import torch_threads_kept
from beam_pipelines.read import COUNTS, ReadPrompts
from beam_pipelines.records import ToRecords
from beam_pipelines.render import RenderPrompts
from beam_pipelines.rescore import RescoreCandidates
from beam_pipelines.reuse import DECODE, RESCORE, MatchStoredCandidates, Partition, find_partitions
from beam_pipelines.reward import ScoreRewards
from beam_pipelines.selection import SUMMARY, SelectAndPair
from beam_pipelines.stage import NAMESPACE, flatten_usage
from beam_pipelines.staging import amend_manifest, commit, discard, recover, staging_dir
from beam_pipelines.write import WriteOutputs, prepare_output
from rso import cost, layout, schema
from rso.config import ConfigError
from rso.console import command, command_log
from rso.layout import is_complete
from rso.ownership import OutputLock, OutputLockedError
from rso.storage import cleaned_up_on_failure, glob, join, open_file


def add_scored_candidates(pipeline: beam.Pipeline, config: GenerateConfig,
                          partitions: Sequence[Partition] = ()
                          ) -> tuple[beam.PCollection, beam.PCollection, list, list]:
    """read -> render -> generate -> reward, or, with ``config.candidates``, the stored
    candidates (re-scored when reward models are given). With ``config.reuse_candidates``,
    rendered prompts that one of ``partitions`` stored (:mod:`beam_pipelines.reuse`) skip
    generation; their stored rewards are kept, or, when that partition's reward models differ,
    cleared and re-scored. Returns the scored ``(prompt_id, PromptCandidates)`` of every prompt,
    those scored by this run (what its candidate store holds), the stages (for their dead
    letters) and the accounting counts."""
    if config.candidates:
        stored = pipeline | "ReadCandidates" >> ReadCandidates(config.candidates)
        counts = [stored | "CountPromptsReused" >> manifest.CountAs("prompts_reused"),
                  stored | "CountGenerated" >> manifest.CountAs(
                      "candidates_generated", lambda kv: len(kv[1].candidates)),
                  stored | "CountReused" >> manifest.CountAs(
                      "candidates_reused", lambda kv: len(kv[1].candidates))]
        if not config.reward_model:
            return stored, stored, [], counts
        cleared = stored | "ClearRewards" >> beam.MapTuple(lambda k, g: (k, clear_rewards(g)))
        scored = cleared | "Reward" >> ScoreRewards(config)
        return scored.main, scored.main, [scored], counts
    read = pipeline | "Read" >> ReadPrompts(
        config.input, config.input_format, config.max_prompts, config.seed)
    rendered = read.main | "Render" >> RenderPrompts(config)
    stages: list = [read, rendered]
    to_decode, reused, to_rescore = rendered.main, [], []
    counts = [read.side[COUNTS]]
    if config.reuse_candidates:
        match = rendered.main | "MatchStored" >> MatchStoredCandidates(partitions)
        stages.append(match)
        to_decode, reused, to_rescore = match.side[DECODE], [match.main], [match.side[RESCORE]]
        every_reused = (*reused, *to_rescore) | "AllReused" >> beam.Flatten()
        counts += [match.side["counts"],
                   every_reused | "CountPromptsReused" >> manifest.CountAs("prompts_reused"),
                   every_reused | "CountReused" >> manifest.CountAs(
                       "candidates_reused", lambda kv: len(kv[1].candidates))]
    generated = to_decode | "Generate" >> GenerateCandidates(config)
    stages.append(generated)
    new = ((generated.main, *to_rescore) | "ToScore" >> beam.Flatten()) if to_rescore \
        else generated.main
    scored = new | "Reward" >> ScoreRewards(config)
    stages.append(scored)
    every = ((scored.main, *reused) | "ScoredAndReused" >> beam.Flatten()) if reused \
        else scored.main
    before_reward = ((new, *reused) | "BeforeReward" >> beam.Flatten()) if reused else new
    counts += [before_reward | "CountGenerated" >> manifest.CountAs(
                   "candidates_generated", lambda kv: len(kv[1].candidates)),
               generated.main | "CountPromptsDecoded" >> manifest.CountAs("prompts_decoded"),
               generated.main | "CountDecoded" >> manifest.CountAs(
                   "candidates_decoded", lambda kv: len(kv[1].candidates)),
               generated.main | "CountTokens" >> manifest.CountAs(
                   "tokens_decoded", lambda kv: sum(c.num_tokens for c in kv[1].candidates))]
    return every, scored.main, stages, counts


def build_pipeline(pipeline: beam.Pipeline, config: GenerateConfig,
                   write_to: str | None = None) -> beam.PCollection:
    """Adds every stage to ``pipeline``; returns the PCollection holding the _SUCCESS path.
    ``write_to``: where the output directory is written (default ``config.output``; ``run``
    passes a staging directory)."""
    config.validate()
    run_id = config.resolved_run_id()
    ids = config.model_ids()
    input_id = config.input_id()
    warn_if_not_pi_sft(config)

    partitions, skipped = find_partitions(config) if config.reuse_candidates else ([], [])
    scored, scored_here, stages, counts = add_scored_candidates(pipeline, config, partitions)
    outputs = {}
    if config.stores_candidates:
        rows = functools.partial(
            candidate_rows, sft_logp_dtype=config.generation_dtype, policy_model=ids["policy"],
            reward_model=ids["reward"], sampling_params=sampling_params_json(config),
            run_id=run_id)
        outputs["candidates"] = scored_here | "CandidateRows" >> beam.FlatMap(
            lambda kv: rows(kv[1]))
    selected = scored | "Select" >> SelectAndPair(config)
    stages.append(selected)
    kept = selected.main
    if config.rescore_in_fp32:
        stages.append(kept | "Rescore" >> RescoreCandidates(config))
        kept = stages[-1].main
    records = kept | "ToRecords" >> ToRecords(config, run_id, ids["policy"], ids["reward"])
    stages.append(records)
    counts.append(records.main | "CountRecords" >> manifest.CountAs("records_built"))

    best_of_n = config.selection == "best-of-n"
    usage = flatten_usage("Usage", *stages)
    if usage is not None:
        outputs["usage"] = usage
    return {
        **outputs,
        "pairs": records.main,
        "dead_letters": tuple(s.dead_letters for s in stages) | "DeadLetters" >> beam.Flatten(),
        "summaries": selected.side[SUMMARY],
        "counts": tuple(counts) | "Counts" >> beam.Flatten(),
    } | "Write" >> WriteOutputs(
        write_to or config.output,
        {**config.to_dict(), "dtype": config.generation_dtype,
         "write_candidates": config.stores_candidates},  # resolved: what this run did
        run_id, manifest.package_versions(),
        {**ids, "input": input_id},
        columns=schema.SFT_COLUMNS if best_of_n else schema.COLUMNS,
        prefix=layout.SFT_PREFIX if best_of_n else layout.PAIRS_PREFIX,
        reuse=None if not config.reuse_candidates else {
            "root": config.reuse_candidates,
            "partitions": [{"path": p.path, "run_id": p.run_id, "rescored": not p.same_rewards}
                           for p in partitions],
            "skipped": skipped})


def run(config: GenerateConfig, beam_args: Sequence[str] = (), wait: bool = True) -> dict:
    """Builds and runs the pipeline, waits for it; returns the manifest it wrote (empty when
    no job ran, e.g. ``--template_location`` only stages a Dataflow template).

    Guarantees (README "Outputs"): every check runs, and the whole graph is built, before
    anything is written; the run then owns ``config.output`` (``_LOCK``, :mod:`rso.ownership`;
    :class:`OutputLockedError` if another run does), writes into a staging directory inside it
    and replaces the previous run only once its own output is complete
    (:mod:`beam_pipelines.staging`): a run that fails leaves the previous output as it was.
    Raises ConfigError (e.g. :class:`OutputExistsError`) before any work.

    ``wait=False`` (a Dataflow Flex Template launcher, which must not outlive the submission):
    the job is submitted and not waited for; it writes OUTPUT directly, ``_SUCCESS`` last, as a
    staged template does (no lock, no staging; ``--overwrite`` is refused, since a failing job
    would leave a mix of two runs).
    """
    with staged_run(config, beam_args, wait=wait) as staging:
        pass
    if staging is None:
        return {}
    with open_file(join(config.output, layout.MANIFEST), "r") as f:
        written = json.load(f)
    command_log().info("done in %.0f s: %s", time.time() - staging.started,
                       json.dumps(written.get("counters", {}), sort_keys=True))
    decoding = written.get("accounting", {}).get("decoding", {})
    if decoding:
        reused = decoding.get("prompts_reused", 0)
        command_log().info(
            "decoded %s prompts (%s candidates, %s tokens); reused %s prompts (%s candidates)%s",
            *(decoding.get(k, 0) for k in ("prompts_decoded", "candidates_decoded",
                                           "tokens_decoded", "prompts_reused",
                                           "candidates_reused")),
            # the counters' *_generated count every candidate that reached selection
            ", decoded by the run that stored them (counted in tokens_generated above)"
            if reused else "")
    if isinstance(written.get("cost"), dict):
        for line in cost.format_lines(written["cost"]):
            command_log().info("cost: %s", line)
    return written


@dataclasses.dataclass(frozen=True)
class Staged:
    """A run's complete staging directory (``path``) and the ``time.time()`` it started at."""

    path: str
    started: float


@contextlib.contextmanager
def staged_run(config: GenerateConfig, beam_args: Sequence[str] = (),
               wait: bool = True) -> Iterator[Staged | None]:
    """:func:`run` in two steps, for a caller that publishes several outputs together (`rso
    evaluate`): runs the pipeline into a staging directory inside ``config.output`` and yields
    it, complete (``_SUCCESS`` written, readable with the usual readers), while holding
    ``config.output``'s lock; when the block exits normally, commits it into
    ``config.output``; when the block raises, discards it, and ``config.output`` keeps what it
    held. Yields None when no job was waited for (a template, or ``wait=False``). Same checks
    and errors as :func:`run`."""
    beam_args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        # The in-process portable runner that Beam's DirectRunner uses when it cannot start
        # Prism (which it would first try to download): same semantics, no network.
        beam_args.append("--runner=FnApiRunner")
    output = config.output
    run_id = config.resolved_run_id()
    template = any(a.split("=", 1)[0] == "--template_location" for a in beam_args)
    if not wait and config.overwrite:
        raise ConfigError("--overwrite is refused for a job that is not waited for (Flex "
                          "Template): it writes --output directly; choose a new directory")
    if is_complete(output) and not config.overwrite:
        prepare_output(output)  # raises OutputExistsError with the message users see
    # A staged template runs later, without this launcher: it writes OUTPUT directly.
    direct = template or not wait
    staging = None if direct else staging_dir(output, f"{run_id}-{uuid.uuid4().hex[:8]}")
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(pipeline, config, write_to=staging)  # every construction-time check
    if template:
        pipeline.run().wait_until_finish()
        command_log().info("no job was run (template or graph only)")
        yield None
        return
    if not wait:
        pipeline.run()
        command_log().info("submitted run %s -> %s (not waiting; _SUCCESS marks it done)",
                           run_id, output)
        yield None
        return
    start = time.time()
    machines = cost.machines_from_beam_args(beam_args)
    with OutputLock.acquire(output, run_id), torch_threads_kept():
        recover(output, keep=staging)
        if is_complete(output) and not config.overwrite:
            prepare_output(output)  # a run that finished while this one was starting
        command_log().info("run %s: %s -> %s (policy %s, engine %s)", run_id,
                           config.candidates or config.input, output, config.policy,
                           config.engine)
        try:
            submitted = time.perf_counter()
            result = pipeline.run()
            result.wait_until_finish()
            wall = time.perf_counter() - submitted
            if not getattr(result, "has_job", True):
                command_log().info("no job was run (template or graph only)")
                yield None
                return
            _log_counters(result)
            if not is_complete(staging):
                raise RuntimeError(f"the pipeline finished ({result.state}) without writing "
                                   f"{join(staging, layout.SUCCESS)}; {output} is unchanged")
            _refuse_empty(staging, output)
            amend_manifest(staging, functools.partial(_add_launcher_cost, wall=wall,
                                                      machines=machines))
            yield Staged(staging, start)
            commit(staging, output)
        finally:
            discard(staging)


def _add_launcher_cost(doc: dict, wall: float, machines: int | None) -> None:
    """The launcher's own figures in the staged manifest's ``cost`` section (before commit)."""
    if isinstance(doc.get("cost"), dict):
        doc["cost"]["launcher"] = cost.launcher_section(doc["cost"], wall, machines)


class EmptyRunError(ConfigError):
    """A run that read no prompt at all: never committed (it would replace a run with nothing)."""


def _refuse_empty(staging: str, output: str) -> None:
    """:class:`EmptyRunError` when the staged run read no prompt (an empty input file, or every
    record bad), or wrote no record because every prompt became a dead letter (a model that
    fails on every input): such a run is not committed, and ``output`` keeps what it held."""
    with open_file(join(staging, layout.MANIFEST), "r") as f:
        doc = json.load(f)
    inputs = doc.get("accounting", {}).get("inputs", {})
    if inputs.get("prompts_read") == 0:
        raise EmptyRunError(
            f"no prompt was read from --input ({inputs.get('input_records')} records, "
            f"{inputs.get('read_dead_letters')} dead letters, {inputs.get('blank_lines')} blank "
            f"lines): nothing to generate; {output} is unchanged")
    dead = doc.get("dead_letters", {})
    if doc.get("counters", {}).get("records_written") == 0 and dead.get("total"):
        raise EmptyRunError(
            f"no record was written: {dead['total']} dead letters "
            f"({json.dumps(dead.get('by_stage_reason'), sort_keys=True)}), the first: "
            f"{_first_dead_letter(staging)}; {output} is unchanged")


def _first_dead_letter(output: str) -> str:
    """``stage/reason for prompt_id: detail`` of the first line of ``output``'s dead letters."""
    for path in sorted(glob(join(output, f"{layout.DEAD_LETTER_PREFIX}-*"
                                         f"{layout.DEAD_LETTER_SUFFIX}"))):
        with open_file(path, "r") as f:
            for line in f:
                d = json.loads(line)
                return (f"{d.get('stage')}/{d.get('reason')} for {d.get('prompt_id')}: "
                        f"{d.get('detail')}")
    return "none found"


def _log_counters(result: beam.runners.runner.PipelineResult) -> None:
    """Beam's own counters (truncations, per-stage counts...), where the runner reports them."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners report no metrics to the launcher
        return
    totals: dict[str, int] = {}
    for c in counters:
        if c.key.metric.namespace.startswith(NAMESPACE):
            totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + c.committed
    command_log().info("beam counters: %s", json.dumps(totals, sort_keys=True))


def beam_option_parser() -> argparse.ArgumentParser:
    """A parser of every flag Beam knows: each registered ``PipelineOptions`` subclass adds its
    own, as ``PipelineOptions.get_all_options`` does (apache_beam/options/pipeline_options.py)."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen: dict[str, type] = {}
    stack = list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop(0)
        seen.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
        stack.extend(cls.__subclasses__())
    for cls in seen.values():
        try:
            cls._add_argparse_args(parser)  # noqa: SLF001 - Beam's own registration hook
        except argparse.ArgumentError:  # a class registered twice (Beam issue 18197)
            pass
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "rso generate", wait: bool = True,
         description: str | None = None, hidden: Sequence[str] = ()) -> int:
    """``rso generate``: 0 when done (``wait=False``: submitted, see :func:`run`); 2 for a
    configuration that cannot run (one line on stderr, nothing written); 75 when another run
    owns --output. A run that fails or is refused after it ran (e.g. no prompt was read)
    removes --output again, and the parents it made, when they are left empty."""
    try:
        config, beam_args = GenerateConfig.parse_args(
            argv, prog=prog, description=description or GENERATE_HELP,
            passthrough=beam_option_parser(), hidden=hidden)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        with cleaned_up_on_failure(config.output) if wait else contextlib.nullcontext():
            run(config, beam_args, wait=wait)
    except OutputLockedError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 75  # EX_TEMPFAIL, as deploy/nightly/refresh.sh uses for its own lock
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    # a log line like the others (hidden with the nested run's details inside rso demo)
    command_log().info("wrote %s" if wait else "submitted; it writes %s", config.output)
    return 0


# Settings that shaped the stored candidates: `rso select` takes them from the store.
GENERATION_KEYS = ("num_candidates", "max_new_tokens", "temperature", "top_p", "top_k",
                   "engine", "dtype", "max_model_len")
# Settings of decoding or of choosing prompts, which `rso select` does not do: refused there (they
# would be recorded in its manifest without effect).
NOT_SELECT_KEYS = ("max_prompts", "enforce_eager", "vllm_gpu_memory_utilization",
                   "vllm_cpu_kv_cache_gib", "reuse_candidates")
# Selection settings: `rso select` defaults each one the user does not give (flag or --config)
# to the store's run, so `--beta 1` changes only beta.
SELECTION_KEYS = ("selection", "num_samples", "beta", "beta_scale", "rest_threshold", "dedup",
                  "pairing", "tie_margin", "seed", "rescore", "reward_combination",
                  "reward_std_penalty", "pairwise_debias", "reward_max_length")


def _inherited_flags(stored: dict, keys: Sequence[str]) -> list[str]:
    """``--flag value`` for each of ``keys`` the store's run config sets (booleans as
    ``--flag`` / ``--no-flag``)."""
    flags: list[str] = []
    for key in keys:
        value, flag = stored.get(key), "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag VALUE`` or ``--flag=VALUE``), or None."""
    return next((b for a, b in zip(argv, argv[1:]) if a == flag), None) or next(
        (a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")), None)


def _config_file_keys(argv: Sequence[str]) -> set[str]:
    """The keys of the ``--config`` YAML in ``argv`` (none when it is absent or unreadable:
    parsing reports that)."""
    path = _flag_value(argv, "--config")
    if not path:
        return set()
    import yaml

    try:
        with open_file(path, "r") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return set()
    return {str(k).replace("-", "_") for k in data} if isinstance(data, dict) else set()


def _warn_if_incremental(store: str, doc: dict) -> None:
    """Warns when the store was written by a ``--reuse-candidates`` run: it holds only the
    candidates that run decoded (or re-scored), not those of the prompts it reused, so
    re-selecting from it alone covers part of that run's prompt file."""
    reused = (doc.get("reuse") or {}).get("reused_from") or []
    if not reused:
        return
    names = ", ".join(f"{p.get('path')} ({p.get('prompts_reused')} prompts)" for p in reused)
    counts = (doc.get("accounting") or {}).get("decoding") or {}
    command_log().warning(
        "--candidates %s is an incremental run's store (--reuse-candidates): it holds only the "
        "%s prompts that run decoded, not the %s it reused from %s, so these records cover "
        "part of its prompt file. To re-select over the whole prompt file, run rso generate "
        "--input <that prompt file> --reuse-candidates %s with the new selection settings "
        "instead: it reuses every stored candidate and decodes nothing again "
        "(docs/CANDIDATES.md, Incremental runs)",
        store, counts.get("prompts_decoded", "?"), counts.get("prompts_reused", "?"), names,
        (doc.get("reuse") or {}).get("root", "ROOT"))


GENERATE_HELP = """`rso generate`: build RSO preference pairs from prompts.

Reads the prompts of --input, samples --num-candidates responses per prompt from the SFT
--policy (--engine vllm or transformers), scores every response with --reward-model, keeps
--num-samples per prompt by statistical rejection sampling (--selection rso, --beta; or top-k,
random, ...), pairs them, re-scores the pairs' SFT log-probabilities in fp32 and writes the pair
records, manifest.json and the dead letters into --output (visible only when complete). Every
flag not listed below is passed to Apache Beam as a pipeline option (--runner, --project, ...):
the same command runs on the DirectRunner, Dataflow and Flink. README.md and SPEC.md describe
the records and the manifest."""


SELECT_HELP = """`rso select`: re-select a stored candidate set (`rso generate --write-candidates`)
without decoding: the select, pair, fp32 re-score and write stages.

The generation settings (and the prompts) are the store's: giving one is an error. Every
selection setting not given (flag or --config) defaults to the value of the run that stored the
candidates, NOT to the default listed below, so `--beta 1` alone changes only beta.
`--reward-model` re-scores the stored candidates with another reward model."""


def select_main(argv: Sequence[str] | None = None) -> int:
    """``rso select --candidates DIR --output OUT --policy SFT [--selection --beta ...]``: the
    select, pair, fp32 re-score and write stages on a stored candidate set, no decoding (and no
    reward model unless ``--reward-model`` re-scores the stored candidates). The generation
    settings are the store's; every selection setting not given defaults to the store's run
    (:data:`SELECTION_KEYS`), so for the same settings it writes the records the run that
    stored the candidates wrote, and ``--beta 1`` alone changes only beta."""
    with command("rso.select"):
        return _select_main(list(sys.argv[1:] if argv is None else argv))


def _select_main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        # the settings the store decides are not select's to give: not listed
        return main(argv, prog="rso select", description=SELECT_HELP,
                    hidden=(*GENERATION_KEYS, *NOT_SELECT_KEYS, "input", "input_format"))
    try:
        full = select_argv(argv, warn=True)
    except ConfigError as e:
        print(f"rso select: error: {e}", file=sys.stderr)
        return 2
    return main(full, prog="rso select")


def select_argv(argv: Sequence[str], warn: bool = False) -> list[str]:
    """The ``rso generate`` flags that `rso select ARGV` runs with: the candidate store's
    generation settings, and its selection settings where ARGV (flags or ``--config``) leaves
    them out, before ARGV. Raises ConfigError (no ``--candidates``, an unreadable store, a
    generation setting or ``--input`` given). ``warn``: log the incremental-store warning."""
    argv = list(argv)
    store = _flag_value(argv, "--candidates")
    if not store:
        raise ConfigError("--candidates DIR is required")
    store_doc = store_manifest(store)
    stored = store_doc.get("config", {})
    if warn:
        _warn_if_incremental(store, store_doc)
    # The generation settings are the store's: they are what the candidates were made with.
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for key in GENERATION_KEYS:
        flag = "--" + key.replace("_", "-")
        if flag in given:
            raise ConfigError(f"{flag} is a generation setting; the candidates in {store} were "
                              f"generated with {key}={stored.get(key)!r} (leave it out)")
    for flag in ("--input", "--input-format"):
        if flag in given:
            raise ConfigError(f"{flag}: the prompts are the ones stored in {store} (leave it "
                              f"out)")
    for key in NOT_SELECT_KEYS:
        flag = "--" + key.replace("_", "-")
        if flag in given or "--no-" + flag[2:] in given:
            raise ConfigError(f"{flag} does not apply to rso select: it decodes nothing and "
                              f"re-selects every prompt in {store} (leave it out)")
    named = {f[len("--no-"):] if f.startswith("--no-") else f[2:] for f in given}
    from_file = _config_file_keys(argv)
    defaults = [k for k in SELECTION_KEYS
                if k.replace("_", "-") not in named and k not in from_file]
    return _inherited_flags(stored, GENERATION_KEYS) + _inherited_flags(stored, defaults) + argv


if __name__ == "__main__":
    sys.exit(main())
