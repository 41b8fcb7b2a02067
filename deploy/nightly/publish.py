"""Nightly refresh bookkeeping: publish a finished dated run as ``LATEST``, prune old runs.

Layout under a root (local path or ``gs://``)::

    ROOT/dt=2025-01-01/ ... _SUCCESS     one `rso generate` output directory per night
    ROOT/dt=2025-01-02/ ...              (no _SUCCESS: failed or still running, never published)
    ROOT/LATEST                          one line: the absolute path of the newest published run

Run names are ``dt=YYYY-MM-DD`` (Hive-style partitions; ``refresh.sh`` writes them). Bare
``YYYY-MM-DD`` names, which older refreshes wrote, are still read, ordered and pruned with them
by their date; a date given where a run name is expected means ``dt=`` + that date.

Rules:

- ``LATEST`` moves only to a run whose ``_SUCCESS`` exists (the pipeline writes it last), and only
  forward (runs are ordered by their date) unless ``force``. A ``LATEST`` whose last part is not
  a run name cannot be ordered: publishing fails (exit 1) until ``--force`` replaces it.
- ``LATEST`` holds an absolute path or URL (a relative ROOT is made absolute first), so it reads
  the same from any directory; an old relative ``LATEST`` is read as ``ROOT/<its last part>``.
- ``LATEST`` is replaced atomically: a reader sees the old or the new pointer, never a partial
  one. Locally the text goes to a temporary file in the same directory, then ``os.replace``; on
  GCS a single-request object upload is atomic by itself (the object appears when the upload
  finalises), which is the whole file.
- Retention (``keep=N``): the N newest complete runs stay, and so does the ``LATEST`` target;
  incomplete runs older than the oldest kept one are stale failures and go too. Nothing newer than
  the ``LATEST`` target is touched (it may be running), nor anything whose name is not a run
  name. Retention is refused (:class:`PublishError`, nothing moved or deleted) while any run
  under ROOT holds a candidate store (``candidates-*.parquet``): incremental runs
  (``--reuse-candidates ROOT``) keep reusing an old night's candidates for as long as its
  prompts are in the prompt file, so no night can be deleted safely by age
  (docs/CANDIDATES.md, Incremental runs).

Beam-free (``rso.storage``, i.e. fsspec/gcsfs), so it runs on any host that can read the bucket::

    python -m deploy.nightly.publish publish ROOT dt=2025-01-02 [--keep 7] [--force]
    python -m deploy.nightly.publish latest ROOT      # prints the published run's path
    python -m deploy.nightly.publish complete RUN_DIR # exit 0 if RUN_DIR has _SUCCESS
    python -m deploy.nightly.publish check-keep ROOT  # exit 2 if --keep would be refused
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import sys
import tempfile
from collections.abc import Sequence

from rso import storage as rso_io
from rso.config import ArgumentParser
from rso.layout import SUCCESS, candidate_files, is_complete

LATEST = "LATEST"
PARTITION = "dt="
RUN_NAME = re.compile(r"^(dt=)?\d{4}-\d{2}-\d{2}$")  # dt=YYYY-MM-DD, or an older bare date


class PublishError(RuntimeError):
    """A run that must not be published (incomplete, misnamed, older than LATEST)."""


@dataclasses.dataclass(frozen=True)
class PublishResult:
    latest: str                  # the path LATEST names after the call
    moved: bool                  # whether LATEST changed
    pruned: tuple[str, ...] = ()  # run directories deleted by retention


def run_name(date: datetime.date) -> str:
    """The directory name of one night's run: ``dt=YYYY-MM-DD``."""
    return PARTITION + date.isoformat()


def check_run_name(name: str) -> str:
    """``name`` if it is a run name (``dt=YYYY-MM-DD`` or an older bare ``YYYY-MM-DD``) of a
    real date, else :class:`PublishError`."""
    try:
        if RUN_NAME.match(name):
            datetime.date.fromisoformat(run_date(name))  # rejects 2025-13-40
            return name
    except ValueError:
        pass
    raise PublishError(f"run name {name!r} is not a date dt=YYYY-MM-DD")


def run_date(name: str) -> str:
    """The ``YYYY-MM-DD`` of a run name: what runs are ordered by."""
    return name[len(PARTITION):] if name.startswith(PARTITION) else name


def resolve_run(root: str, name: str) -> str:
    """The run directory name ``name`` means under ``root``: a bare date names the existing
    bare-date run of that date if there is one (an older refresh's), else ``dt=`` + date."""
    check_run_name(name)
    if name.startswith(PARTITION) or rso_io.exists(rso_io.join(root, name)):
        return name
    return PARTITION + name


def run_path(root: str, name: str) -> str:
    return rso_io.join(root, check_run_name(name))


def _local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def absolute_root(root: str) -> str:
    """``root`` as an absolute local path (``file://`` dropped) or the URL unchanged."""
    if not _local(root):
        return root.rstrip("/")
    path = root[len("file://"):] if root.startswith("file://") else root
    return os.path.abspath(path)


def write_atomic(path: str, text: str) -> None:
    """Replaces the file at ``path`` with ``text`` so that readers never see a partial file."""
    data = text.encode("utf-8")
    if _local(path):
        path = path[len("file://"):] if path.startswith("file://") else path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs, p = rso_io.filesystem(path)
        fs.pipe_file(p, data)  # one upload request: the object is replaced whole or not at all


def read_latest(root: str) -> str | None:
    """The run path ``ROOT/LATEST`` names, or None if nothing was published yet."""
    pointer = rso_io.join(root, LATEST)
    if not rso_io.exists(pointer):
        return None
    with rso_io.open_file(pointer, "rb") as f:
        text = f.read().decode("utf-8").strip()
    if text and _local(text) and not os.path.isabs(text):
        # Written by an older publish with a relative ROOT: relative to a directory unknown
        # here, but a run always lies in ROOT.
        text = rso_io.join(absolute_root(root), _name_of(text))
    return text or None


def list_runs(root: str) -> list[str]:
    """Names of the dated run directories under ``root``, oldest first."""
    if not rso_io.exists(root):
        return []
    fs, p = rso_io.filesystem(root)
    fs.invalidate_cache(p)  # gcsfs caches listings; other processes write the runs
    names = {entry.rstrip("/").rsplit("/", 1)[-1]
             for entry in fs.ls(p, detail=False)}
    return sorted((n for n in names if RUN_NAME.match(n)), key=lambda n: (run_date(n), n))


def _name_of(run: str) -> str:
    return run.rstrip("/").rsplit("/", 1)[-1]


def prune(root: str, keep: int, latest: str | None = None) -> list[str]:
    """Deletes runs beyond the ``keep`` newest complete ones (see module doc); returns paths.

    ``latest`` (a run name) is never deleted and nothing newer than it is touched.
    """
    if keep < 1:
        raise PublishError(f"keep must be >= 1, got {keep}")
    check_retention_allowed(root)
    names = list_runs(root)
    if latest is not None:
        names = [n for n in names if run_date(n) <= run_date(latest)]
    complete = [n for n in names if is_complete(run_path(root, n))]
    kept = set(complete[-keep:])
    if latest is not None:
        kept.add(latest)
    oldest_kept = min((run_date(n) for n in kept), default=None)
    doomed = [n for n in names if n not in kept
              and (n in complete or (oldest_kept is not None and run_date(n) < oldest_kept))]
    fs, _ = rso_io.filesystem(root)
    removed = []
    for n in doomed:
        path = run_path(root, n)
        _, p = rso_io.filesystem(path)
        fs.rm(p, recursive=True)
        removed.append(path)
    return removed


def retention_refusal(root: str) -> str | None:
    """Why retention (``--keep``) is refused under ``root``, or None when it is allowed: the
    runs that hold a candidate store, which incremental runs may still reuse (see the module
    doc), and the ways out that work."""
    stores = [run_path(root, name) for name in list_runs(root)
              if candidate_files(run_path(root, name))]
    if not stores:
        return None
    remove = (f"gcloud storage rm '{root}/*/candidates-*.parquet'" if not _local(root)
              else f"rm -- '{absolute_root(root)}'/*/candidates-*.parquet")
    return (f"retention (--keep / KEEP) is refused: {len(stores)} run(s) under {root} hold a "
            f"candidate store ({', '.join(_name_of(p) for p in stores)}), which incremental "
            f"runs (--reuse-candidates {root}) may still reuse. Either keep every night (unset "
            f"KEEP); or write to a new OUTPUT_ROOT with REUSE=0 and a config without "
            f"write_candidates; or, to prune this root, stop reusing its candidates (REUSE=0, "
            f"no write_candidates) and delete its stores by hand: {remove}")


def check_retention_allowed(root: str) -> None:
    """:class:`PublishError` (:func:`retention_refusal`) when a run under ``root`` holds a
    candidate store."""
    refusal = retention_refusal(root)
    if refusal:
        raise PublishError(refusal)


def publish(root: str, name: str, keep: int | None = None, force: bool = False
            ) -> PublishResult:
    """Points ``ROOT/LATEST`` at ``ROOT/name`` if that run is complete; then applies retention.

    Raises :class:`PublishError` (LATEST untouched) if the run has no ``_SUCCESS``, or if the
    current LATEST's last part is not a date (it cannot be ordered) unless ``force``. A run older
    than the current LATEST leaves LATEST where it is unless ``force`` (a backfill must not hide a
    newer night). ``root`` may be relative: LATEST always holds an absolute path.
    """
    root = absolute_root(root)
    name = resolve_run(root, name)
    path = run_path(root, name)
    if keep:
        check_retention_allowed(root)  # before LATEST moves
    if not is_complete(path):
        raise PublishError(f"{path} has no {SUCCESS}: the run failed or is still running; "
                           f"{LATEST} stays where it was")
    current = read_latest(root)
    moved = False
    if current is not None and not RUN_NAME.match(_name_of(current)) and not force:
        raise PublishError(f"{rso_io.join(root, LATEST)} names {current}, whose last part is "
                           f"not a date dt=YYYY-MM-DD, so it cannot be ordered against "
                           f"{name}; "
                           f"fix it, or pass --force to point it at {name}")
    if current == path:
        pass
    elif current is not None and run_date(_name_of(current)) > run_date(name) and not force:
        pass
    else:
        write_atomic(rso_io.join(root, LATEST), path + "\n")
        current, moved = path, True
    pruned = tuple(prune(root, keep, _name_of(current))) if keep else ()
    return PublishResult(latest=current, moved=moved, pruned=pruned)


def latest_complete(root: str) -> str:
    """The published run's path, checked to be complete: what a consumer should read."""
    run = read_latest(root)
    if run is None:
        raise PublishError(f"{rso_io.join(root, LATEST)} does not exist: nothing published yet")
    if not is_complete(run):
        raise PublishError(f"{LATEST} names {run}, which has no {SUCCESS}")
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m deploy.nightly.publish",
                            description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish", help="point ROOT/LATEST at ROOT/RUN if RUN has _SUCCESS")
    p.add_argument("root")
    p.add_argument("run", help="run directory name, dt=YYYY-MM-DD (a bare date means that)")
    p.add_argument("--keep", type=int, default=None,
                   help="keep the N newest complete runs (default: keep all)")
    p.add_argument("--force", action="store_true",
                   help="move LATEST even to a run older than the current one")
    q = sub.add_parser("latest", help="print the path ROOT/LATEST names (checked complete)")
    q.add_argument("root")
    c = sub.add_parser("complete", help="exit 0 if RUN_DIR has _SUCCESS, else 1")
    c.add_argument("run_dir")
    k = sub.add_parser("check-keep", help="exit 0 if publish --keep would prune ROOT, else 2 "
                       "with the reason (a run holds a candidate store): refresh.sh asks this "
                       "before running the pipeline")
    k.add_argument("root")
    n = sub.add_parser("check-name", help="exit 0 if NAME is a valid run name (dt=YYYY-MM-DD "
                       "or YYYY-MM-DD)")
    n.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "latest":
            print(latest_complete(args.root))
            return 0
        if args.command == "complete":
            return 0 if is_complete(args.run_dir) else 1
        if args.command == "check-keep":
            refusal = retention_refusal(absolute_root(args.root))
            if refusal:
                print(f"publish: {refusal}", file=sys.stderr)
                return 2
            return 0
        if args.command == "check-name":
            check_run_name(args.name)
            return 0
        result = publish(args.root, args.run, keep=args.keep, force=args.force)
    except PublishError as e:
        print(f"publish: {e}", file=sys.stderr)
        return 1
    state = "moved to" if result.moved else "unchanged at"
    print(f"{LATEST} {state} {result.latest}")
    for path in result.pruned:
        print(f"pruned {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
