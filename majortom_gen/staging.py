"""Write a folder of outputs so that an interrupted job leaves nothing half-written, and
never delete what the tool did not write.

``check_output(out, overwrite=..., inputs=...)`` is called before any work: it refuses an
``out`` that is a file, an existing non-empty folder that majortom-gen did not write (no
marker file), an earlier majortom-gen output unless ``overwrite``, the working directory or
one of its parents, and any input of the same command (the store, the model, the samples)
or a folder that holds or lies inside one.

``with staged_folder(out, ...) as tmp:`` checks again, then yields a fresh sibling folder
``.<name>.partial-<pid>-<id>``; on success it writes the marker and replaces ``out`` (an
older output is removed only then), on any error the partial folder is deleted, ``out`` is
left as it was, and a file-system error names ``out`` (not the hidden folder) and says
when the disk is full. Partial folders left by killed runs (their pid is gone) are removed
the next time any command writes into the same parent folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from majortom_gen.errors import MajorTomGenError

MARKER = ".majortom-gen-output.json"  # in every folder written through staged_folder
_PARTIAL = re.compile(r"^\..+\.partial-(?:old-)?(?:(\d+)-)?[0-9a-f]{8}$")


class OutputError(MajorTomGenError, ValueError):
    """An output path that must not be written (it would destroy something)."""


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = (),
                 option: str = "--out") -> Path:
    """Raise :class:`OutputError` (naming ``option`` and the path) unless ``out`` may be
    written; returns its resolved path. See the module docstring for the rules."""
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


def _marker_kind(path: Path) -> str:
    try:
        return str(json.loads((path / MARKER).read_text()).get("kind", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.partial-*`` folders under ``folder`` left by runs that are no longer
    alive (their pid is in the name; names without a pid are from older versions and are
    removed too). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _PARTIAL.match(entry.name)
        if not match or not entry.is_dir():
            continue
        if match.group(1) is not None and _pid_alive(int(match.group(1))):
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
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
    if final.exists():
        old = final.parent / f".{final.name}.partial-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
