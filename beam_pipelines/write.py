"""The pipeline's write stage: the SPEC 5 output directory, with ``_SUCCESS`` written last.

::

    OUTPUT/pairs-SSSSS-of-NNNNN.parquet       records (rso.schema.arrow_schema)
    OUTPUT/pairs-SSSSS-of-NNNNN.tfrecord.gz   the same records as tf.train.Example
    OUTPUT/dead_letter-SSSSS-of-NNNNN.jsonl   DeadLetter.to_json(), one per line
    OUTPUT/manifest.json                      config, versions, counters, statistics
    OUTPUT/reward_distribution.png, chosen_vs_rejected.png, acceptance.png
    OUTPUT/_SUCCESS                           empty; exists only when all of the above do

A reader ignores a directory without ``_SUCCESS``. ``rso generate`` applies :class:`WriteOutputs`
to a staging directory inside OUTPUT and moves the complete run into OUTPUT afterwards
(:mod:`beam_pipelines.staging`), so a failed run never destroys the previous one.
"""
from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import manifest as M
from beam_pipelines.plots import PLOT_NAMES, render_plots
from beam_pipelines.stage import MAIN, USAGE, MeteredDoFn, StageParDo, dead_letter
from rso import layout, schema
from rso.checksums import CHECKSUMS
from rso.checksums import digest as checksum_digest
from rso.config import ConfigError
from rso.cost import Usage, metered
from rso.layout import MANIFEST, SUCCESS, is_complete
from rso.storage import basename, beam_escape

log = logging.getLogger(__name__)

STAGE = "write"
# Every file a run writes; prepare_output removes exactly these (and Beam's temp folders).
OUTPUT_PATTERNS = (*layout.output_patterns(PLOT_NAMES), layout.BEAM_TEMP + "/*")
INFINITE_ALLOWED = frozenset({"beta"})  # every other float column must be finite


class OutputExistsError(ConfigError):
    """The output directory holds a complete run and overwrite was not asked for."""


def join(base: str, name: str) -> str:
    return FileSystems.join(base, name)


def prepare_output(output: str, overwrite: bool = False,
                   keep: Iterable[str] = ()) -> list[str]:
    """Deletes a previous run's files from ``output``; returns the paths removed.

    A complete output (with ``_SUCCESS``) is refused with :class:`OutputExistsError` unless
    ``overwrite``; then, or when a previous run stopped before ``_SUCCESS``, the files a run writes
    (:data:`OUTPUT_PATTERNS` and Beam's temp folders, ``_SUCCESS`` first) are deleted, except
    those named in ``keep``. Other files (a user's notes, ``_LOCK``, ``_staging-*``) are left
    alone. ``rso generate`` calls this when committing a complete new run
    (:func:`beam_pipelines.staging.commit`), never before a run; the write stage calls it once
    every file of its run is written, before the manifest, to drop a failed earlier attempt's
    files from a directory the job writes directly (a template).
    """
    if is_complete(output) and not overwrite:
        raise OutputExistsError(
            f"--output {output} already holds a complete run ({SUCCESS} exists); pass "
            f"--overwrite to replace it or choose another directory")
    removed = []
    success = join(output, SUCCESS)
    if FileSystems.exists(success):
        FileSystems.delete([success])
        removed.append(success)
    keep = set(keep)
    patterns = [join(beam_escape(output), p) for p in OUTPUT_PATTERNS]
    stale = sorted({m.path for r in FileSystems.match(patterns) for m in r.metadata_list
                    if basename(m.path) not in keep})
    if FileSystems.get_scheme(output) is None:  # local: Beam's match lists no folders
        stale += sorted(glob.glob(os.path.join(glob.escape(output), layout.BEAM_TEMP)))
    if stale:
        FileSystems.delete(stale)
        removed.extend(stale)
    return removed


def write_file(path: str, data: bytes, mime_type: str) -> None:
    """Writes a whole file through Beam's FileSystems (local or gs://)."""
    with FileSystems.create(path, mime_type=mime_type,
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


class _Validate(beam.DoFn):
    """Record -> the record with exactly the schema's columns; invalid -> dead letter."""

    def __init__(self, columns: tuple[schema.Column, ...]):
        self._columns = columns
        self._names = {c.name for c in columns}

    def process(self, record: Any) -> Iterable:
        pid = record.get("prompt_id") if isinstance(record, Mapping) else None
        try:
            if not isinstance(record, Mapping):
                raise schema.SchemaError(f"expected a dict, got {type(record).__name__}")
            schema.validate_record(record, where=f"record of prompt {pid}", columns=self._columns)
            extra = sorted(set(record) - self._names)
            if extra:
                raise schema.SchemaError(f"record of prompt {pid}: unknown column(s) "
                                         f"{', '.join(map(str, extra))}")
            bad = [c.name for c in self._columns if c.kind == schema.DOUBLE and c.name not in
                   INFINITE_ALLOWED and not math.isfinite(record[c.name])]
            if bad:
                raise schema.SchemaError(f"record of prompt {pid}: non-finite {', '.join(bad)}")
        except schema.SchemaError as e:
            yield dead_letter(STAGE, "invalid_record", str(e),
                              pid if isinstance(pid, str) else None,
                              dict(record) if isinstance(record, Mapping) else repr(record))
            return
        yield {c.name: list(record[c.name]) if c.kind == schema.INT_LIST else record[c.name]
               for c in self._columns}


class _ToExample(beam.DoFn):
    """Record -> serialized tf.train.Example bytes."""

    def __init__(self, columns: tuple[schema.Column, ...]):
        self._columns = columns

    def process(self, record: Mapping[str, Any]) -> Iterable[bytes]:
        yield schema.to_example(record, columns=self._columns)


class _Finish(beam.DoFn):
    """Writes manifest.json, the plots and then ``_SUCCESS``; runs once, after every write.

    The written files arrive as side inputs, so this runs only when all shards are final; the
    manifest records each record file's sha256 and size (:mod:`rso.checksums`).
    """

    def __init__(self, output: str, config: Mapping, run_id: str, versions: Mapping,
                 models: Mapping, reuse: Mapping | None = None):
        self._output, self._config, self._run_id = output, dict(config), run_id
        self._versions, self._models = dict(versions), dict(models)
        self._reuse = None if reuse is None else dict(reuse)

    def process(self, _, totals, dead_counts, reward_stats, records_written, record_files,
                example_files, dead_files, counts=None, candidate_files=(),
                usage=()) -> Iterable[str]:
        # A job that writes its output directly (a template, a Flex Template launch) may follow
        # a failed attempt at the same directory: its files are not this run's and would be
        # read with it (a stale shard of another shard count), so they go before the manifest.
        # In a staging directory there is nothing to remove. A complete output is refused.
        ours = {basename(p) for p in [*record_files, *example_files, *dead_files,
                                       *candidate_files]}
        stale = prepare_output(self._output, keep=ours)
        if stale:
            log.warning("removed %d file(s) of an earlier, failed attempt at %s: %s", len(stale),
                        self._output, ", ".join(basename(p) for p in stale[:5]))
        checksums = {}
        hashing = Usage(STAGE)  # the write stage's last work the manifest can still count
        with metered(hashing):
            for path in [*record_files, *example_files, *candidate_files]:  # .gz as stored
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                    checksums[basename(path)] = checksum_digest(f)
        files = {"parquet": [basename(p) for p in record_files],
                 "tfrecord": [basename(p) for p in example_files],
                 "dead_letters": [basename(p) for p in dead_files],
                 "plots": list(PLOT_NAMES), CHECKSUMS: checksums}
        if candidate_files:
            files["candidates"] = [basename(p) for p in candidate_files]
        doc = M.build_manifest(config=self._config, run_id=self._run_id,
                               versions=self._versions, models=self._models, totals=totals,
                               dead_letters=dead_counts, reward_stats=reward_stats,
                               records_written=records_written, files=files,
                               counts=counts, reuse=self._reuse,
                               usage=[*usage, hashing])
        write_file(join(self._output, MANIFEST), M.dumps(doc), "application/json")
        for name, png in render_plots(doc).items():
            write_file(join(self._output, name), png, "image/png")
        success = join(self._output, SUCCESS)
        write_file(success, b"", "text/plain")
        yield success


class WriteOutputs(beam.PTransform):
    """Writes the SPEC 5 output directory from ``{"pairs", "dead_letters", "summaries"}``.

    Apply it to a dict of PCollections (a missing key means an empty PCollection)::

        success = {"pairs": records, "dead_letters": dead, "summaries": summaries} | WriteOutputs(
            cfg.output, cfg.to_dict(), run_id, M.package_versions(), {"policy": ..., ...})

    - ``pairs``: record dicts with exactly the ``columns`` (default ``rso.schema.COLUMNS``; pass
      ``rso.schema.SFT_COLUMNS`` and ``prefix="sft"`` for best-of-n). A record that fails
      ``rso.schema.validate_record``, has extra keys or a non-finite float (other than ``beta``)
      becomes a dead letter ``(stage="write", reason="invalid_record")``; any other exception
      while one record is checked, ``(stage="write", reason="unexpected_error")``
      (:class:`beam_pipelines.stage.StageParDo`).
    - ``dead_letters``: :class:`DeadLetter` from every stage (flattened here with the write
      stage's own).
    - ``summaries``: one :class:`PromptSummary` per prompt that reached selection.
    - ``candidates``: candidate-store rows (``rso.schema.CANDIDATE_COLUMNS``), written as
      ``candidates-*.parquet`` when given (``--write-candidates``).
    - ``counts``: ``(name, n)`` stage counts, summed per name, for the manifest's accounting
      (:func:`beam_pipelines.manifest.accounting_section`).
    - ``usage``: :class:`rso.cost.Usage` records of the stages (their ``usage`` outputs), summed
      into the manifest's ``cost`` section with this stage's own (stage ``write``: record
      checks, Example encoding, checksums; Beam's file sinks are not inside a DoFn of ours and
      are not counted).
    - ``config_dict`` (secret-looking keys are redacted), ``run_id``, ``versions`` (e.g.
      :func:`beam_pipelines.manifest.package_versions`) and ``models`` (model ids) go into
      manifest.json as given. Nothing is read from the environment.
    - ``reuse``: with ``--reuse-candidates``, ``{"root", "partitions": [{"path", "run_id",
      "rescored"}], "skipped": [{"path", "reason"}]}`` (newest partition first); the manifest's
      ``reuse`` section adds each partition's ``prompts_reused`` count.
    - ``num_shards``: 0 lets the runner choose; an empty input still writes one valid empty
      Parquet file (with the schema) and one empty TFRecord file.

    Returns a PCollection holding the ``_SUCCESS`` path, produced after everything is written.
    """

    def __init__(self, output: str, config_dict: Mapping[str, Any], run_id: str,
                 versions: Mapping[str, str], models: Mapping[str, Any],
                 columns: tuple[schema.Column, ...] = schema.COLUMNS,
                 prefix: str = layout.PAIRS_PREFIX,
                 num_shards: int = 0, reuse: Mapping[str, Any] | None = None):
        super().__init__()
        self._reuse = reuse
        self._output, self._config, self._run_id = output, config_dict, run_id
        self._versions, self._models = versions, models
        self._columns, self._prefix, self._num_shards = tuple(columns), prefix, num_shards

    def expand(self, inputs: Mapping[str, beam.PCollection]) -> beam.PCollection:
        unknown = set(inputs) - {"pairs", "dead_letters", "summaries", "counts", "candidates",
                                 "usage"}
        if unknown:
            raise ValueError(f"WriteOutputs: unknown input(s) {sorted(unknown)}; expected "
                             f"pairs, dead_letters, summaries, counts, candidates, usage")
        if is_complete(self._output):
            raise OutputExistsError(f"--output {self._output} already holds a complete run; "
                                    f"call prepare_output(output, overwrite) first")
        p = next(iter(inputs.values())).pipeline

        def get(name: str) -> beam.PCollection:
            return inputs[name] if name in inputs else p | f"No{name}" >> beam.Create([])

        columns, out = self._columns, self._output
        checked = get("pairs") | "Validate" >> StageParDo(STAGE, _Validate(columns))
        records = checked.main
        dead = (get("dead_letters"), checked.dead_letters) | "AllDeadLetters" >> beam.Flatten()
        summaries = get("summaries")

        record_files = records | "WriteParquet" >> beam.io.WriteToParquet(
            join(out, self._prefix), schema.arrow_schema(columns), codec="snappy",
            file_name_suffix=layout.PARQUET_SUFFIX, num_shards=self._num_shards)
        examples = records | "ToExample" >> beam.ParDo(
            MeteredDoFn(STAGE, _ToExample(columns))).with_outputs(USAGE, main=MAIN)
        example_files = (examples[MAIN]
                         | "WriteTFRecord" >> beam.io.WriteToTFRecord(
                             join(out, self._prefix), file_name_suffix=layout.TFRECORD_SUFFIX,
                             compression_type=CompressionTypes.GZIP,
                             num_shards=self._num_shards))
        dead_files = (dead
                      | "DeadLetterJson" >> beam.Map(lambda d: d.to_json())
                      | "WriteDeadLetters" >> beam.io.WriteToText(
                          join(out, layout.DEAD_LETTER_PREFIX),
                          file_name_suffix=layout.DEAD_LETTER_SUFFIX,
                          num_shards=self._num_shards))

        if "candidates" in inputs:  # the candidate store (docs/CANDIDATES.md), Parquet only
            candidate_files = inputs["candidates"] | "WriteCandidates" >> beam.io.WriteToParquet(
                join(out, layout.CANDIDATES_PREFIX), schema.arrow_schema(schema.CANDIDATE_COLUMNS),
                codec="snappy", file_name_suffix=layout.PARQUET_SUFFIX,
                num_shards=self._num_shards)
        else:
            candidate_files = p | "NoCandidateFiles" >> beam.Create([])

        totals = summaries | "Totals" >> beam.CombineGlobally(M.SummaryTotalsFn())
        dead_counts = dead | "CountDeadLetters" >> beam.CombineGlobally(M.CountByFn())
        written = records | "CountRecords" >> beam.combiners.Count.Globally()
        values = ((summaries | "SummaryRewards" >> beam.FlatMap(M.summary_values),
                   records | "RecordRewards" >> beam.FlatMap(M.record_values))
                  | "AllRewards" >> beam.Flatten())
        reward_stats = values | "RewardStatistics" >> M.RewardStatistics()
        usage = ((get("usage"), checked.usage, examples[USAGE])
                 | "AllUsage" >> beam.Flatten()
                 | "SumUsage" >> beam.CombineGlobally(M.UsageTotalsFn()))

        side = beam.pvalue
        return (p
                | "Once" >> beam.Create([None])
                | "Finish" >> beam.ParDo(
                    _Finish(out, self._config, self._run_id, self._versions, self._models,
                            self._reuse),
                    side.AsSingleton(totals), side.AsSingleton(dead_counts),
                    side.AsSingleton(reward_stats), side.AsSingleton(written),
                    side.AsList(record_files), side.AsList(example_files),
                    side.AsList(dead_files),
                    side.AsDict(get("counts") | "SumCounts" >> beam.CombinePerKey(sum)),
                    candidate_files=side.AsList(candidate_files),
                    usage=side.AsSingleton(usage)))
