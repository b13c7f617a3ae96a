"""Write a folder of outputs so that an interrupted job leaves nothing half-written, and
never delete what the tool did not write.

``check_output(out, overwrite=..., inputs=...)`` is called before any work: it refuses an
``out`` that is a file, an existing non-empty folder that majortom-gen did not write (no
marker file), an earlier majortom-gen output unless ``overwrite``, the working directory or
one of its parents, and any input of the same command (the store, the model, the samples)
or a folder that holds or lies inside one.

``with staged_folder(out, ...) as tmp:`` checks again, then yields a fresh sibling folder
``.<name>.partial-<host>-<pid>-<id>``; on success it writes the marker and replaces ``out`` (an
older output is removed only then), on any error the partial folder is deleted, ``out`` is
left as it was, and a file-system error names ``out`` (not the hidden folder) and says
when the disk is full. Partial folders left by killed runs of this host (their pid is gone)
are removed the next time any command writes into the same parent folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from majortom_gen.errors import MajorTomGenError

MARKER = ".majortom-gen-output.json"  # in every folder written through staged_folder
# .<name>.partial-[old-]<host>-<pid>-<8 hex>: only this host's partials of dead pids are removed
_PARTIAL = re.compile(r"^\..+\.partial-(?:old-)?(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


class OutputError(MajorTomGenError, ValueError):
    """An output path that must not be written (it would destroy something)."""


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_place(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                option: str = "--out") -> Path:
    """Refuse an output path that is the working directory or a parent of it, or that is, holds
    or lies inside one of ``inputs``; returns the resolved path."""
    given = Path(out)
    path = given.expanduser().resolve()
    if _within(Path.cwd().resolve(), path):
        raise OutputError(f"{option} {given} is the working directory or one of its parents; give a new folder "
                          f"(e.g. {option} {given / 'out'})")
    for item in inputs:
        if item is None:
            continue
        inp = Path(item).expanduser().resolve()
        if _within(inp, path) or _within(path, inp):
            where = "is" if inp == path else ("holds" if _within(inp, path) else "lies inside")
            raise OutputError(f"{option} {given} {where} the input {item}; writing it would replace the input. "
                              "Give a separate folder.")
    return path


def check_output(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = (),
                 option: str = "--out") -> Path:
    """Raise :class:`OutputError` (naming ``option`` and the path) unless ``out`` may be
    written; returns its resolved path. See the module docstring for the rules."""
    given = Path(out)
    path = check_place(given, inputs=inputs, option=option)
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{option} {given} exists and is a file; give a folder path that does not exist")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise OutputError(f"{option} {given} exists and holds files that majortom-gen did not write; nothing was "
                              "changed. Give a new folder (majortom-gen never deletes what it did not write).")
        if not overwrite:
            what = _marker_kind(path)
            raise OutputError(f"{option} {given} holds an earlier output{' of ' + what if what else ''}; pass --overwrite "
                              "to replace it, or give a new folder")
    return path


def local_paths(*sources: str | os.PathLike | None) -> list[Path]:
    """The local files or folders among option values that may also be hub ids or URLs
    (``--codec-source``, ``--source``; ``ENCODE,DECODE`` pairs split), for ``inputs``."""
    out = []
    for source in sources:
        for part in (str(source).split(",") if source else []):
            if part and "://" not in part and Path(part).expanduser().exists():
                out.append(Path(part))
    return out


def _marker_kind(path: Path) -> str:
    try:
        return str(json.loads((path / MARKER).read_text()).get("kind", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the partial folders under ``folder`` left by killed runs of this host: names
    ``.<name>.partial-<host>-<pid>-<8 hex>`` whose host is this one and whose pid is no
    longer alive (a run on another machine sharing the folder is never touched, nor anything
    else). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _PARTIAL.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        if match.group("host") != _host() or pid_alive(int(match.group("pid"))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _disk_note(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" (the disk is full: {free / 2**20:.0f} MiB free)" if free < 64 * 2**20 else ""


@contextmanager
def staged_folder(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = (),
                  kind: str = "") -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block succeeds (see the module
    docstring); ``kind`` (e.g. ``"generate"``) is recorded in the marker."""
    given = Path(out)
    final = check_output(given, overwrite=overwrite, inputs=list(inputs))
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final.parent)
    tmp = final.parent / f".{final.name}.partial-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"made_by": "majortom-gen", "kind": kind}) + "\n")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, MajorTomGenError):
            detail = str(exc).replace(str(tmp), str(given))
            raise MajorTomGenError(f"could not write {given}: {detail}{_disk_note(final.parent)}") from exc
        if type(exc).__module__.startswith("rasterio"):  # GDAL errors: no errno, often no path
            raise MajorTomGenError(f"could not write {given}: {exc}{_disk_note(final.parent)}") from exc
        raise
    had_old = final.exists()
    try:
        swap_in(tmp, final, aside=final.parent / f".{final.name}.partial-old-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    except OSError as exc:  # e.g. --out is a mount point: the old output is back, nothing half-done
        shutil.rmtree(tmp, ignore_errors=True)
        raise MajorTomGenError(f"could not move the finished output into {given}: {exc.strerror or exc}; "
                               f"{'the earlier output is unchanged' if had_old else 'nothing was written'}") from exc


def swap_in(new: Path, target: Path, aside: Path | None = None) -> None:
    """Move the complete folder ``new`` to ``target``. An existing ``target`` is moved aside
    first (to ``aside``; put back if the move fails) and deleted only once the new one is in
    place: at every instant the old folder or the new one is complete."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = aside or target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        if not target.exists():
            os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_path(path: str | os.PathLike, *, sync: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary sibling of the file ``path`` (``.NAME.tmp-<hex>``, same
    suffix) to write; when the block succeeds it replaces ``path`` in one rename (after an
    fsync with ``sync``), so readers see the old file or the new one, never half of one. On
    any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_path`'s temporaries."""
    return name.startswith(".") and ".tmp-" in name
