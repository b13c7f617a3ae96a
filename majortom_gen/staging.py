"""Write a folder of outputs so that an interrupted job leaves nothing half-written.

``with staged_folder(out) as tmp:`` yields a fresh sibling folder ``.<name>.partial-<id>``;
on success it replaces ``out`` (an older ``out`` is removed only then), on any error the
partial folder is deleted and ``out`` is left as it was. Leftovers of killed runs
(``.<name>.partial-*``) are removed the next time the same output is written.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.partial-old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
