"""File access for local paths and gs:// (through fsspec/gcsfs), without Apache Beam.

The trainer and the config loader use this; the Beam pipeline uses Beam's own FileSystems.
Against a GCS emulator set ``STORAGE_EMULATOR_HOST``; gcsfs then talks to it anonymously.
"""
from __future__ import annotations

import os
from typing import IO, Any

import fsspec


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path as that filesystem names it."""
    options: dict[str, Any] = {}
    if path.startswith("gs://") and os.environ.get("STORAGE_EMULATOR_HOST"):
        options["token"] = "anon"
    return fsspec.core.url_to_fs(path, **options)


def _qualify(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def open_file(path: str, mode: str = "rb", **kwargs: Any) -> IO:
    fs, p = filesystem(path)
    return fs.open(p, mode, **kwargs)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob (or the path itself if it names a file)."""
    fs, p = filesystem(pattern)
    return sorted(_qualify(fs, m) for m in fs.glob(p))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.makedirs(p, exist_ok=True)
