"""One owner per output directory: an exclusive lock object ``OUTPUT/_LOCK``, local or gs://.

A run that writes into a directory (``rso generate --output``, ``rso train --output``) first
creates ``OUTPUT/_LOCK`` with an exclusive create, holding JSON ``{run_id, token, host, pid,
started}``; a second run finds it and fails with :class:`OutputLockedError`, which names the
owner. The owner deletes the lock when it ends (only if it still holds its own token).

- Exclusive create: locally ``open(O_CREAT | O_EXCL)`` (atomic on POSIX filesystems); on GCS an
  upload with the precondition ``ifGenerationMatch=0`` (gcsfs ``mode="create"``), which the
  service refuses with 412 when the object exists. The lock is then read back and its token
  compared, so a store that ignores preconditions (e.g. a GCS emulator) is still caught when the
  two creates are not simultaneous.
- Stale locks (a run killed with SIGKILL, or a machine lost, cannot delete its lock): a lock
  whose host is this machine and whose pid no longer runs is taken over automatically, with a
  warning. Any other lock is reported, with its owner; if that run is really gone (check its
  host), delete the lock and start again: ``rm OUTPUT/_LOCK`` or ``gcloud storage rm
  gs://.../OUTPUT/_LOCK``, or ``python -m rso.ownership break OUTPUT``.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Sequence

from rso import storage
from rso.config import ConfigError

LOCK = "_LOCK"
log = logging.getLogger("rso.ownership")

_held: dict[str, str] = {}  # lock path -> token, for the locks this process holds
_held_guard = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds an output directory: what ``_LOCK`` contains."""
    run_id: str
    token: str
    host: str
    pid: int
    started: str  # ISO 8601, UTC

    @classmethod
    def new(cls, run_id: str) -> Owner:
        return cls(run_id=run_id, token=uuid.uuid4().hex, host=socket.gethostname(),
                   pid=os.getpid(),
                   started=datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"))

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, started {self.started})"


class OutputLockedError(ConfigError):
    """Another run owns the output directory (its ``_LOCK`` exists)."""

    def __init__(self, output: str, owner: Owner | None):
        self.output, self.owner = output, owner
        path = lock_path(output)
        who = owner.describe() if owner else "a run whose lock cannot be read"
        super().__init__(
            f"{output} is owned by {who}; wait for it to end, or, if it is no longer running, "
            f"delete {path} (python -m rso.ownership break {output}) and start again")


def lock_path(output: str) -> str:
    return storage.join(output, LOCK)


def _local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def read_owner(output: str) -> Owner | None:
    """The owner recorded in ``OUTPUT/_LOCK``; None if there is no lock. A lock that cannot be
    parsed (e.g. cut short by a crash) is returned as an owner with empty fields."""
    path = lock_path(output)
    fs, p = storage.filesystem(path)
    if not _local(path):
        fs.invalidate_cache(p.rsplit("/", 1)[0])
    try:
        data = fs.cat_file(p)
    except FileNotFoundError:
        return None
    try:
        return Owner(**json.loads(data))
    except (ValueError, TypeError):
        return Owner(run_id="?", token="", host="?", pid=-1, started="?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def is_stale(owner: Owner, path: str) -> bool:
    """Whether a lock's owner surely ended: it ran on this host and its pid is gone (or is this
    process, which did not take the lock: a pid reused after a restart)."""
    if owner.host != socket.gethostname() or owner.pid <= 0:
        return False
    if owner.pid == os.getpid():
        return _held.get(path) != owner.token
    return not _alive(owner.pid)


def _create_exclusive(path: str, data: bytes) -> None:
    """Creates ``path`` holding ``data``; FileExistsError if it exists."""
    fs, p = storage.filesystem(path)
    if _local(path):
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    elif fs.exists(p):
        raise FileExistsError(path)
    else:
        fs.pipe_file(p, data, mode="create")  # gcsfs: ifGenerationMatch=0, 412 -> FileExistsError


def _delete(path: str) -> None:
    fs, p = storage.filesystem(path)
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


class OutputLock:
    """Ownership of one output directory. Use :meth:`acquire` (a context manager)."""

    def __init__(self, output: str, owner: Owner):
        self.output, self.owner, self.path = output, owner, lock_path(output)

    @classmethod
    def acquire(cls, output: str, run_id: str, *, reentrant: bool = False) -> OutputLock:
        """Takes ``OUTPUT/_LOCK`` or raises :class:`OutputLockedError`. With ``reentrant`` a
        lock this process already holds is returned as is (the trainer, which keeps its lock
        until the process exits, may be called more than once in one process)."""
        path = lock_path(output)
        for _ in range(3):
            current = read_owner(output)
            if current is not None:
                if reentrant and _held.get(path) == current.token:
                    return cls(output, current)
                if not is_stale(current, path):
                    raise OutputLockedError(output, current)
                log.warning("%s: taking over the lock of %s, which no longer runs", output,
                            current.describe())
                _delete(path)
                continue
            me = Owner.new(run_id)
            try:
                _create_exclusive(path, json.dumps(dataclasses.asdict(me)).encode())
            except FileExistsError:
                continue  # another run created it first: report that one on the next pass
            holder = read_owner(output)
            if holder is None or holder.token != me.token:
                raise OutputLockedError(output, holder)
            with _held_guard:
                _held[path] = me.token
            return cls(output, me)
        raise OutputLockedError(output, read_owner(output))

    def release(self) -> None:
        """Deletes the lock if it is still this owner's (idempotent)."""
        with _held_guard:
            if _held.get(self.path) != self.owner.token:
                return
            del _held[self.path]
        current = read_owner(self.output)
        if current is not None and current.token == self.owner.token:
            _delete(self.path)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def release_held(output: str) -> None:
    """Releases now the lock on ``output`` that this process holds (:func:`hold_until_exit`),
    e.g. when the run failed; nothing when it holds none."""
    path = lock_path(output)
    with _held_guard:
        token = _held.get(path)
    current = read_owner(output) if token is not None else None
    if current is not None and current.token == token:
        OutputLock(output, current).release()


def hold_until_exit(output: str, run_id: str) -> OutputLock:
    """Acquires (re-entrantly) and releases when the process exits (SIGKILL leaves a stale
    lock, which this host takes over automatically, see :func:`is_stale`)."""
    lock = OutputLock.acquire(output, run_id, reentrant=True)
    atexit.register(lock.release)
    return lock


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rso.ownership show|break OUTPUT``: print or delete a directory's lock."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("show", "break"):
        print("usage: python -m rso.ownership show|break OUTPUT", file=sys.stderr)
        return 2
    command, output = args
    owner = read_owner(output)
    if owner is None:
        print(f"{output}: no lock")
        return 0
    if command == "show":
        print(f"{output}: owned by {owner.describe()}")
        return 0
    _delete(lock_path(output))
    print(f"{output}: removed the lock of {owner.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
