"""The pipeline's output directory (SPEC 5), declared once for the pipeline, the trainer and
the deploy tooling::

    OUTPUT/pairs-SSSSS-of-NNNNN.parquet       preference records (rso.schema.COLUMNS)
    OUTPUT/pairs-SSSSS-of-NNNNN.tfrecord.gz   the same records as tf.train.Example
    OUTPUT/sft-SSSSS-of-NNNNN.{parquet,tfrecord.gz}   best-of-n SFT targets instead of pairs
    OUTPUT/candidates-SSSSS-of-NNNNN.parquet  every scored candidate (--write-candidates)
    OUTPUT/dead_letter-SSSSS-of-NNNNN.jsonl   one dropped element per line, with its reason
    OUTPUT/manifest.json                      config, versions, counters, statistics
    OUTPUT/*.png                              plots of the run
    OUTPUT/_SUCCESS                           written last: the directory is complete

A reader ignores a directory without ``_SUCCESS``. Paths may be local or any fsspec URL
(``gs://``); :mod:`rso.io` resolves them.
"""
from __future__ import annotations

from rso import storage as rso_io

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
PAIRS_PREFIX = "pairs"
SFT_PREFIX = "sft"
CANDIDATES_PREFIX = "candidates"  # the candidate store (--write-candidates), Parquet only
DEAD_LETTER_PREFIX = "dead_letter"
PARQUET_SUFFIX = ".parquet"
TFRECORD_SUFFIX = ".tfrecord.gz"
DEAD_LETTER_SUFFIX = ".jsonl"
# Beam's file sinks stage their shards in folders named like this inside the output.
BEAM_TEMP = "beam-temp-*"


def record_patterns(prefix: str = PAIRS_PREFIX) -> tuple[str, str]:
    """The (Parquet, TFRecord) file-name patterns of a run's records, e.g. ``pairs-*.parquet``."""
    return f"{prefix}-*{PARQUET_SUFFIX}", f"{prefix}-*.tfrecord*"


# What `rso inspect` and `rso sweep` write into a run directory: they describe that run, so a
# run that replaces it removes them too.
ANALYSIS_PATTERNS = ("inspect.json", "inspect_*.png", "sweep.json", "sweep.png")


def output_patterns(plot_names: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every file name pattern a run writes or describes it (what a re-run replaces),
    ``_SUCCESS`` excluded."""
    return (*record_patterns(PAIRS_PREFIX), *record_patterns(SFT_PREFIX),
            f"{CANDIDATES_PREFIX}-*{PARQUET_SUFFIX}",
            f"{DEAD_LETTER_PREFIX}-*{DEAD_LETTER_SUFFIX}", MANIFEST, *plot_names,
            *ANALYSIS_PATTERNS)


def is_complete(output: str) -> bool:
    """Whether ``output`` holds a finished run (its ``_SUCCESS`` marker exists)."""
    return rso_io.exists(rso_io.join(output, SUCCESS))


def pair_files(output: str, data_format: str = "auto", prefix: str = PAIRS_PREFIX) -> list[str]:
    """The record files of a complete run, sorted: Parquet, or TFRecord.

    ``data_format``: ``parquet``, ``tfrecord`` or ``auto`` (Parquet when there is any, else
    TFRecord). The caller checks :func:`is_complete` first.
    """
    parquet_pattern, tfrecord_pattern = record_patterns(prefix)
    directory = rso_io.escape(output)  # a directory named e.g. run[1] is not a pattern
    parquet = rso_io.glob(rso_io.join(directory, parquet_pattern))
    tfrecord = rso_io.glob(rso_io.join(directory, tfrecord_pattern))
    if data_format == "auto":
        return parquet or tfrecord
    return parquet if data_format == "parquet" else tfrecord


def candidate_files(output: str) -> list[str]:
    """The candidate-store files of a run, sorted (empty when it wrote none)."""
    pattern = f"{CANDIDATES_PREFIX}-*{PARQUET_SUFFIX}"
    return rso_io.glob(rso_io.join(rso_io.escape(output), pattern))
