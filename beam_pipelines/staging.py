"""Staging and commit: a run writes into ``OUTPUT/_staging-<token>/`` and only a complete
staging directory replaces what ``OUTPUT`` holds, so a failed run never destroys a good one.

This is Hadoop's FileOutputCommitter pattern (task output under ``OUTPUT/_temporary``, moved
into place on commit, then ``_SUCCESS``), with ``_SUCCESS`` as the only commit point readers
rely on (SPEC 5: a reader ignores a directory without it):

1. The pipeline writes the whole SPEC 5 directory, ``_SUCCESS`` last, into the staging
   directory (names beginning with ``_`` are not run files: readers' globs never match them).
2. :func:`commit` (only once the staging directory has ``_SUCCESS``): deletes
   ``OUTPUT/_SUCCESS`` (from here readers ignore OUTPUT), deletes the old run's files that the
   new run does not replace, moves the new files in (a rename locally; copy + delete on GCS),
   ``manifest.json`` then ``_SUCCESS`` last, and removes the staging directory.
3. A crash during 2 leaves a complete staging directory and an OUTPUT without ``_SUCCESS``;
   :func:`recover` (run by the next owner of OUTPUT) finishes the commit, because every step of
   :func:`commit` can be repeated. An incomplete staging directory is a failed run's leftover
   and is deleted.

Callers hold the directory's lock (:mod:`rso.ownership`) around all of this. Works on every
filesystem Beam's ``FileSystems`` knows (local, gs://).

Before 2, the launcher may add what only it knows to the staged manifest
(:func:`amend_manifest`: its wall time, in the ``cost`` section); the replacement is atomic, so
a crash leaves the pipeline's manifest or the amended one, never a partial file, and a
recovering commit moves either.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_pipelines import manifest as M
from beam_pipelines.plots import PLOT_NAMES
from beam_pipelines.write import prepare_output, write_file
from rso.console import command_log
from rso.layout import MANIFEST, SUCCESS
from rso.storage import basename, beam_escape

STAGING_PREFIX = "_staging-"


def staging_dir(output: str, token: str) -> str:
    """Where a run identified by ``token`` writes before its commit."""
    return FileSystems.join(output, STAGING_PREFIX + token)


def _exists(path: str) -> bool:
    return FileSystems.exists(path)


def _files(directory: str) -> list[str]:
    """Files directly inside ``directory`` (not in its subfolders)."""
    pattern = FileSystems.join(beam_escape(directory), "*")
    found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if FileSystems.get_scheme(directory) is None:
        found = [f for f in found if os.path.isfile(f)]
    return sorted(found)


def staging_dirs(output: str) -> list[str]:
    """The staging directories inside ``output``."""
    base = output.rstrip("/")
    if FileSystems.get_scheme(output) is None:
        return sorted(d for d in glob.glob(os.path.join(glob.escape(base), STAGING_PREFIX + "*"))
                      if os.path.isdir(d))
    # An object store lists objects, not folders: take the first part below OUTPUT.
    objects = FileSystems.match([f"{beam_escape(base)}/{STAGING_PREFIX}**"])[0].metadata_list
    return sorted({f"{base}/{m.path[len(base) + 1:].split('/', 1)[0]}" for m in objects})


def discard(staging: str) -> None:
    """Deletes a staging directory and everything in it (no error if it is gone)."""
    if FileSystems.get_scheme(staging) is None:
        if os.path.isdir(staging):
            FileSystems.delete([staging])
        return
    objects = [m.path for m in FileSystems.match([FileSystems.join(beam_escape(staging), "**")])[0]
               .metadata_list]
    if objects:
        FileSystems.delete(objects)


def _new_names(staging: str, output: str) -> set[str]:
    """The file names of the run being committed, from its manifest (in the staging directory,
    or already moved into OUTPUT by an interrupted commit)."""
    source = FileSystems.join(staging, MANIFEST)
    if not _exists(source):
        source = FileSystems.join(output, MANIFEST)
    with FileSystems.open(source) as f:
        files = json.loads(f.read().decode("utf-8")).get("files", {})
    return {MANIFEST, *PLOT_NAMES, *(n for names in files.values() for n in names)}


def commit(staging: str, output: str) -> None:
    """Replaces OUTPUT's run with the complete run in ``staging`` (steps 2 of the module doc).

    Raises RuntimeError if ``staging`` has no ``_SUCCESS``. Files in OUTPUT that are not run
    files (a user's notes, ``_LOCK``, other staging directories) are left alone.
    """
    if not _exists(FileSystems.join(staging, SUCCESS)):
        raise RuntimeError(f"{staging} has no {SUCCESS}: the run is not complete, nothing was "
                           f"replaced")
    new = _new_names(staging, output)
    # _SUCCESS first, then the old run's files: a stale shard would be read as part of this run.
    removed = prepare_output(output, overwrite=True, keep=new)
    if removed:
        command_log().info("replacing the previous run in %s (%d files)", output, len(removed))
    moves = [f for f in _files(staging) if basename(f) not in (MANIFEST, SUCCESS)]
    moves += [FileSystems.join(staging, MANIFEST), FileSystems.join(staging, SUCCESS)]
    for src in moves:
        if _exists(src):
            dst = FileSystems.join(output, basename(src))
            if FileSystems.get_scheme(output) is None and os.path.exists(dst):
                os.replace(src, dst)  # FileSystems.rename refuses an existing destination
            else:
                FileSystems.rename([src], [dst])
    discard(staging)


def amend_manifest(staging: str, update: Callable[[dict[str, Any]], None]) -> None:
    """Replaces ``staging``'s manifest.json by itself as changed in place by ``update(doc)``
    (written with :func:`beam_pipelines.manifest.dumps`). Atomic: locally a temporary file
    beside the staging directory (a name beginning with ``_``, so a leftover is never a run
    file) renamed over it; on an object store one object write, which is atomic there. Then
    ``_SUCCESS`` is written again, so that it stays the last file written."""
    path = FileSystems.join(staging, MANIFEST)
    with FileSystems.open(path) as f:
        doc = json.loads(f.read().decode("utf-8"))
    update(doc)
    data = M.dumps(doc)
    if FileSystems.get_scheme(staging) is None:
        parent, name = os.path.split(staging.rstrip("/"))
        tmp = os.path.join(parent, f"_{name}.{MANIFEST}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        write_file(path, data, "application/json")
    write_file(FileSystems.join(staging, SUCCESS), b"", "text/plain")


def recover(output: str, keep: str | None = None) -> None:
    """Finishes a commit that a crash interrupted (a complete staging directory while OUTPUT
    has no ``_SUCCESS``) and deletes failed runs' staging directories, except ``keep``."""
    for staging in staging_dirs(output):
        if staging.rstrip("/") == (keep or "").rstrip("/"):
            continue
        if _exists(FileSystems.join(staging, SUCCESS)) and not _exists(
                FileSystems.join(output, SUCCESS)):
            command_log().warning("%s: finishing the commit of %s, which was interrupted",
                                  output, staging)
            commit(staging, output)
        else:
            command_log().info("%s: deleting %s, left by a run that did not finish", output,
                               staging)
            discard(staging)
