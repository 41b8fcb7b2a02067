"""`rso generate`: the RSO data pipeline, composed from one PTransform per stage.

    read -> render -> generate -> reward -> select+pair -> [re-score in fp32] -> records -> write

Every stage returns a :class:`~beam_pipelines.stage.StageOutput` ``(main, dead_letters,
side)``; the dead letters of all stages are flattened and written with the pairs.

Runs unchanged on the DirectRunner, Dataflow and Flink: every flag that is not a pipeline
setting (see ``config.py``) is a Beam pipeline option (``--runner``, ``--project``, ...).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import manifest
from beam_pipelines.config import GenerateConfig
from beam_pipelines.generate import GenerateCandidates, warn_if_not_pi_sft
from beam_pipelines.read import ReadPrompts
from beam_pipelines.render import RenderPrompts
from beam_pipelines.rescore import RescoreCandidates
from beam_pipelines.reward import ScoreRewards
from beam_pipelines.records import ToRecords
from beam_pipelines.selection import SUMMARY, SelectAndPair
from beam_pipelines.stage import NAMESPACE
from beam_pipelines.write import WriteOutputs, prepare_output
from rso import layout, schema
from rso.model_id import model_id
from rso.storage import exists, join, open_file

log = logging.getLogger("rso.generate")


def model_ids(config: GenerateConfig) -> dict[str, str]:
    """``policy`` and ``reward`` ids (name + content hash) as records and the manifest carry."""
    rewards = [f"{model_id(r.path)}*{r.weight:g}" + (":pairwise" if r.kind == "pairwise" else "")
               for r in config.reward_model]
    return {"policy": model_id(config.policy), "reward": "+".join(rewards)}


def build_pipeline(pipeline: beam.Pipeline, config: GenerateConfig) -> beam.PCollection:
    """Adds every stage to ``pipeline``; returns the PCollection holding the _SUCCESS path."""
    config.validate()
    run_id = config.resolved_run_id()
    ids = model_ids(config)
    warn_if_not_pi_sft(config)

    read = pipeline | "Read" >> ReadPrompts(
        config.input, config.input_format, config.max_prompts, config.seed)
    rendered = read.main | "Render" >> RenderPrompts(config)
    generated = rendered.main | "Generate" >> GenerateCandidates(config)
    scored = generated.main | "Reward" >> ScoreRewards(config)
    selected = scored.main | "Select" >> SelectAndPair(config)
    stages = [read, rendered, generated, scored, selected]
    kept = selected.main
    if config.rescore_in_fp32:
        stages.append(kept | "Rescore" >> RescoreCandidates(config))
        kept = stages[-1].main
    records = kept | "ToRecords" >> ToRecords(config, run_id, ids["policy"], ids["reward"])
    stages.append(records)

    best_of_n = config.selection == "best-of-n"
    return {
        "pairs": records.main,
        "dead_letters": tuple(s.dead_letters for s in stages) | "DeadLetters" >> beam.Flatten(),
        "summaries": selected.side[SUMMARY],
    } | "Write" >> WriteOutputs(
        config.output, config.to_dict(), run_id, manifest.package_versions(), ids,
        columns=schema.SFT_COLUMNS if best_of_n else schema.COLUMNS,
        prefix=layout.SFT_PREFIX if best_of_n else layout.PAIRS_PREFIX)


def run(config: GenerateConfig, beam_args: Sequence[str] = ()) -> dict:
    """Builds and runs the pipeline, waits for it; returns the manifest it wrote (empty when
    no job ran, e.g. ``--template_location`` only stages a Dataflow template)."""
    beam_args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        # The in-process portable runner that Beam's DirectRunner uses when it cannot start
        # Prism (which it would first try to download): same semantics, no network.
        beam_args.append("--runner=FnApiRunner")
    prepare_output(config.output, config.overwrite)
    start = time.time()
    log.info("run %s: %s -> %s (policy %s, engine %s)", config.resolved_run_id(), config.input,
             config.output, config.policy, config.engine)
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(pipeline, config)
    result = pipeline.run()
    result.wait_until_finish()
    if not getattr(result, "has_job", True):
        log.info("no job was run (template or graph only)")
        return {}
    _log_counters(result)
    manifest_path = join(config.output, layout.MANIFEST)
    if not exists(manifest_path):
        raise RuntimeError(f"the pipeline finished ({result.state}) without writing "
                           f"{manifest_path}")
    with open_file(manifest_path, "r") as f:
        written = json.load(f)
    log.info("done in %.0f s: %s", time.time() - start,
             json.dumps(written.get("counters", {}), sort_keys=True))
    return written


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


def main(argv: Sequence[str] | None = None) -> int:
    config, beam_args = GenerateConfig.parse_args(
        argv, prog="rso generate", description=__doc__, allow_unknown=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(config, beam_args)
    print(f"wrote {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
