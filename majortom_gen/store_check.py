"""``majortom-gen store check [--repair]``: read every shard of a latent store, report what is
missing, unreadable, changed, unlisted or stored twice, and make the store consistent again
(unreadable shards moved to ``STORE/quarantine/``, the manifest rebuilt from the intact
shards' footers, the cells to ingest again listed).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from majortom_gen.errors import StoreError
from majortom_gen.modalities import MODALITY_NAMES
from majortom_gen.store import FORMAT, LatentStore, file_sha256, shard_footer, store_header, unpack_cells
from majortom_gen.store_lock import holder_text, lock_holder, store_lock

QUARANTINE_DIR = "quarantine"


@dataclass
class ShardProblem:
    """A shard that is ``missing`` (listed, not on disk), ``unreadable``, ``changed`` (readable,
    but not what was written) or ``unlisted`` (on disk, not in the manifest)."""

    file: str
    problem: str
    reason: str
    cells: dict[str, list[str]] | None = None  # cell -> modalities it held; None: unknown


@dataclass
class StoreCheck:
    """What :func:`check_store` found, and what ``repair`` did."""

    root: Path
    shards: int = 0  # intact shards
    rows: int = 0  # rows in them
    manifest: str | None = None  # what is wrong with manifest.json
    problems: list[ShardProblem] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # "cell fragment k: M in part-a, part-b"
    repaired: bool = False
    moved: list[str] = field(default_factory=list)  # shards moved to quarantine/
    reingest: dict[str, list[str]] = field(default_factory=dict)  # cell -> modalities lost
    unknown: list[str] = field(default_factory=list)  # lost shards whose cells nobody recorded
    intact: list[str] = field(default_factory=list)  # readable shards: listed ones in manifest order, then unlisted
    header: dict | None = None  # the old manifest's store header, when it was readable
    extra: dict = field(default_factory=dict)  # the old manifest's other keys (e.g. a dataset's split)
    writer: str | None = None  # the writer holding the lock while the store was checked, if any

    @property
    def ok(self) -> bool:
        return self.manifest is None and not self.problems and not self.duplicates


def _load_manifest(root: Path) -> tuple[dict | None, str | None]:
    path = root / "manifest.json"
    if not path.exists():
        return None, "missing"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"unreadable ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("shards"), list):
        return None, f"not a {FORMAT} manifest"
    return manifest, None


def _verify_shard(path: Path, modalities: Sequence[str]) -> pa.Table:
    """Read a whole shard (every page decompressed); its key columns and latents must be there."""
    table = pq.read_table(path)
    lacking = [c for c in ("grid_cell", "fragment_index", *modalities) if c not in table.column_names]
    if lacking:
        raise StoreError(f"not a store shard: no column(s) {lacking}")
    return table


def _fragment_keys(table: pa.Table, modalities: Sequence[str], file: str) -> pd.DataFrame:
    cells = table.column("grid_cell").to_numpy(zero_copy_only=False)
    frags = table.column("fragment_index").to_numpy(zero_copy_only=False)
    parts = []
    for m in modalities:
        valid = table.column(m).is_valid().to_numpy(zero_copy_only=False)
        parts.append(pd.DataFrame({"cell": cells[valid], "fragment": frags[valid], "modality": m, "file": file}))
    return pd.concat(parts, ignore_index=True)


def _duplicates(keys: pd.DataFrame) -> list[str]:
    if keys.empty:
        return []
    dup = keys[keys.duplicated(["cell", "fragment", "modality"], keep=False)]
    out = []
    for (cell, frag, m), rows in dup.groupby(["cell", "fragment", "modality"], sort=True):
        out.append(f"{cell} fragment {frag}: {m} stored twice (in {', '.join(sorted(set(rows['file'])))})")
    return out


def check_store(root: str | os.PathLike, repair: bool = False) -> StoreCheck:
    """Read every shard of the store at ``root`` and report missing, unreadable, changed and
    unlisted shards and fragments stored twice. With ``repair`` (under the write lock):
    unreadable shards are moved to ``root/quarantine/``, the manifest is rebuilt from the
    intact shards (its header from the old manifest, or else from the shards' footers; a
    fragment stored twice keeps its first copy), and the cells whose latents were lost are
    listed in ``reingest`` so that the next ``ingest`` of them adds them again."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such folder")
    if not repair:
        report = _check(root)
        holder = lock_holder(root)
        report.writer = holder_text(holder) if holder else None
        return report
    with store_lock(root, "store check --repair"):
        report = _check(root)
        if not report.ok:
            _repair(root, report)
    return report


def _check(root: Path) -> StoreCheck:
    manifest, manifest_problem = _load_manifest(root)
    shard_dir = root / "shards"
    on_disk = sorted(p.name for p in shard_dir.glob("part-*.parquet"))
    if manifest is None and not on_disk:
        raise StoreError(f"{root}: not a latent store (manifest.json {manifest_problem}, no shards/part-*.parquet)")
    report = StoreCheck(root, manifest=manifest_problem)
    entries = {e["file"]: e for e in (manifest or {}).get("shards", [])}
    modalities = (manifest or {}).get("modalities") or list(MODALITY_NAMES)
    keys = []
    for name in list(entries) + [n for n in on_disk if n not in entries]:
        entry, path = entries.get(name), shard_dir / name
        held = {c: sorted(m) for c, m in unpack_cells(entry["cells"]).items()} if entry and "cells" in entry else None
        if not path.exists():
            report.problems.append(ShardProblem(name, "missing", "listed in manifest.json, not on disk", held))
            continue
        try:
            table = _verify_shard(path, modalities)
        except (pa.ArrowException, OSError, StoreError) as exc:
            report.problems.append(ShardProblem(name, "unreadable", str(exc), held))
            continue
        if entry is None:
            report.problems.append(ShardProblem(name, "unlisted", "on disk, not in manifest.json (adopted by a repair)"))
        elif "sha256" in entry and file_sha256(path) != entry["sha256"]:
            report.problems.append(ShardProblem(name, "changed", "readable, but not the file that was written "
                                                "(sha256 differs; a repair records it as it is now)"))
        report.intact.append(name)
        report.shards += 1
        report.rows += table.num_rows
        keys.append(_fragment_keys(table, modalities, name))
    report.duplicates = _duplicates(pd.concat(keys, ignore_index=True) if keys else pd.DataFrame())
    report.header = store_header(manifest) if manifest else None
    report.extra = {k: v for k, v in (manifest or {}).items() if k != "shards"}
    return report


def _header_from_shards(root: Path, names: Sequence[str]) -> dict:
    for name in names:
        try:
            header = shard_footer(root / "shards" / name)[1].get("store")
        except (pa.ArrowException, OSError):
            continue
        if header and header.get("format") == FORMAT and "codec" in header:
            return header
    raise StoreError(f"{root}: cannot rebuild manifest.json: no intact shard records the store's codec (shards "
                     "written by majortom-gen before `store check` existed do not); restore manifest.json from a "
                     "backup, or ingest the cells into a new store")


def _quarantine(root: Path, name: str) -> str:
    folder = root / QUARANTINE_DIR
    folder.mkdir(exist_ok=True)
    target = folder / name
    if target.exists():
        target = folder / f"{Path(name).stem}.{uuid.uuid4().hex[:8]}.parquet"
    os.replace(root / "shards" / name, target)
    return str(target.relative_to(root))


def _repair(root: Path, report: StoreCheck) -> None:
    for p in report.problems:
        if p.problem == "unreadable":
            report.moved.append(_quarantine(root, p.file))
    header = report.header or _header_from_shards(root, report.intact)
    manifest = {**report.extra, **header, "shards": []}
    store = LatentStore(root, manifest)
    store._index = {}
    for name in report.intact:  # a (cell, modality) already listed is dropped from later shards
        store.add_shard(name, trust_footer=False)
    store._write_manifest()
    stored = store._stored_index()
    for p in report.problems:
        if p.problem not in ("missing", "unreadable"):
            continue
        if p.cells is None:
            report.unknown.append(p.file)
            continue
        for cell, mods in p.cells.items():
            lost = sorted(set(mods) - stored.get(cell, set()))
            if lost:
                report.reingest[cell] = sorted(set(report.reingest.get(cell, [])) | set(lost))
    report.repaired = True


