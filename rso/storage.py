"""File access for local paths and gs:// (through fsspec/gcsfs), without Apache Beam.

The trainer and the config loader use this; the Beam pipeline uses Beam's own FileSystems.
Against a GCS emulator set ``STORAGE_EMULATOR_HOST``; gcsfs then talks to it anonymously.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
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


GLOB_CHARS = "*?["  # what a glob (fsspec's, Python's, Beam's FileSystems.match) treats specially


def has_glob_chars(path: str) -> bool:
    """Whether ``path`` holds a character a glob would read as a pattern (``*``, ``?``, ``[``;
    a lone ``]`` is literal)."""
    return any(c in path for c in GLOB_CHARS)


def escape(path: str) -> str:
    """``path`` as a glob that matches only itself, for :func:`glob` (fsspec, local or gs://):
    ``*``, ``?`` and ``[`` become ``[*]``, ``[?]``, ``[[]`` (what :func:`glob.escape` does).
    Escape the directory part a caller joins a pattern to, never the pattern."""
    return re.sub(r"([*?[])", r"[\1]", path)


def beam_escape(path: str) -> str:
    """``path`` as a pattern of Beam's ``FileSystems.match`` (which every Beam file source
    applies to its file names) that matches only itself. As :func:`escape`, but ``[`` becomes
    ``[\\[]``: Beam hands ``[[]`` to ``re`` unchanged, which warns of a nested set (that class
    also admits a backslash in the bracket's place, a name no run writes)."""
    return re.sub(r"([*?])", r"[\1]", path.replace("[", "[\\[]"))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def basename(path: str) -> str:
    """The last component of a local path or URL (``gs://b/run/x.parquet`` -> ``x.parquet``; a
    trailing ``/`` is ignored): how manifests name a run's files."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def parent(path: str) -> str:
    """The directory holding ``path``: ``gs://b/root/dt=1`` -> ``gs://b/root``; a local path is
    made absolute first (``out`` -> the working directory)."""
    if "://" in path:
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def isdir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def _local_path(path: str) -> str | None:
    """``path`` as a local filesystem path (``file://`` stripped); None on an object store."""
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if "://" in path else path


def remove_empty_dir(path: str) -> bool:
    """Removes the local directory ``path`` if it is empty; True if it did. An object store
    (``gs://``) has no empty directories: nothing to do there."""
    local = _local_path(path)
    if local is None:
        return False
    try:
        os.rmdir(local)
    except OSError:  # not empty, or gone
        return False
    return True


@contextlib.contextmanager
def cleaned_up_on_failure(path: str) -> Iterator[None]:
    """If the block raises (an error, Ctrl-C), removes the local directory ``path`` and each of
    its ancestors that did not exist before the block, as long as they are empty: a command
    refused or failed after it began leaves no empty ``a/b/c`` behind, and never touches what
    was there. Nothing to do on an object store (no empty directories)."""
    made: list[str] = []
    local = _local_path(path)
    if local is not None:
        d = os.path.abspath(local)
        while not os.path.exists(d):
            made.append(d)  # deepest first
            d = os.path.dirname(d)
    try:
        yield
    except BaseException:
        for d in made:
            if not remove_empty_dir(d):
                break
        raise


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.makedirs(p, exist_ok=True)


def remove(path: str) -> None:
    """Deletes the file ``path`` (local or ``gs://``); FileNotFoundError if there is none."""
    fs, p = filesystem(path)
    fs.rm_file(p)


def remove_tree(path: str) -> None:
    """Deletes the directory ``path`` and everything in it (local or ``gs://``)."""
    fs, p = filesystem(path)
    fs.rm(p, recursive=True)
