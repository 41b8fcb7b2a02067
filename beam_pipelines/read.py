"""The pipeline's read stage: input files -> deduplicated, optionally sharded PromptInputs.

``ReadPrompts`` reads JSONL (plain, .gz or .bz2, any mix of the record forms of
:mod:`beam_pipelines.prompts`, HH-RLHF included) or Parquet, from a local path, a glob or gs://.
Lines are read as bytes, so bad UTF-8 becomes a dead letter instead of failing the run.

Files are matched at run time (``fileio.MatchFiles``), spread over workers
(``Reshuffle``) and read by our own DoFns, one file per element, streaming:

- JSONL: :func:`read_lines` decompresses with Python's own ``gzip``/``bz2`` and splits lines as
  it goes (Beam's ``ReadFromText`` stops silently at the cut of a truncated ``.gz`` file, so it
  is not used).
- Parquet: :func:`read_row_groups` opens the file with pyarrow and reads one row group at a
  time.

A truncated or corrupt input file is a DEAD LETTER, not a start-up error (decided so: the other
files and the records before the damage are good, and the dead letter and its counter make the
loss visible in the manifest; checking every file at start-up would mean reading every file
twice). Reason ``corrupt_input_file``, ``input = {"file", "line" | "row_group", ...}``: the
records before the damage are kept; for JSONL the dead letter names the first line that could
not be read and the decompressed byte offset where reading stopped; for Parquet a file that
cannot be opened is one dead letter, and each row group that cannot be read is one (the other
row groups are still read). Any other exception while one line or row is parsed (e.g. a
``RecursionError`` for JSON nested thousands deep) is an ``unexpected_error`` dead letter of
the stage contract (:mod:`beam_pipelines.stage`).
"""
from __future__ import annotations

import bz2
import functools
import gzip
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import prompts as P
from beam_pipelines.elements import PromptInput
from beam_pipelines.manifest import CountAs
from beam_pipelines.seeding import prompt_seed
from beam_pipelines.stage import (
    DEAD_LETTER,
    MAIN,
    USAGE,
    MeteredDoFn,
    StageOutput,
    StageParDo,
    count,
    dead_letter,
    error_detail,
    flatten_usage,
)
from rso.config import ConfigError

STAGE = "read"
COUNTS = "counts"  # side output: (name, n) pairs for the manifest's accounting
CORRUPT_INPUT_FILE = "corrupt_input_file"
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


class CorruptFileError(Exception):
    """An input file that cannot be read further; ``position`` says where (JSON-able)."""

    def __init__(self, path: str, position: dict[str, Any], cause: BaseException):
        super().__init__(f"{path}: {error_detail(cause)} at {position}")
        self.path, self.position, self.cause = path, position, cause


def _open_decompressed(path: str) -> BinaryIO:
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    kind = CompressionTypes.detect_compression_type(path)
    if kind == CompressionTypes.GZIP:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == CompressionTypes.BZIP2:
        return bz2.BZ2File(raw, mode="rb")
    if kind == CompressionTypes.UNCOMPRESSED:
        return raw
    raw.close()  # other codecs (zstd, deflate, lzma): Beam's own decompressor
    return FileSystems.open(path, compression_type=kind)


def _strip_eol(line: bytes) -> bytes:
    """The line without its ``\\n`` or ``\\r\\n`` (what Beam's ReadFromText strips)."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line number from 1, line without its end of line)`` for each line of a JSONL file,
    decompressed by its suffix (.gz, .bz2, ...), streaming. Raises :class:`CorruptFileError`
    (position ``{"line": first line not read, "byte_offset": decompressed bytes read}``) when
    the file is truncated or corrupt, after yielding every line before the damage."""
    line_no, offset = 0, 0
    try:
        with _open_decompressed(path) as f:
            for line in f:
                line_no += 1
                offset += len(line)
                yield line_no, _strip_eol(line)
    except Exception as e:  # noqa: BLE001 - EOFError, BadGzipFile, zlib.error, OSError...
        raise CorruptFileError(path, {"line": line_no + 1, "byte_offset": offset}, e) from e


class _ReadTextFile(beam.DoFn):
    """File metadata -> ``(path, line number, raw line bytes)``; a truncated or corrupt file
    -> the lines before the damage, then one ``corrupt_input_file`` dead letter."""

    def process(self, file: Any) -> Iterable:
        count("input_files")
        try:
            yield from ((file.path, n, line) for n, line in read_lines(file.path))
        except CorruptFileError as e:
            yield dead_letter(STAGE, CORRUPT_INPUT_FILE, str(e), None,
                              {"file": e.path, **e.position})


def parquet_rows(path: str) -> Iterator[dict]:
    """The rows of one Parquet file (local or gs://) as dicts, one row group at a time.
    ``path`` is a file name, never a pattern: unlike Beam's ``ReadAllFromParquet``, which
    matches each name (and again each match) as a glob, it reads e.g. ``runs/br[1]/x.parquet``."""
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        pf = pq.ParquetFile(f)
        for i in range(pf.metadata.num_row_groups):
            yield from pf.read_row_group(i).to_pylist()


class _ReadParquetFile(beam.DoFn):
    """File metadata -> ``(path, row dict)``, one row group at a time; a file that cannot be
    opened, or each row group that cannot be read, -> a ``corrupt_input_file`` dead letter."""

    def process(self, file: Any) -> Iterable:
        import pyarrow.parquet as pq

        count("input_files")
        path = file.path
        try:
            f = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError...
            yield dead_letter(STAGE, CORRUPT_INPUT_FILE, f"{path}: cannot open it as Parquet: "
                              f"{error_detail(e)}", None, {"file": path, "row_group": None})
            return
        with f:
            for i in range(pf.metadata.num_row_groups):
                try:
                    rows = pf.read_row_group(i).to_pylist()
                except Exception as e:  # noqa: BLE001 - one bad row group, not the rest
                    yield dead_letter(STAGE, CORRUPT_INPUT_FILE, f"{path}: row group {i} of "
                                      f"{pf.metadata.num_row_groups}: {error_detail(e)}", None,
                                      {"file": path, "row_group": i})
                    continue
                yield from ((path, row) for row in rows)


class _ReadFiles(beam.PTransform):
    """A file-reading DoFn as a stage, WITHOUT ``with_exception_handling`` (it would buffer a
    whole file's records; the DoFn catches its own errors, see the module docstring)."""

    def __init__(self, fn: beam.DoFn):
        super().__init__()
        self._fn = fn

    def expand(self, files: beam.PCollection) -> StageOutput:
        out = files | "Read" >> beam.ParDo(MeteredDoFn(STAGE, self._fn)).with_outputs(
            DEAD_LETTER, USAGE, main=MAIN)
        return StageOutput(out[MAIN], out[DEAD_LETTER], usage=out[USAGE])


class _ParseLine(beam.DoFn):
    """(file name, line number, raw line bytes) -> PromptInput, or a dead letter with the
    escaped line."""

    def __init__(self, kind: str):
        self._kind = kind

    def process(self, element: tuple[str, int, bytes]) -> Iterable:
        source, line_no, line = element
        count("input_records")
        if P.is_blank(line):
            count("blank_lines")
            return
        try:
            yield P.parse_json_line(line, source, self._kind)
        except P.PromptError as e:
            yield dead_letter(STAGE, e.reason, f"{source}:{line_no}: {e.detail}", None,
                              P.escape_line(line))


def _describe_line(element: tuple[str, int, bytes]) -> tuple[None, str]:
    return None, P.escape_line(element[2])


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


def _describe_row(element: tuple[str, dict]) -> tuple[None, dict]:
    return None, element[1]


def _key_by_id(p: PromptInput) -> tuple[str, PromptInput]:
    return p.prompt_id, p


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


def _is_blank_line(element: tuple[str, int, bytes]) -> bool:
    return P.is_blank(element[2])


def _emit_counted(p: PromptInput) -> PromptInput:
    count("prompts_read")
    return p


class ReadPrompts(beam.PTransform):
    """Reads prompts; returns :class:`StageOutput` ``(main: PromptInput, one per distinct
    prompt_id, dead_letters: DeadLetter(stage="read"))``.

    Apply it to the pipeline: ``read = p | ReadPrompts(cfg.input, cfg.input_format,
    cfg.max_prompts, cfg.seed)``; ``read.main``, ``read.dead_letters``.

    - ``input``: a local path, glob or gs:// path; ``.gz``/``.bz2`` files are decompressed.
      A pattern matching no file raises :class:`ConfigError` when the pipeline is built; a
      truncated or corrupt file is a ``corrupt_input_file`` dead letter (module docstring).
    - ``input_format``: ``auto`` (Parquet if every matched file ends in ``.parquet``, else
      JSONL of any record form; a mix of both is a ConfigError), ``jsonl``, ``parquet``, or
      ``hh-rlhf`` (JSONL whose records must hold the ``chosen`` dialogue).
    - Every prompt_id is kept once: the survivor is the smallest by (source, content); the
      others are dead letters ``duplicate_prompt_id``.
    - ``max_prompts``: exactly ``min(max_prompts, distinct prompts)`` prompts, those with the
      smallest ``prompt_seed(seed, prompt_id, "shard")``: the same input and seed give the same
      prompts. Prompts left out are not dead letters (counter ``rso/prompts_not_in_shard``).

    ``usage``: the file readers' and parsers' :class:`rso.cost.Usage` per bundle.
    ``side[COUNTS]``: ``(name, n)`` pairs (``input_records``, ``blank_lines``,
    ``prompts_not_in_shard``, ``prompts_read``) for the manifest's accounting, which checks
    ``input_records = prompts_read + read dead letters + blank_lines + prompts_not_in_shard``.

    Counters (namespace ``rso``): ``input_files``, ``input_records``, ``blank_lines``,
    ``prompts_read`` (prompts output), ``dead_letter_<reason>`` for each dead letter.
    """

    def __init__(self, input: str, input_format: str = "auto", max_prompts: int | None = None,
                 seed: int = 0):
        super().__init__()
        self._input = input  # checked when the config is built (GenerateConfig)
        self._kind = input_format
        self._max_prompts = max_prompts
        self._seed = seed

    def expand(self, pbegin: beam.pvalue.PBegin) -> StageOutput:
        files = check_input(self._input)
        matched = (pbegin
                   | "Match" >> fileio.MatchFiles(self._input)
                   | "SpreadFiles" >> beam.Reshuffle())
        parquet = resolve_format(files, self._kind, self._input) == "parquet"
        if parquet:
            raw = matched | "ReadParquet" >> _ReadFiles(_ReadParquetFile())
            parsed = raw.main | "ParseRows" >> StageParDo(STAGE, _ParseRow(self._kind),
                                                         describe=_describe_row)
        else:
            raw = matched | "ReadLines" >> _ReadFiles(_ReadTextFile())
            parsed = raw.main | "ParseLines" >> StageParDo(STAGE, _ParseLine(self._kind),
                                                          describe=_describe_line)
        deduped = (parsed.main
                   | "KeyById" >> beam.Map(_key_by_id)
                   | "GroupById" >> beam.GroupByKey()
                   | "KeepOnePerId" >> StageParDo(STAGE, _KeepOnePerId()))
        kept = deduped.main
        counts = [raw.main | "CountInput" >> CountAs("input_records")]
        if not parquet:
            counts.append(raw.main
                          | "BlankLines" >> beam.Filter(_is_blank_line)
                          | "CountBlank" >> CountAs("blank_lines"))
        if self._max_prompts is not None:
            kept = (kept
                    | "Shard" >> beam.combiners.Top.Of(
                        self._max_prompts, key=functools.partial(shard_key, self._seed),
                        reverse=True)
                    | "Unlist" >> beam.FlatMap(lambda ps: ps))
            counts.append(deduped.main
                          | "CountDistinct" >> beam.combiners.Count.Globally()
                          | "CountLeftOut" >> beam.Map(functools.partial(
                              _count_left_out, self._max_prompts)))
        prompts = kept | "CountRead" >> beam.Map(_emit_counted)
        counts.append(prompts | "CountPrompts" >> CountAs("prompts_read"))
        dead = ((raw.dead_letters, parsed.dead_letters, deduped.dead_letters)
                | "DeadLetters" >> beam.Flatten())
        return StageOutput(prompts, dead,
                           {COUNTS: tuple(counts) | "Counts" >> beam.Flatten()},
                           flatten_usage("Usage", raw, parsed, deduped))
