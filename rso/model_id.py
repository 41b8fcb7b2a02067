"""Content ids: which weights and which input data made a run, independent of where they lie.

``policy_model``/``reward_model`` (SPEC 5) and the run id must say exactly which weights and
prompts made the data: the same content reached by a relative or an absolute path (or a copy
elsewhere) gives the same id, and different content at the same path gives a different one.

- :func:`model_id` (a model directory, local or ``gs://``): config.json, the tokenizer files and,
  for each weight file, its size and the sha256 of its first and last MiB (hashing multi-GB
  files whole at every start would cost minutes; size + ends changes with any re-save or
  fine-tune). On an object store a weight file's checksum from the listing (GCS ``crc32c``/
  ``md5Hash``, S3 ``ETag``) is used instead when present: it covers the whole object at no cost.
- :func:`content_id` (an input file or glob): the sha256 of every matched file's bytes (or the
  store's whole-object checksum), sorted, so neither file names nor their order count.
"""
from __future__ import annotations

import functools
import hashlib

from rso import storage

_SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_CHUNK = 1 << 20
# Whole-object checksums an object store's listing may carry (GCS, then S3 and others).
_STORE_CHECKSUMS = ("crc32c", "md5Hash", "ETag", "etag")


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _store_checksum(info: dict) -> str | None:
    for key in _STORE_CHECKSUMS:
        if info.get(key):
            return f"{key}:{info[key]}"
    return None


def model_id(path: str) -> str:
    """``<dir name>@sha256:<12 hex>`` for a model directory (local or on an object store);
    the path itself when it is not a directory (e.g. a hub id, which names its content)."""
    try:
        fs, p = storage.filesystem(path)
        if not fs.isdir(p):
            return path
        fs.invalidate_cache(p)
        entries = sorted(fs.ls(p, detail=True), key=lambda e: _name(e["name"]))
    except (OSError, ValueError, ImportError):
        return path
    h = hashlib.sha256()
    for entry in entries:
        name, full = _name(entry["name"]), entry["name"]
        if entry.get("type") == "directory":
            continue
        if name in _SMALL_FILES:
            h.update(name.encode() + b"\0" + fs.cat_file(full))
        elif name.endswith(_WEIGHT_SUFFIXES):
            size = int(entry.get("size") or fs.size(full))
            h.update(f"{name}\0{size}\0".encode())
            checksum = _store_checksum(entry)
            if checksum:
                h.update(checksum.encode())
                continue
            h.update(fs.cat_file(full, start=0, end=min(size, _CHUNK)))
            if size > _CHUNK:
                h.update(fs.cat_file(full, start=max(size - _CHUNK, _CHUNK), end=size))
    return f"{_name(path) or path}@sha256:{h.hexdigest()[:12]}"


@functools.lru_cache(maxsize=64)
def _file_digest(fs_path: str, protocol: str, size: int, mtime: str, checksum: str | None
                 ) -> str:
    """sha256 of a file's bytes; keyed by size/mtime/checksum so a changed file is re-read."""
    if checksum:
        return checksum
    fs, p = storage.filesystem(fs_path if protocol in ("file", "local") else
                               f"{protocol}://{fs_path}")
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def content_id(pattern: str) -> str:
    """``sha256:<16 hex>`` of the files ``pattern`` (a path or glob, local or gs://) matches:
    the sorted digests of their contents. Raises FileNotFoundError if it matches no file."""
    fs, p = storage.filesystem(pattern)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    fs.invalidate_cache()
    if any(c in p for c in "*?["):
        paths = [m for m in fs.glob(p) if not fs.isdir(m)]
    else:
        paths = [p] if fs.exists(p) else []
    digests = []
    for m in paths:
        info = fs.info(m)
        if info.get("type") == "directory":
            raise IsADirectoryError(pattern)
        digests.append(_file_digest(m, protocol, int(info.get("size") or 0),
                                    str(info.get("mtime") or info.get("updated") or ""),
                                    _store_checksum(info)))
    if not digests:
        raise FileNotFoundError(f"{pattern} matches no file")
    return "sha256:" + hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]
