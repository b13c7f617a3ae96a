"""The latent store's write lock: one writer at a time.

``STORE/write.lock`` is created with ``O_CREAT | O_EXCL`` and holds the writer's pid, host,
purpose, start time and a token. A second writer (another process, or another part of this
one: the lock is not re-entrant) gets :class:`StoreLockedError` naming the holder. A lock on
this host whose pid is dead is taken over with a :class:`StaleLockWarning`; a lock of
another host is never taken over (delete the file when that writer is gone).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from majortom_gen.errors import StoreError
from majortom_gen.staging import pid_alive

LOCK_FILE = "write.lock"
_HELD: dict[str, dict] = {}  # resolved store root -> the lock record this process wrote
_HELD_GUARD = threading.Lock()


class StoreLockedError(StoreError):
    """Another writer (process, or another part of this one) holds the store's write lock."""


class StaleLockWarning(UserWarning):
    """A lock left by a writer that is no longer running was taken over."""


def lock_holder(root: str | os.PathLike) -> dict | None:
    """The record in ``root/write.lock`` (pid, host, purpose, since, token), or None when the
    store is not locked. A record being written is waited for (briefly)."""
    path = Path(root) / LOCK_FILE
    text = ""
    for _ in range(20):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            if isinstance(record, dict):
                return record
        except json.JSONDecodeError:
            pass
        time.sleep(0.05)  # created, content not yet written
    return {"unreadable": text[:200]}


def holds_lock(root: str | os.PathLike) -> bool:
    """Whether this process holds the write lock of the store at ``root``."""
    return str(Path(root).resolve()) in _HELD


def _is_stale(record: dict) -> bool:
    """A lock of this host whose process is gone (or names this process, which does not hold it:
    a pid reused after a restart)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    return pid == os.getpid() or not pid_alive(pid)


def holder_text(record: dict) -> str:
    if "unreadable" in record:
        return f"an unreadable lock record ({record['unreadable']!r})"
    pid = f"pid {record.get('pid')}"
    if record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        pid = f"this process ({pid})"
    return f"{pid} on {record.get('host')} ({record.get('purpose', 'a writer')}, since {record.get('since', '?')})"


def _locked_error(root: Path, record: dict) -> StoreLockedError:
    return StoreLockedError(
        f"{root} is locked for writing by {holder_text(record)}; wait for it to finish. Only one writer at a time "
        f"may change a store. If that process is no longer running, delete {root / LOCK_FILE}.")


def _create_lock(path: Path, record: dict) -> bool:
    """Create the lock file with ``record`` if it does not exist (O_CREAT | O_EXCL)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(root: Path, stale: dict) -> None:
    """Remove the stale lock ``stale``, unless another process replaced it meanwhile: the lock
    is renamed aside, and put back if what was moved is not the stale record."""
    path = root / LOCK_FILE
    aside = root / f".{LOCK_FILE}.{uuid.uuid4().hex}.stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved = json.loads(aside.read_text())
    except (OSError, json.JSONDecodeError):
        moved = None
    if moved != stale:  # a live writer's lock: restore it (never overwrite a newer one)
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    warnings.warn(f"{root}: taking over the stale write lock of pid {stale.get('pid')} on {stale.get('host')} "
                  f"({stale.get('purpose', 'a writer')}, since {stale.get('since', '?')}): no such process on this host",
                  StaleLockWarning, stacklevel=4)


def acquire_lock(root: str | os.PathLike, purpose: str) -> dict:
    """Take the store's write lock (``root/write.lock``: pid, host, purpose, start time) or
    raise :class:`StoreLockedError` naming the holder. Not re-entrant: a second writer in the
    same process is refused too."""
    root = Path(root)
    key = str(root.resolve())
    path = root / LOCK_FILE
    with _HELD_GUARD:
        if key in _HELD:
            raise _locked_error(root, _HELD[key])
        record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
        for _ in range(10):
            if _create_lock(path, record):
                _HELD[key] = record
                return record
            holder = lock_holder(root)
            if holder is None:
                continue  # released meanwhile
            if not _is_stale(holder):
                raise _locked_error(root, holder)
            _take_over(root, holder)
        raise StoreLockedError(f"{root}: could not take the write lock {path}: it keeps changing hands; try again")


def release_lock(root: str | os.PathLike) -> None:
    """Give back the write lock this process holds (the file is removed only if it is still ours)."""
    root = Path(root)
    with _HELD_GUARD:
        record = _HELD.pop(str(root.resolve()), None)
        if record is not None and (lock_holder(root) or {}).get("token") == record["token"]:
            (root / LOCK_FILE).unlink(missing_ok=True)


@contextmanager
def store_lock(root: str | os.PathLike, purpose: str) -> Iterator[dict]:
    """``with store_lock(root, 'ingest'):`` — hold the write lock for the block."""
    record = acquire_lock(root, purpose)
    try:
        yield record
    finally:
        release_lock(root)


# ----------------------------------------------------------------------------- shard files
