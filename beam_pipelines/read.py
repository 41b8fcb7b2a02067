"""The pipeline's read stage: input files -> deduplicated, optionally sharded PromptInputs.

``ReadPrompts`` reads JSONL (plain or .gz, any mix of the record forms of
:mod:`beam_pipelines.prompts`, HH-RLHF included) or Parquet, from a local path, a glob or gs://.
Lines are read as bytes, so bad UTF-8 becomes a dead letter instead of failing the run.
"""
from __future__ import annotations

import functools
from typing import Iterable, NamedTuple

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import prompts as P
from beam_pipelines.manifest import CountAs
from beam_pipelines.dead_letters import DEAD_LETTER, count, dead_letter
from beam_pipelines.elements import PromptInput
from beam_pipelines.seeding import prompt_seed
from rso.config import ConfigError

STAGE = "read"
BLANK = "blank"  # tagged output of skipped blank lines (counted in the manifest)


class ReadResult(NamedTuple):
    """What :class:`ReadPrompts` returns: unpack it or use the attributes."""
    prompts: beam.PCollection  # PCollection[PromptInput], one per distinct prompt_id
    dead_letters: beam.PCollection  # PCollection[DeadLetter], stage "read"
    # PCollection[(name, n)] for the manifest's accounting: input_records, blank_lines,
    # prompts_not_in_shard, prompts_read
    counts: beam.PCollection


PARQUET_SUFFIXES = (".parquet", ".parq")


def resolve_format(files: list[str], input_format: str, input_pattern: str = "") -> str:
    """"parquet" or "text" for the matched files (auto: Parquet if they all end in .parquet).

    ConfigError for an auto input that mixes Parquet and text files.
    """
    if input_format != "auto":
        return "parquet" if input_format == "parquet" else "text"
    parquet = [f.endswith(PARQUET_SUFFIXES) for f in files]
    if any(parquet) and not all(parquet):
        raise ConfigError(f"--input {input_pattern!r} matches both Parquet and other files; "
                          f"narrow the pattern or set --input-format")
    return "parquet" if parquet and all(parquet) else "text"


def check_input(input_pattern: str) -> list[str]:
    """The files an input pattern matches; ConfigError if none (checked at construction)."""
    if not input_pattern:
        raise ConfigError("--input is required")
    try:
        result = FileSystems.match([input_pattern])[0]
    except Exception as e:  # noqa: BLE001 - Beam raises several kinds for bad patterns
        raise ConfigError(f"--input {input_pattern!r}: cannot list it: {e}") from e
    files = sorted(m.path for m in result.metadata_list)
    if not files:
        raise ConfigError(f"--input {input_pattern!r} matches no file")
    return files


class _ParseLine(beam.DoFn):
    """(file name, raw line bytes) -> PromptInput, or a dead letter with the escaped line."""

    def __init__(self, kind: str):
        self._kind = kind

    def process(self, element: tuple[str, bytes]) -> Iterable:
        source, line = element
        count("input_records")
        if P.is_blank(line):
            count("blank_lines")
            yield beam.pvalue.TaggedOutput(BLANK, source)
            return
        try:
            yield P.parse_json_line(line, source, self._kind)
        except P.PromptError as e:
            yield dead_letter(STAGE, e.reason, f"{source}: {e.detail}", None, P.escape_line(line))


class _ParseRow(beam.DoFn):
    """(file name, Parquet row dict) -> PromptInput, or a dead letter with the row."""

    def __init__(self, kind: str):
        self._kind = kind

    def process(self, element: tuple[str, dict]) -> Iterable:
        source, row = element
        count("input_records")
        try:
            yield P.parse_row(row, source, self._kind)
        except P.PromptError as e:
            yield dead_letter(STAGE, e.reason, f"{source}: {e.detail}", None, row)


def _survivor_key(p: PromptInput) -> tuple[str, str]:
    return (p.source, P.content_key(p))


class _KeepOnePerId(beam.DoFn):
    """(prompt_id, prompts) -> the smallest by (source, content); the rest are dead letters.

    The survivor does not depend on element order, so re-runs keep the same prompt.
    """

    def process(self, element: tuple[str, Iterable[PromptInput]]) -> Iterable:
        prompt_id, group = element
        first, *rest = sorted(group, key=_survivor_key)
        yield first
        for dup in rest:
            same = P.content_key(dup) == P.content_key(first)
            detail = (f"{dup.source}: prompt_id {prompt_id} already read from {first.source}"
                      f"{' (same prompt)' if same else ' with a different prompt'}")
            yield dead_letter(STAGE, "duplicate_prompt_id", detail, prompt_id, P.as_dict(dup))


def shard_key(seed: int, p: PromptInput) -> tuple[int, str]:
    """The order in which --max-prompts keeps prompts: by hash(seed, prompt_id)."""
    return (prompt_seed(seed, p.prompt_id, "shard"), p.prompt_id)


def _count_left_out(max_prompts: int, num_distinct: int) -> tuple[str, int]:
    left_out = max(0, num_distinct - max_prompts)
    count("prompts_not_in_shard", left_out)
    return "prompts_not_in_shard", left_out


def _emit_counted(p: PromptInput) -> PromptInput:
    count("prompts_read")
    return p


class ReadPrompts(beam.PTransform):
    """Reads prompts; returns :class:`ReadResult` ``(prompts, dead_letters, counts)``.

    Apply it to the pipeline: ``prompts, dead, counts = p | ReadPrompts(cfg.input,
    cfg.input_format, cfg.max_prompts, cfg.seed)``. ``counts`` (``(name, n)`` pairs) lets the
    manifest check ``input_records = prompts_read + dead letters + blank_lines +
    prompts_not_in_shard``.

    - ``input``: a local path, glob or gs:// path; ``.gz`` files are decompressed.
      A pattern matching no file raises :class:`ConfigError` when the pipeline is built.
    - ``input_format``: ``auto`` (Parquet if every matched file ends in ``.parquet``, else
      JSONL of any record form; a mix of both is a ConfigError), ``jsonl``, ``parquet``, or
      ``hh-rlhf`` (JSONL whose records must hold the ``chosen`` dialogue).
    - Every prompt_id is kept once: the survivor is the smallest by (source, content); the
      others are dead letters ``duplicate_prompt_id``.
    - ``max_prompts``: exactly ``min(max_prompts, distinct prompts)`` prompts, those with the
      smallest ``prompt_seed(seed, prompt_id, "shard")``: the same input and seed give the same
      prompts. Prompts left out are not dead letters (counter ``rso/prompts_not_in_shard``).

    Counters (namespace ``rso``): ``input_records``, ``blank_lines``, ``prompts_read`` (prompts
    output), ``dead_letter_<reason>`` for each dead letter.
    """

    def __init__(self, input: str, input_format: str = "auto", max_prompts: int | None = None,
                 seed: int = 0):
        super().__init__()
        self._input = input
        self._kind = input_format
        self._max_prompts = max_prompts
        self._seed = seed

    def expand(self, pbegin: beam.pvalue.PBegin) -> ReadResult:
        files = check_input(self._input)
        if resolve_format(files, self._kind, self._input) == "parquet":
            records = (pbegin
                       | "Pattern" >> beam.Create([self._input])
                       | "ReadParquet" >> beam.io.ReadAllFromParquet(with_filename=True))
            parse, label = _ParseRow(self._kind), "ParseRows"
        else:
            records = pbegin | "ReadLines" >> beam.io.ReadFromTextWithFilename(
                self._input, coder=BytesCoder())
            parse, label = _ParseLine(self._kind), "ParseLines"
        parsed = records | label >> beam.ParDo(parse).with_outputs(DEAD_LETTER, BLANK,
                                                                   main="prompts")
        deduped = (parsed.prompts
                   | "KeyById" >> beam.Map(lambda p: (p.prompt_id, p))
                   | "GroupById" >> beam.GroupByKey()
                   | "KeepOnePerId" >> beam.ParDo(_KeepOnePerId()).with_outputs(
                       DEAD_LETTER, main="prompts"))
        kept = deduped.prompts
        counts = [records | CountAs("input_records"), parsed[BLANK] | CountAs("blank_lines")]
        if self._max_prompts is not None:
            kept = (kept
                    | "Shard" >> beam.combiners.Top.Of(
                        self._max_prompts, key=functools.partial(shard_key, self._seed),
                        reverse=True)
                    | "Unlist" >> beam.FlatMap(lambda ps: ps))
            counts.append(deduped.prompts
                          | "CountDistinct" >> beam.combiners.Count.Globally()
                          | "CountLeftOut" >> beam.Map(functools.partial(
                              _count_left_out, self._max_prompts)))
        prompts = kept | "CountRead" >> beam.Map(_emit_counted)
        counts.append(prompts | CountAs("prompts_read"))
        dead = ((parsed[DEAD_LETTER], deduped[DEAD_LETTER])
                | "DeadLetters" >> beam.Flatten())
        return ReadResult(prompts, dead, tuple(counts) | "Counts" >> beam.Flatten())
