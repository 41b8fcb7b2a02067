"""`rso generate`: the RSO data pipeline, composed from one PTransform per stage.

    read -> render -> generate -> reward -> select+pair -> [re-score in fp32] -> records -> write

Every stage returns a :class:`~beam_pipelines.stage.StageOutput` ``(main, dead_letters,
side)``; the dead letters of all stages are flattened and written with the pairs.

Runs unchanged on the DirectRunner, Dataflow and Flink: every flag that is not a pipeline
setting (see ``config.py``) is a Beam pipeline option (``--runner``, ``--project``, ...).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
import uuid
from collections.abc import Sequence

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
from beam_pipelines.read import COUNTS, ReadPrompts
from beam_pipelines.records import ToRecords
from beam_pipelines.render import RenderPrompts
from beam_pipelines.rescore import RescoreCandidates
from beam_pipelines.reward import ScoreRewards
from beam_pipelines.selection import SUMMARY, SelectAndPair
from beam_pipelines.stage import NAMESPACE, flatten_usage
from beam_pipelines.staging import amend_manifest, commit, discard, recover, staging_dir
from beam_pipelines.write import WriteOutputs, prepare_output
from rso import cost, layout, schema
from rso.config import ConfigError
from rso.layout import is_complete
from rso.ownership import OutputLock, OutputLockedError
from rso.storage import join, open_file

log = logging.getLogger("rso.generate")


def add_scored_candidates(pipeline: beam.Pipeline, config: GenerateConfig
                          ) -> tuple[beam.PCollection, list, list]:
    """read -> render -> generate -> reward, or, with ``config.candidates``, the stored
    candidates (re-scored when reward models are given). Returns the scored
    ``(prompt_id, PromptCandidates)``, the stages (for their dead letters) and the accounting
    counts."""
    if config.candidates:
        stored = pipeline | "ReadCandidates" >> ReadCandidates(config.candidates)
        counts = [stored | "CountGenerated" >> manifest.CountAs(
                      "candidates_generated", lambda kv: len(kv[1].candidates)),
                  stored | "CountReused" >> manifest.CountAs(
                      "candidates_reused", lambda kv: len(kv[1].candidates))]
        if not config.reward_model:
            return stored, [], counts
        cleared = stored | "ClearRewards" >> beam.MapTuple(lambda k, g: (k, clear_rewards(g)))
        scored = cleared | "Reward" >> ScoreRewards(config)
        return scored.main, [scored], counts
    read = pipeline | "Read" >> ReadPrompts(
        config.input, config.input_format, config.max_prompts, config.seed)
    rendered = read.main | "Render" >> RenderPrompts(config)
    generated = rendered.main | "Generate" >> GenerateCandidates(config)
    scored = generated.main | "Reward" >> ScoreRewards(config)
    counts = [read.side[COUNTS],
              generated.main | "CountGenerated" >> manifest.CountAs(
                  "candidates_generated", lambda kv: len(kv[1].candidates)),
              generated.main | "CountDecoded" >> manifest.CountAs(
                  "candidates_decoded", lambda kv: len(kv[1].candidates)),
              generated.main | "CountTokens" >> manifest.CountAs(
                  "tokens_decoded", lambda kv: sum(c.num_tokens for c in kv[1].candidates))]
    return scored.main, [read, rendered, generated, scored], counts


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

    scored, stages, counts = add_scored_candidates(pipeline, config)
    outputs = {}
    if config.write_candidates:
        rows = functools.partial(
            candidate_rows, sft_logp_dtype=config.generation_dtype, policy_model=ids["policy"],
            reward_model=ids["reward"], sampling_params=sampling_params_json(config),
            run_id=run_id)
        outputs["candidates"] = scored | "CandidateRows" >> beam.FlatMap(lambda kv: rows(kv[1]))
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
        write_to or config.output, config.to_dict(), run_id, manifest.package_versions(),
        {**ids, "input": input_id},
        columns=schema.SFT_COLUMNS if best_of_n else schema.COLUMNS,
        prefix=layout.SFT_PREFIX if best_of_n else layout.PAIRS_PREFIX)


def run(config: GenerateConfig, beam_args: Sequence[str] = ()) -> dict:
    """Builds and runs the pipeline, waits for it; returns the manifest it wrote (empty when
    no job ran, e.g. ``--template_location`` only stages a Dataflow template).

    Guarantees (README "Outputs"): every check runs, and the whole graph is built, before
    anything is written; the run then owns ``config.output`` (``_LOCK``, :mod:`rso.ownership`;
    :class:`OutputLockedError` if another run does), writes into a staging directory inside it
    and replaces the previous run only once its own output is complete
    (:mod:`beam_pipelines.staging`): a run that fails leaves the previous output as it was.
    Raises ConfigError (e.g. :class:`OutputExistsError`) before any work.
    """
    beam_args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        # The in-process portable runner that Beam's DirectRunner uses when it cannot start
        # Prism (which it would first try to download): same semantics, no network.
        beam_args.append("--runner=FnApiRunner")
    output = config.output
    run_id = config.resolved_run_id()
    template = any(a.split("=", 1)[0] == "--template_location" for a in beam_args)
    if is_complete(output) and not config.overwrite:
        prepare_output(output)  # raises OutputExistsError with the message users see
    # A staged template runs later, without this launcher: it writes OUTPUT directly.
    staging = None if template else staging_dir(output, f"{run_id}-{uuid.uuid4().hex[:8]}")
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(pipeline, config, write_to=staging)  # every construction-time check
    if template:
        pipeline.run().wait_until_finish()
        log.info("no job was run (template or graph only)")
        return {}
    start = time.time()
    machines = cost.machines_from_beam_args(beam_args)
    with OutputLock.acquire(output, run_id):
        recover(output, keep=staging)
        if is_complete(output) and not config.overwrite:
            prepare_output(output)  # a run that finished while this one was starting
        log.info("run %s: %s -> %s (policy %s, engine %s)", run_id, config.input, output,
                 config.policy, config.engine)
        try:
            submitted = time.perf_counter()
            result = pipeline.run()
            result.wait_until_finish()
            wall = time.perf_counter() - submitted
            if not getattr(result, "has_job", True):
                log.info("no job was run (template or graph only)")
                return {}
            _log_counters(result)
            if not is_complete(staging):
                raise RuntimeError(f"the pipeline finished ({result.state}) without writing "
                                   f"{join(staging, layout.SUCCESS)}; {output} is unchanged")
            _refuse_empty(staging, output)
            amend_manifest(staging, functools.partial(_add_launcher_cost, wall=wall,
                                                      machines=machines))
            commit(staging, output)
        finally:
            discard(staging)
    with open_file(join(output, layout.MANIFEST), "r") as f:
        written = json.load(f)
    log.info("done in %.0f s: %s", time.time() - start,
             json.dumps(written.get("counters", {}), sort_keys=True))
    if isinstance(written.get("cost"), dict):
        for line in cost.format_lines(written["cost"]):
            log.info("cost: %s", line)
    return written


def _add_launcher_cost(doc: dict, wall: float, machines: int | None) -> None:
    """The launcher's own figures in the staged manifest's ``cost`` section (before commit)."""
    if isinstance(doc.get("cost"), dict):
        doc["cost"]["launcher"] = cost.launcher_section(doc["cost"], wall, machines)


class EmptyRunError(ConfigError):
    """A run that read no prompt at all: never committed (it would replace a run with nothing)."""


def _refuse_empty(staging: str, output: str) -> None:
    """:class:`EmptyRunError` when the staged run read no prompt (an empty input file, or every
    record bad): such a run is not committed, and ``output`` keeps what it held."""
    with open_file(join(staging, layout.MANIFEST), "r") as f:
        inputs = json.load(f).get("accounting", {}).get("inputs", {})
    if inputs.get("prompts_read") == 0:
        raise EmptyRunError(
            f"no prompt was read from --input ({inputs.get('input_records')} records, "
            f"{inputs.get('read_dead_letters')} dead letters, {inputs.get('blank_lines')} blank "
            f"lines): nothing to generate; {output} is unchanged")


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
    log.info("beam counters: %s", json.dumps(totals, sort_keys=True))


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


def main(argv: Sequence[str] | None = None, prog: str = "rso generate") -> int:
    """``rso generate``: 0 when done; 2 for a configuration that cannot run (one line on
    stderr, nothing written); 75 when another run owns --output."""
    try:
        config, beam_args = GenerateConfig.parse_args(
            argv, prog=prog, description=__doc__, passthrough=beam_option_parser())
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        run(config, beam_args)
    except OutputLockedError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 75  # EX_TEMPFAIL, as deploy/nightly/refresh.sh uses for its own lock
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {config.output}")
    return 0


# Settings that shaped the stored candidates: `rso select` takes them from the store.
GENERATION_KEYS = ("num_candidates", "max_new_tokens", "temperature", "top_p", "top_k",
                   "engine", "dtype", "max_model_len")


def select_main(argv: Sequence[str] | None = None) -> int:
    """``rso select --candidates DIR --output OUT --policy SFT [--selection --beta ...]``: the
    select, pair, fp32 re-score and write stages on a stored candidate set, no decoding (and no
    reward model unless ``--reward-model`` re-scores the stored candidates). For the same seed
    and settings it writes the records the run that stored the candidates wrote."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        return main(argv, prog="rso select")
    store = next((b for a, b in zip(argv, argv[1:]) if a == "--candidates"), None) or next(
        (a.split("=", 1)[1] for a in argv if a.startswith("--candidates=")), None)
    if not store:
        print("rso select: error: --candidates DIR is required", file=sys.stderr)
        return 2
    try:
        stored = store_manifest(store).get("config", {})
    except ConfigError as e:
        print(f"rso select: error: {e}", file=sys.stderr)
        return 2
    # The generation settings are the store's: they are what the candidates were made with.
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for key in GENERATION_KEYS:
        flag = "--" + key.replace("_", "-")
        if flag in given:
            print(f"rso select: error: {flag} is a generation setting; the candidates in "
                  f"{store} were generated with {key}={stored.get(key)!r} (leave it out)",
                  file=sys.stderr)
            return 2
    inherited = [x for key in GENERATION_KEYS if stored.get(key) is not None
                 for x in ("--" + key.replace("_", "-"), str(stored[key]))]
    return main(inherited + argv, prog="rso select")


if __name__ == "__main__":
    sys.exit(main())
