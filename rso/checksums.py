"""Content hashes of the files a run writes, recorded in its manifest and checked by readers.

The pipeline's ``manifest.json`` holds, for every record file it wrote (Parquet and TFRecord)::

    "files": {"checksums": {"pairs-00000-of-00002.parquet": {"sha256": "<hex>", "bytes": 1234},
                            ...}, ...}

keyed by the file's base name; the hash is over the bytes as stored (a ``.tfrecord.gz`` file is
hashed compressed). ``rso train`` recomputes it before reading a pipeline output directory, so a
flipped byte or a truncated file is an error naming the file rather than silently different
training data (a Parquet data page without page checksums still decodes after most flips).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import IO, TypedDict

CHECKSUMS = "checksums"  # the key under the manifest's "files"
CHUNK_BYTES = 1 << 20


class Digest(TypedDict):
    sha256: str  # lowercase hex
    bytes: int  # size as stored


def digest(f: IO[bytes]) -> Digest:
    """sha256 and size of everything ``f`` yields from its current position, read in 1 MiB
    chunks (constant memory). ``f`` must return the stored bytes: open compressed files raw."""
    h = hashlib.sha256()
    size = 0
    while True:
        chunk = f.read(CHUNK_BYTES)
        if not chunk:
            return {"sha256": h.hexdigest(), "bytes": size}
        h.update(chunk)
        size += len(chunk)


class ChecksumError(ValueError):
    """A file that differs from (or is missing in) its run's manifest; the message names it."""


def verify(paths: list[str], manifest: dict, where: str,
           expected: Iterable[str] = ()) -> None:
    """Recomputes each file's digest (:func:`digest`, 1 MiB at a time) and compares it with the
    ``files.checksums`` entry of ``manifest`` (the run ``where`` that wrote them). Raises
    :class:`ChecksumError` naming the first file that is unlisted or differs, or, among the
    base names ``expected`` (what the manifest lists for this group of files, e.g. its
    ``files.candidates``), the first one ``paths`` lack: a deleted shard is an error, not
    silently less data. A manifest without checksums (written before they existed) is
    accepted as it is."""
    from rso import storage

    present = {storage.basename(path) for path in paths}
    missing = sorted(set(expected) - present)
    if missing:
        raise ChecksumError(f"{where}: {', '.join(missing[:3])}"
                            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} "
                            f"listed in its manifest but missing")
    listed = (manifest.get("files") or {}).get(CHECKSUMS)
    if listed is None:
        return
    for path in paths:
        want = listed.get(storage.basename(path))
        if want is None:
            raise ChecksumError(f"{path}: not listed in the manifest of {where}; it was not "
                                f"written by that run")
        with storage.open_file(path, "rb") as f:
            got = digest(f)
        if (got["bytes"], got["sha256"]) != (want["bytes"], want["sha256"]):
            raise ChecksumError(f"{path}: content differs from the manifest of {where} "
                                f"({got['bytes']} bytes, recorded {want['bytes']}): the file is "
                                f"corrupt, truncated or replaced")
