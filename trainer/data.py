"""Reading preference pairs for the trainer: resolve, validate, stream, shuffle, bucket.

Sources are pipeline output directories (only complete ones, with ``_SUCCESS``), or files and
globs of ``*.parquet`` / ``*.tfrecord[.gz]``, local or gs:// (through :mod:`rso.storage`). Only the
columns the trainer needs are read, a Parquet row group or a TFRecord record at a time, so data
larger than memory streams. Stored token ids are used as they are: nothing is re-tokenised.

An epoch is a deterministic function of (seed, epoch): file order is permuted, pairs pass a
bounded shuffle buffer, then windows of ``bucket_batches`` batches are sorted by length, cut into
batches and the batches shuffled (length bucketing: padding stays small, order stays random).
Resuming replays the same stream and skips the batches already consumed.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rso import checksums, layout
from rso import storage as rso_io
from rso.schema import SchemaError, from_example
from rso.tfrecord import CorruptRecordError, read_records

T = TypeVar("T")
log = logging.getLogger("rso.trainer")

# The columns the trainer reads (SPEC 5 names).
COLUMNS = ("prompt_id", "prompt_token_ids", "chosen_token_ids", "rejected_token_ids",
           "ref_chosen_logps", "ref_rejected_logps")
PARQUET, TFRECORD = "parquet", "tfrecord"


class DataError(ValueError):
    """Unreadable or invalid training data; the message names the file and the row."""


@dataclasses.dataclass(slots=True)
class Pair:
    """One preference pair, as the trainer needs it."""
    prompt_id: str
    prompt_token_ids: list[int]
    chosen_token_ids: list[int]
    rejected_token_ids: list[int]
    ref_chosen_logps: float
    ref_rejected_logps: float
    where: str  # "FILE: row N", for error messages

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences (prompt + response)."""
        return len(self.prompt_token_ids) + max(len(self.chosen_token_ids),
                                                len(self.rejected_token_ids))

    @property
    def key(self) -> str:
        """Content key of the pair's token ids (the reference cache's key)."""
        return pair_key(self.prompt_token_ids, self.chosen_token_ids, self.rejected_token_ids)


def pair_key(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]) -> str:
    text = "|".join(",".join(map(str, ids)) for ids in (prompt, chosen, rejected))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]


# ------------------------------------------------------------------------------ resolving
def _file_format(path: str) -> str:
    if path.endswith(".parquet"):
        return PARQUET
    if path.endswith(".tfrecord") or path.endswith(".tfrecord.gz"):
        return TFRECORD
    raise DataError(f"{path}: not a .parquet, .tfrecord or .tfrecord.gz file")


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _directory_files(directory: str, data_format: str) -> list[str]:
    if not layout.is_complete(directory):
        raise DataError(f"{directory}: no {layout.SUCCESS} file, so the pipeline run that writes "
                        f"it has not finished (or failed); refusing to train on partial output")
    files = layout.pair_files(directory, data_format)
    if not files and layout.pair_files(directory, data_format, layout.SFT_PREFIX):
        raise DataError(f"{directory}: a best-of-n output (sft-* files: SFT targets, one "
                        f"response per prompt), not preference pairs; preference losses need "
                        f"a run with another --selection")
    return files


def _resolve(source: str, data_format: str) -> tuple[list[str], str | None]:
    """The files of one source, and the pipeline output directory they come from (if any).
    A source that exists as named is a directory or file even when its name holds glob
    characters (e.g. ``runs/br[1]``); otherwise such a source is a glob."""
    fs, path = rso_io.filesystem(source)
    if rso_io.has_glob_chars(source) and not fs.exists(path):
        matches = rso_io.glob(source)
        if not matches:
            raise DataError(f"{source}: the pattern matches no file")
        return [m for m in matches if _file_format(m)], None
    if fs.isdir(path):
        directory = source.rstrip("/")
        return _directory_files(directory, data_format), directory
    if fs.exists(path):
        _file_format(source)
        return [source], None
    raise DataError(f"{source}: no such directory or file")


def resolve_files(sources: Sequence[str], data_format: str = "auto") -> list[str]:
    """The data files named by ``sources`` (directories, files or globs), in a stable order."""
    files = [f for source in sources for f in _resolve(source, data_format)[0]]
    return list(dict.fromkeys(files))


# ------------------------------------------------------------------------------ integrity
@dataclasses.dataclass(frozen=True)
class DataFile:
    """A data file with the sha256 and size of its bytes as read now."""
    path: str
    sha256: str
    bytes: int


def _manifest_checksums(directory: str) -> dict[str, checksums.Digest] | None:
    """``files.checksums`` of a pipeline output directory's manifest; None (with a warning)
    when the manifest has none (written before checksums were recorded)."""
    path = rso_io.join(directory, layout.MANIFEST)
    if not rso_io.exists(path):
        log.warning("%s: no %s, so its files cannot be verified", directory, layout.MANIFEST)
        return None
    try:
        with rso_io.open_file(path, "rb") as f:
            manifest = json.load(f)
        listed = manifest.get("files", {}).get(checksums.CHECKSUMS)
    except (ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a readable manifest ({e})") from e
    if listed is None:
        log.warning("%s records no file checksums (an older pipeline wrote it), so the files "
                    "of %s cannot be verified", path, directory)
    return listed


def verify_files(sources: Sequence[str], data_format: str = "auto") -> list[DataFile]:
    """:func:`resolve_files`, with each file's sha256 and size, checked against the manifest.

    Every file of a pipeline output directory must match the ``files.checksums`` entry of its
    ``manifest.json`` (:mod:`rso.checksums`), and every file of the chosen format the manifest
    lists must be there; otherwise :class:`DataError` names the file. Files named directly or by
    a glob are hashed too (for :func:`data_id`) but have nothing to be checked against. Reads
    every byte once (1 MiB at a time).
    """
    found: dict[str, DataFile] = {}
    for source in sources:
        files, directory = _resolve(source, data_format)
        expected = _manifest_checksums(directory) if directory else None
        if expected is not None:
            names = {_basename(f) for f in files}
            formats = {_file_format(f) for f in files}
            records = [n for n in expected  # the record files (not e.g. a candidate store)
                       if any(fnmatch.fnmatch(n, pat) for pat in layout.record_patterns())]
            missing = sorted(n for n in records if n not in names and _file_format(n) in formats)
            if missing:
                raise DataError(f"{directory}: {', '.join(missing)} listed in "
                                f"{layout.MANIFEST} but missing")
        for path in files:
            with rso_io.open_file(path, "rb") as f:
                d = checksums.digest(f)
            if expected is not None:
                want = expected.get(_basename(path))
                if want is None:
                    raise DataError(f"{path}: not listed in {layout.MANIFEST}; it was not "
                                    f"written by the run that wrote {directory}")
                if (d["bytes"], d["sha256"]) != (want["bytes"], want["sha256"]):
                    raise DataError(
                        f"{path}: content differs from {layout.MANIFEST} ({d['bytes']} bytes, "
                        f"sha256 {d['sha256'][:12]}..., recorded {want['bytes']} bytes, sha256 "
                        f"{want['sha256'][:12]}...): the file is corrupt, truncated or replaced")
            found.setdefault(path, DataFile(path, d["sha256"], d["bytes"]))
    return list(found.values())


def data_id(files: Sequence[DataFile]) -> str:
    """Content id of a data set: sha256 over the (base name, size, sha256) of its files in
    order; the same for a moved or copied directory, different after any change of a byte."""
    text = json.dumps([[_basename(f.path), f.bytes, f.sha256] for f in files])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------ reading
def validate_pair(record: Mapping, where: str, *, require_reference: bool = True,
                  vocab_size: int | None = None) -> None:
    """Raises DataError (naming ``where``) unless the record can be trained on."""
    missing = [c for c in COLUMNS if c not in record]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)}")
    if not isinstance(record["prompt_id"], str):
        raise DataError(f"{where}: prompt_id must be a string, got {record['prompt_id']!r}")
    for name in ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids"):
        ids = record[name]
        if not ids:
            raise DataError(f"{where}: {name} is empty")
        if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            raise DataError(f"{where}: {name} holds a token id outside the policy's vocabulary "
                            f"[0, {vocab_size})")
    if require_reference:
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            value = record[name]
            if value is None or not math.isfinite(value):
                raise DataError(f"{where}: {name} is {value}, not a finite log-probability "
                                f"(use --recompute-reference to compute it)")
            if value > 1e-3:
                raise DataError(f"{where}: {name} is {value} > 0, not a log-probability")


# What a damaged file raises while it is decoded: pyarrow (ArrowException; its ArrowInvalid and
# OSError for bad pages, checksums, footers), gzip (BadGzipFile is an OSError, EOFError when
# truncated, zlib.error), protobuf (DecodeError is an Exception: from_example turns it into
# SchemaError).
_DAMAGE = (pa.ArrowException, OSError, EOFError, zlib.error)


def _parquet_records(path: str) -> Iterator[dict]:
    """Rows of a Parquet file; page CRCs are verified where the writer stored them
    (``page_checksum_verification``). Damage is a DataError naming the file and the first row
    that could not be read."""
    row = 0
    try:
        with rso_io.open_file(path, "rb") as f:
            parquet = pq.ParquetFile(f, page_checksum_verification=True)
            missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                raise DataError(f"{path}: row 0: missing column(s) {', '.join(missing)}")
            for batch in parquet.iter_batches(batch_size=1024, columns=list(COLUMNS)):
                rows = batch.to_pylist()
                yield from rows
                row += len(rows)
    except _DAMAGE as e:
        raise DataError(f"{path}: row {row}: unreadable, the Parquet file is corrupt or "
                        f"truncated ({type(e).__name__}: {_one_line(e)})") from e


def _tfrecord_records(path: str) -> Iterator[dict]:
    """Records of a TFRecord file (record CRCs checked by :func:`rso.tfrecord.read_records`);
    damage is a DataError naming the file and the record."""
    index = 0
    try:
        for data in read_records(path):
            yield from_example(data, where=f"{path}: row {index}")
            index += 1
    except (SchemaError, CorruptRecordError) as e:
        raise DataError(str(e)) from e
    except _DAMAGE as e:
        raise DataError(f"{path}: row {index}: unreadable, the TFRecord file is corrupt or "
                        f"truncated ({type(e).__name__}: {_one_line(e)})") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _raw_records(path: str) -> Iterator[dict]:
    return _parquet_records(path) if _file_format(path) == PARQUET else _tfrecord_records(path)


def read_pairs(path: str, *, require_reference: bool = True, vocab_size: int | None = None,
               reference: Mapping[str, tuple[float, float]] | None = None) -> Iterator[Pair]:
    """Streams the validated pairs of one file. With ``reference`` (a cache from
    :mod:`trainer.reference`), the stored reference log-probs are replaced by the cached ones."""
    for row, rec in enumerate(_raw_records(path)):
        where = f"{path}: row {row}"
        validate_pair(rec, where, require_reference=require_reference and reference is None,
                      vocab_size=vocab_size)
        pair = Pair(rec["prompt_id"], list(rec["prompt_token_ids"]),
                    list(rec["chosen_token_ids"]), list(rec["rejected_token_ids"]),
                    rec["ref_chosen_logps"], rec["ref_rejected_logps"], where)
        if reference is not None:
            cached = reference.get(pair.key)
            if cached is None:
                raise DataError(f"{where}: pair not in the reference cache; the data changed "
                                f"since the cache was made (delete it to recompute)")
            pair.ref_chosen_logps, pair.ref_rejected_logps = cached
        yield pair


# ------------------------------------------------------------------------------ ordering
def in_eval_split(prompt_id: str, fraction: float) -> bool:
    """True for about ``fraction`` of prompt ids: sha256(prompt_id) / 2**64 < fraction."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(b"rso-eval\x00" + prompt_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64 < fraction


def shuffle_buffer(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Streaming shuffle: hold ``size`` items, emit a random one as each new item arrives."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[int(j)]


def bucket_batches(pairs: Iterable[Pair], batch_size: int, window_batches: int,
                   rng: np.random.Generator | None) -> Iterator[list[Pair]]:
    """Cuts windows of ``batch_size * window_batches`` pairs into batches of similar length.

    Each window is sorted by :attr:`Pair.length` and cut into batches of ``batch_size``; with an
    ``rng`` the batches of a window are emitted in random order. Only the stream's last batch
    may be smaller, so an epoch of n pairs has ceil(n / batch_size) batches.
    """
    window_size = batch_size * window_batches

    def emit(window: list[Pair]) -> Iterator[list[Pair]]:
        window.sort(key=lambda p: p.length)
        batches = [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
        order = rng.permutation(len(batches)) if rng is not None else range(len(batches))
        for i in order:
            yield batches[int(i)]

    window: list[Pair] = []
    for pair in pairs:
        window.append(pair)
        if len(window) == window_size:
            yield from emit(window)
            window = []
    if window:
        yield from emit(window)


# ------------------------------------------------------------------------------ datasets
@dataclasses.dataclass
class PairSource:
    """A set of data files and the rules deciding which of their pairs belong to this split."""
    files: list[str]
    keep: Callable[[Pair], bool] = lambda pair: True
    vocab_size: int | None = None
    reference: Mapping[str, tuple[float, float]] | None = None
    require_reference: bool = True

    def pairs(self, files: Sequence[str] | None = None) -> Iterator[Pair]:
        for path in self.files if files is None else files:
            for pair in read_pairs(path, require_reference=self.require_reference,
                                   vocab_size=self.vocab_size, reference=self.reference):
                if self.keep(pair):
                    yield pair

    def count(self) -> int:
        """Reads (and so validates) every pair once; returns how many this split keeps."""
        return sum(1 for _ in self.pairs())

    def epoch(self, epoch: int, seed: int, batch_size: int, window_batches: int,
              buffer_size: int) -> Iterator[list[Pair]]:
        """The batches of one training epoch, a deterministic function of (seed, epoch)."""
        rng = np.random.default_rng([seed, epoch])
        files = [self.files[int(i)] for i in rng.permutation(len(self.files))]
        stream = shuffle_buffer(self.pairs(files), buffer_size, rng)
        return bucket_batches(stream, batch_size, window_batches, rng)

    def sequential(self, batch_size: int, window_batches: int) -> Iterator[list[Pair]]:
        """Length-bucketed batches in file order, for evaluation and reference computation."""
        return bucket_batches(self.pairs(), batch_size, window_batches, None)


def length_filter(max_length: int | None) -> Callable[[Pair], bool]:
    if max_length is None:
        return lambda pair: True
    return lambda pair: pair.length <= max_length
