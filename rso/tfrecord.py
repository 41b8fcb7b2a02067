"""TFRecord framing (read and write), plain or gzip, local or gs://, without TensorFlow.

Each record is: uint64 length, uint32 masked crc32c(length), bytes, uint32 masked crc32c(bytes),
little-endian. The pipeline writes with Beam's ``WriteToTFRecord``; the trainer reads with
:func:`read_records`, which checks both checksums. Written by hand because the one maintained
reader (TensorFlow) is a 500 MB dependency the trainer must not need.
"""
from __future__ import annotations

import gzip
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import google_crc32c

from rso.storage import open_file


class CorruptRecordError(ValueError):
    pass


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _is_gzip(path: str) -> bool:
    return path.endswith(".gz")


def write_records(path: str, records: Iterable[bytes]) -> int:
    """Writes records to ``path`` (gzip if it ends in .gz). Returns how many were written."""
    n = 0
    with open_file(path, "wb") as raw:
        out: Any = gzip.GzipFile(fileobj=raw, mode="wb") if _is_gzip(path) else raw
        for data in records:
            header = struct.pack("<Q", len(data))
            out.write(header + struct.pack("<I", _masked_crc(header)))
            out.write(data + struct.pack("<I", _masked_crc(data)))
            n += 1
        if out is not raw:
            out.close()
    return n


def read_records(path: str) -> Iterator[bytes]:
    """Yields each record's bytes; raises CorruptRecordError naming the file and record."""
    with open_file(path, "rb") as raw:
        f: Any = gzip.GzipFile(fileobj=raw, mode="rb") if _is_gzip(path) else raw
        index = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise CorruptRecordError(f"{path}: record {index}: truncated header")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
                raise CorruptRecordError(f"{path}: record {index}: bad length checksum")
            body = f.read(length + 4)
            if len(body) < length + 4:
                raise CorruptRecordError(f"{path}: record {index}: truncated data")
            data = body[:length]
            if struct.unpack("<I", body[length:])[0] != _masked_crc(data):
                raise CorruptRecordError(f"{path}: record {index}: bad data checksum")
            yield data
            index += 1
