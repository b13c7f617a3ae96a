"""The grid-indexed latent store: a folder of GeoParquet shards, one row per
(grid cell, fragment), one nullable column per modality holding its latent moments.

Layout::

    STORE/
      manifest.json        format, codec (name, config hash, config; ``source``: where an sd-vae came
                           from), fragment mode, modalities, and per
                           shard: file, rows, bytes and sha256 as written, cells (grouped by the
                           modalities they have in it)
      shards/part-*.parquet GeoParquet 1.0; each holds whole cells (all their fragments); its footer
                           records the store header and its cells, so a lost manifest can be rebuilt
      codec/               the codec's own files, when it is stored with the store (small-vae, patch-pca)
      ingest-errors.jsonl  cells (and modalities) the last ingest could not store, with reasons
      cache/               memory-mappable arrays built by the training reader
      write.lock           while a writer runs: its pid, host, purpose and start time (JSON)
      quarantine/          shards that `store check --repair` found unreadable, moved aside

Columns (units and axes stated; pixel windows are in the 1068 px, 10 m product grid, as
row/col offsets): ``grid_cell``, ``grid_row_u``, ``grid_col_r``, ``fragment_row``,
``fragment_col``, ``fragment_index`` (row*4+col, -1 for a centre crop), ``row_off``,
``col_off``, ``height``, ``width`` (pixels), ``utm_crs`` (``'EPSG:326zz'``),
``utm_transform`` (rasterio affine a, b, c, d, e, f; metres), ``utm_footprint`` (WKT, metres),
``geometry`` (WGS84 footprint polygon, WKB), ``centre_lat``, ``centre_lon`` (degrees),
``<M>_product_id``, ``<M>_timestamp`` and ``<M>`` for each modality M in DEM, S1RTC, S2L1C,
S2L2A: latent moments (mean and log-variance stacked, ``(8, 32, 32)``) as float16.

A native-family store (``fragment_mode`` ``copgen``) holds COP-GEN's band groups instead: 6 x 6
patches per cell (``fragment_index`` = row*6+col, windows of 192 px in the 10 m grid, the last
row and column overlapping), one column per band group with its own moment shape
(``moment_shapes`` in the manifest, e.g. ``(16, 24, 24)`` for the 10 m S2 bands), and
``<group>_product_id``/``<group>_timestamp`` from the Core product it was cut from.

Writes are atomic: a shard is written to a temporary name and renamed; the manifest is
rewritten the same way. Shards present on disk but missing from the manifest (a run killed
between the two renames) are adopted when the store is opened, temporary files removed,
so a killed ingest run again ends with exactly the rows of an uninterrupted one.

One writer at a time: ingest, ``store check --repair`` and every shard write hold
``write.lock``, created with ``O_CREAT | O_EXCL``; another writer gets a
:class:`StoreLockedError` naming the holder, and a lock whose process is gone (same host) is
taken over with a :class:`StaleLockWarning`.

No latent is stored twice: a shard is listed only after the (cell, modality) pairs already
stored are dropped from it. A later ingest may add a modality to stored cells; its rows hold
only that modality and the reader merges the rows of a fragment, so every read returns one
row per (cell, fragment). A modality found twice for a fragment (a store written by an older
version) is an error naming ``store check --repair``, which keeps the first copy.

Every read checks its shards: a listed shard that is missing, of another size than written, or
unreadable is a :class:`StoreError` naming it and ``majortom-gen store check --repair``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from pyproj import Transformer
from shapely.geometry.base import BaseGeometry

from majortom_gen.errors import MajorTomGenError, StoreError  # noqa: F401 (StoreError: re-exported)
from majortom_gen.fragments import FRAGMENT_PX
from majortom_gen.georef import product_box
from majortom_gen.grid import parse_cell_id
from majortom_gen.modalities import MODALITY_NAMES
from majortom_gen.splits import recorded_split, split_cells
from majortom_gen.staging import atomic_path, is_temporary, swap_in, write_text_atomic
from majortom_gen.store_lock import (  # noqa: F401 (re-exported: the store's write lock)
    LOCK_FILE,
    StaleLockWarning,
    holder_text,
    StoreLockedError,
    acquire_lock,
    holds_lock,
    lock_holder,
    release_lock,
    store_lock,
)

FORMAT = "majortom-gen-latent-store"
VERSION = 1
MOMENT_SHAPE = (8, 32, 32)  # mean (4) and log-variance (4) of a kl-f8 style latent, 32x32
NATIVE_MODE = "copgen"  # the fragment mode of a native-family store: COP-GEN's 6 x 6 patches per cell
CODEC_DIR = "codec"  # STORE/codec: the codec's own files, when the store keeps them


def store_schema(modalities: Sequence[str] = MODALITY_NAMES,
                 moment_shapes: dict[str, Sequence[int]] | None = None) -> pa.Schema:
    """The shard schema; each modality's moments are a fixed-size float16 list of
    ``prod(moment_shapes[m])`` values (default :data:`MOMENT_SHAPE`)."""
    fields = [
        ("grid_cell", pa.string()), ("grid_row_u", pa.int32()), ("grid_col_r", pa.int32()),
        ("fragment_row", pa.int8()), ("fragment_col", pa.int8()), ("fragment_index", pa.int8()),
        ("row_off", pa.int16()), ("col_off", pa.int16()), ("height", pa.int16()), ("width", pa.int16()),
        ("utm_crs", pa.string()), ("utm_transform", pa.list_(pa.float64(), 6)), ("utm_footprint", pa.string()),
        ("geometry", pa.binary()), ("centre_lat", pa.float64()), ("centre_lon", pa.float64()),
    ]
    for m in modalities:
        fields += [(f"{m}_product_id", pa.string()), (f"{m}_timestamp", pa.timestamp("us", tz="UTC")),
                   (m, pa.list_(pa.float16(), int(np.prod(_shape(moment_shapes, m)))))]
    return pa.schema(fields)


def _shape(moment_shapes: dict[str, Sequence[int]] | None, modality: str) -> tuple[int, ...]:
    """A modality's moment shape: from ``moment_shapes``, else :data:`MOMENT_SHAPE`."""
    return tuple(int(v) for v in (moment_shapes or {}).get(modality, MOMENT_SHAPE))


@dataclass(frozen=True)
class CodecInfo:
    """Which codec produced a store's latents (``name`` and ``config_hash`` identify it), and
    where it came from when the store does not keep a copy (``source``: an sd-vae's hub id,
    absolute folder or weights file, or ``ENCODE,DECODE``)."""

    name: str
    config_hash: str
    config: dict
    source: str | None = None

    def as_dict(self) -> dict:
        record = {"name": self.name, "config_hash": self.config_hash, "config": self.config}
        return {**record, "source": self.source} if self.source else record


@dataclass
class CellLatents:
    """One cell's fragments ready to store.

    ``moments[m]`` is float16/float32 ``(n_fragments, *moment_shape)`` (``(8, 32, 32)`` for
    the thumbnail family) for each modality the cell has; ``products[m]`` is ``(product_id,
    timestamp)``; ``windows`` the fragments' ``(fragment_row, fragment_col, row_off, col_off)``
    in the 1068 grid, each ``fragment_px`` wide, ``grid_side`` per side (native patches: 192, 6)."""

    grid_cell: str
    windows: list[tuple[int, int, int, int]]
    moments: dict[str, np.ndarray]
    products: dict[str, tuple[str | None, pd.Timestamp | None]]
    fragment_px: int = FRAGMENT_PX
    grid_side: int = 4


def fragment_geometry(cell_id: str, windows: Sequence[tuple[int, int, int, int]], size: int = FRAGMENT_PX) -> dict[str, list]:
    """Georeferencing columns of a cell's fragments, computed from the grid (majortom-format
    §2): UTM transform and footprint, WGS84 footprint polygon and centre."""
    box = product_box(cell_id)
    to_wgs = Transformer.from_crs(box.epsg, 4326, always_xy=True)
    out: dict[str, list] = {k: [] for k in ("utm_transform", "utm_footprint", "geometry", "centre_lat", "centre_lon")}
    base = box.transform(10.0)
    for _, _, r0, c0 in windows:
        west, north = base.c + c0 * base.a, base.f + r0 * base.e
        east, south = west + size * base.a, north + size * base.e
        out["utm_transform"].append([base.a, 0.0, west, 0.0, base.e, north])
        utm = shapely.box(west, south, east, north)
        out["utm_footprint"].append(utm.wkt)
        # densify edges so the WGS84 polygon follows the projected square
        xs, ys = np.asarray(shapely.segmentize(utm, size * 10.0 / 8).exterior.coords).T
        lon, lat = to_wgs.transform(xs, ys)
        out["geometry"].append(shapely.to_wkb(shapely.Polygon(np.c_[lon, lat])))
        clon, clat = to_wgs.transform((west + east) / 2, (south + north) / 2)
        out["centre_lat"].append(float(clat))
        out["centre_lon"].append(float(clon))
    return out


def cells_table(cells: Iterable[CellLatents], modalities: Sequence[str] = MODALITY_NAMES,
                moment_shapes: dict[str, Sequence[int]] | None = None) -> pa.Table:
    """Arrow table (store schema) of cells' fragments."""
    schema = store_schema(modalities, moment_shapes)
    cols: dict[str, list] = {f.name: [] for f in schema}
    for cell in cells:
        n = len(cell.windows)
        row_u, col_r = parse_cell_id(cell.grid_cell)
        epsg = product_box(cell.grid_cell).epsg
        geo = fragment_geometry(cell.grid_cell, cell.windows, cell.fragment_px)
        cols["grid_cell"] += [cell.grid_cell] * n
        cols["grid_row_u"] += [row_u] * n
        cols["grid_col_r"] += [col_r] * n
        for fr, fc, r0, c0 in cell.windows:
            cols["fragment_row"].append(fr)
            cols["fragment_col"].append(fc)
            cols["fragment_index"].append(fr * cell.grid_side + fc if fr >= 0 else -1)
            cols["row_off"].append(r0)
            cols["col_off"].append(c0)
            cols["height"].append(cell.fragment_px)
            cols["width"].append(cell.fragment_px)
        cols["utm_crs"] += [f"EPSG:{epsg}"] * n
        for k, v in geo.items():
            cols[k] += v
        for m in modalities:
            pid, ts = cell.products.get(m, (None, None))
            cols[f"{m}_product_id"] += [pid] * n
            cols[f"{m}_timestamp"] += [None if ts is None or pd.isna(ts) else pd.Timestamp(ts).to_pydatetime()] * n
            mom = cell.moments.get(m)
            if mom is None:
                cols[m] += [None] * n
            else:
                shape = (n,) + _shape(moment_shapes, m)
                if mom.shape != shape:
                    raise StoreError(f"{cell.grid_cell} {m}: moments of shape {mom.shape}, expected {shape}")
                cols[m].append(np.asarray(mom, dtype=np.float16).reshape(n, -1))
    arrays = []
    for f in schema:
        if f.name in modalities:
            arrays.append(_moment_column(cols[f.name], f.type))
        else:
            arrays.append(pa.array(cols[f.name], f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _moment_column(parts: list, typ: pa.DataType) -> pa.Array:
    """Build a nullable fixed-size-list column from per-cell blocks and None runs."""
    chunks = []
    for p in parts:
        if p is None:
            chunks.append(pa.nulls(1, typ))
        else:
            chunks.append(pa.FixedSizeListArray.from_arrays(pa.array(p.ravel(), pa.float16()), typ.list_size))
    if not chunks:
        return pa.array([], typ)
    return pa.concat_arrays([c.cast(typ) for c in chunks])


def _geo_metadata(table: pa.Table) -> bytes:
    if table.num_rows:
        bounds = shapely.bounds(shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False)))
        bbox = [float(bounds[:, 0].min()), float(bounds[:, 1].min()), float(bounds[:, 2].max()), float(bounds[:, 3].max())]
    else:
        bbox = []
    col = {"encoding": "WKB", "geometry_types": ["Polygon"]}  # no "crs": OGC:CRS84 (lon/lat)
    if bbox:
        col["bbox"] = bbox
    return json.dumps({"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": col}}).encode()


# ----------------------------------------------------------------------------- the write lock
_META_KEY = b"majortom_gen"  # footer key-value metadata of a shard: the store header and its cells


def store_header(manifest: dict) -> dict:
    """What a shard records of its store, so that a lost manifest can be rebuilt from shards."""
    return {k: manifest[k] for k in ("format", "version", "codec", "fragment_mode", "modalities", "moment_shape",
                                     "moment_shapes") if k in manifest}


def cells_index(table: pa.Table, modalities: Sequence[str]) -> dict[str, set[str]]:
    """``{cell: modalities it has in table}`` (a modality counts when any fragment has it)."""
    cells = np.asarray(table.column("grid_cell").to_pylist(), dtype=object)
    out: dict[str, set[str]] = {str(c): set() for c in dict.fromkeys(cells.tolist())}
    for m in modalities:
        if m in table.column_names:
            valid = table.column(m).is_valid().to_numpy(zero_copy_only=False)
            for c in set(cells[valid].tolist()):
                out[str(c)].add(m)
    return out


def pack_cells(index: dict[str, set[str]]) -> dict[str, list[str]]:
    """The manifest's compact form of a cells index: ``{"DEM,S1RTC": [cells...]}``."""
    packed: dict[str, list[str]] = defaultdict(list)
    for cell in sorted(index):
        packed[",".join(sorted(index[cell]))].append(cell)
    return dict(packed)


def unpack_cells(packed: dict[str, list[str]]) -> dict[str, set[str]]:
    return {cell: set(filter(None, mods.split(","))) for mods, cells in packed.items() for cell in cells}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _repair_hint(root: Path) -> str:
    return (f"run `majortom-gen store check --repair {root}` (it moves damaged shards aside and lists the cells to "
            "ingest again)")


def _damaged(root: Path, name: str, what: str) -> StoreError:
    return StoreError(f"{root}: shard shards/{name} {what}; {_repair_hint(root)}")


def write_shard_file(root: str | os.PathLike, table: pa.Table) -> str:
    """Write a shard into ``root/shards`` atomically (temporary name, fsync, rename); it is
    not yet in the manifest. Its footer records the store header (read from
    ``root/manifest.json``) and which modalities each of its cells has. Safe to call from
    worker processes."""
    root = Path(root)
    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    try:
        header = store_header(json.loads((root / "manifest.json").read_text()))
    except (OSError, json.JSONDecodeError):
        header = {}
    modalities = header.get("modalities") or [m for m in MODALITY_NAMES if m in table.column_names]
    record = {"store": header, "cells": pack_cells(cells_index(table, modalities))}
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"geo": _geo_metadata(table),
                                           _META_KEY: json.dumps(record).encode()})
    with atomic_path(shard_dir / name, sync=True) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=1024)
    return name


def shard_footer(path: Path) -> tuple[pq.FileMetaData, dict]:
    """A shard's parquet footer and its majortom_gen record ({} for shards of older versions)."""
    meta = pq.read_metadata(path)
    raw = (meta.metadata or {}).get(_META_KEY)
    try:
        return meta, json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return meta, {}


def _without_stored(table: pa.Table, stored: dict[str, set[str]], modalities: Sequence[str]) -> pa.Table:
    """``table`` with the latents of (cell, modality) pairs in ``stored`` set to null, and the
    rows left without any modality dropped."""
    cells = np.asarray(table.column("grid_cell").to_pylist(), dtype=object)
    keep_any = np.zeros(table.num_rows, bool)
    for m in modalities:
        if m not in table.column_names:
            continue
        drop = np.fromiter((m in stored.get(c, ()) for c in cells), bool, len(cells))
        if drop.any():
            idx = pa.array(np.arange(table.num_rows), mask=drop)  # null index -> null value
            for col in (m, f"{m}_product_id", f"{m}_timestamp"):
                if col in table.column_names:
                    i = table.schema.get_field_index(col)
                    table = table.set_column(i, table.schema.field(i), table.column(col).take(idx))
        keep_any |= table.column(m).is_valid().to_numpy(zero_copy_only=False)
    return table.filter(pa.array(keep_any))


def _modality_of(column: str, modalities: Sequence[str]) -> str | None:
    """The modality a column belongs to (its latents, product id or timestamp), if any."""
    for m in modalities:
        if column in (m, f"{m}_product_id", f"{m}_timestamp"):
            return m
    return None


def merge_fragments(table: pa.Table, modalities: Sequence[str], origin: np.ndarray | None = None,
                    files: Sequence[str] = (), root: Path | None = None) -> pa.Table:
    """One row per (grid_cell, fragment_index): the rows of a fragment written by different
    ingest runs (each holding some modalities) are merged, in order of first appearance. A
    modality held by two rows of one fragment is a :class:`StoreError` naming them."""
    if table.num_rows == 0:
        return table
    keys = pd.DataFrame({"c": table.column("grid_cell").to_numpy(zero_copy_only=False),
                         "f": table.column("fragment_index").to_numpy(zero_copy_only=False)})
    if not keys.duplicated().any():
        return table
    group = keys.groupby(["c", "f"], sort=False).ngroup().to_numpy()
    n = int(group.max()) + 1
    first = np.unique(group, return_index=True)[1]  # groups are numbered by first appearance
    pick: dict[str, np.ndarray] = {}
    for m in modalities:
        if m not in table.column_names:
            continue
        valid = table.column(m).is_valid().to_numpy(zero_copy_only=False)
        counts = np.bincount(group[valid], minlength=n)
        if (counts > 1).any():
            raise _twice_error(table, group, valid, counts, m, origin, files, root)
        idx = first.copy()
        rows = np.nonzero(valid)[0]
        idx[group[rows]] = rows
        pick[m] = idx
    columns = []
    for name in table.column_names:
        idx = pick.get(_modality_of(name, modalities) or "", first)
        columns.append(table.column(name).take(pa.array(idx)))
    return pa.Table.from_arrays(columns, schema=table.schema)


def _twice_error(table, group, valid, counts, modality, origin, files, root) -> StoreError:
    g = int(np.nonzero(counts > 1)[0][0])
    rows = np.nonzero(valid & (group == g))[0]
    cell = table.column("grid_cell")[int(rows[0])].as_py()
    frag = table.column("fragment_index")[int(rows[0])].as_py()
    where = ""
    if origin is not None and len(files):
        where = " (in " + ", ".join(sorted({f"shards/{files[int(origin[r])]}" for r in rows})) + ")"
    total = int((counts > 1).sum())
    hint = _repair_hint(root) if root is not None else "run `majortom-gen store check --repair STORE`"
    return StoreError(f"{root or 'the store'}: {total} fragment(s) have a modality stored twice, e.g. {cell} fragment "
                      f"{frag} {modality}{where}; {hint}")


class LatentStore:
    """A latent store folder. Open with :meth:`open` (existing) or :meth:`create`."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self._index: dict[str, set[str]] | None = None  # cell -> stored modalities, built on demand

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, root: str | os.PathLike, codec: CodecInfo, fragment_mode: str = "grid",
               modalities: Sequence[str] = MODALITY_NAMES,
               moment_shapes: dict[str, Sequence[int]] | None = None) -> "LatentStore":
        """Open the store at ``root``, creating it if absent; refuses a different codec,
        fragment mode or moment shapes than the existing store's. ``moment_shapes``: per
        modality (the native family); default :data:`MOMENT_SHAPE` for all."""
        root = Path(root)
        if (root / "manifest.json").exists():
            store = cls.open(root)
            have = store.manifest["codec"]
            if have["name"] != codec.name or have["config_hash"] != codec.config_hash:
                raise StoreError(
                    f"{root}: the store holds latents of codec {have['name']} ({have['config_hash'][:12]}); "
                    f"refusing to add latents of {codec.name} ({codec.config_hash[:12]}). Use another --store."
                )
            if store.manifest["fragment_mode"] != fragment_mode:
                raise StoreError(f"{root}: the store holds '{store.manifest['fragment_mode']}' fragments, not '{fragment_mode}'")
            wanted = {m: list(_shape(moment_shapes, m)) for m in modalities}
            have = {m: list(store.moment_shape(m)) for m in modalities if m in store.modalities}
            if any(have[m] != wanted[m] for m in have) or set(modalities) - set(store.modalities):
                raise StoreError(f"{root}: the store holds {store.modalities} with moment shapes "
                                 f"{ {m: list(store.moment_shape(m)) for m in store.modalities} }; refusing {wanted}")
            return store
        _refuse_unlisted_folder(root)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "codec": codec.as_dict(), "fragment_mode": fragment_mode,
                    "modalities": list(modalities), "moment_shape": list(MOMENT_SHAPE), "shards": []}
        if moment_shapes:
            manifest["moment_shapes"] = {m: list(_shape(moment_shapes, m)) for m in modalities}
        store = cls(root, manifest)
        store._write_manifest()
        return store

    @classmethod
    def open(cls, root: str | os.PathLike) -> "LatentStore":
        root = Path(root)
        path = root / "manifest.json"
        if not path.exists():
            if any((root / "shards").glob("part-*.parquet")):
                raise StoreError(f"{root}: the store has shards but no manifest.json; {_repair_hint(root)}")
            raise StoreError(f"{root}: not a latent store (no manifest.json); create one with `majortom-gen ingest`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: unreadable manifest ({exc}); {_repair_hint(root)}") from exc
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{path}: not a {FORMAT} manifest")
        store = cls(root, manifest)
        store._reconcile()
        return store

    def _write_manifest(self) -> None:
        write_text_atomic(self.root / "manifest.json", json.dumps(self.manifest, indent=1))

    @contextmanager
    def _writing(self, purpose: str) -> Iterator[None]:
        """Hold the write lock for the block, unless this process already holds it (then the
        caller, e.g. ingest, is the writer)."""
        if holds_lock(self.root):
            yield
            return
        with store_lock(self.root, purpose):
            yield

    def _reconcile(self) -> None:
        """Adopt complete shards missing from the manifest (a run killed between writing a shard
        and listing it) and drop temporary files — only when no other writer runs, since those
        are then its work in progress. Listed shards that are gone are *not* dropped: reading
        them is an error that names them and ``store check --repair``."""
        shard_dir = self.root / "shards"
        listed = {s["file"] for s in self.manifest["shards"]}
        orphans = [p.name for p in sorted(shard_dir.glob("part-*.parquet")) if p.name not in listed]
        leftovers = _temporaries(shard_dir) + _temporaries(self.root)
        if not orphans and not leftovers:
            return
        if holds_lock(self.root):
            self._adopt(orphans, leftovers)
            return
        try:
            acquire_lock(self.root, "adopt the shards of an interrupted run")
        except (StoreLockedError, OSError):
            return  # another writer is at work (or the store is read-only): leave its files alone
        try:
            self._adopt(orphans, leftovers)
        finally:
            release_lock(self.root)

    def _adopt(self, orphans: list[str], leftovers: list[Path]) -> None:
        for tmp in leftovers:
            tmp.unlink(missing_ok=True)
        for name in orphans:
            try:
                self.add_shard(name)
            except StoreError:
                pass  # unreadable: `store check` reports it, `--repair` moves it aside

    # ------------------------------------------------------------------ writing
    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    @property
    def native(self) -> bool:
        """Whether the store holds the native family (COP-GEN band groups), not thumbnails."""
        return self.manifest["fragment_mode"] == NATIVE_MODE

    def moment_shape(self, modality: str) -> tuple[int, ...]:
        """The shape of one fragment's moments of ``modality`` (``(8, 32, 32)`` for thumbnails)."""
        return _shape(self.manifest.get("moment_shapes"), modality)

    @property
    def codec(self) -> dict:
        return self.manifest["codec"]

    @property
    def codec_dir(self) -> Path:
        """``STORE/codec``: where the store keeps its codec (small-vae, patch-pca)."""
        return self.root / CODEC_DIR

    @property
    def codec_source(self) -> str | None:
        """Where the store's codec can be loaded from: the source recorded at ingest (an sd-vae's
        hub id, folder or weights file), else the store's own copy, else None."""
        recorded = self.codec.get("source")
        if recorded:
            return recorded
        return str(self.codec_dir) if (self.codec_dir / "codec.json").is_file() else None

    def write_shard(self, table: pa.Table) -> str | None:
        """Write one shard atomically and list it in the manifest. Returns its file name (None
        when every latent in it was already stored)."""
        with self._writing("write a shard"):
            return self.add_shard(write_shard_file(self.root, table))

    def add_shard(self, name: str, *, trust_footer: bool = True) -> str | None:
        """List a shard (already renamed into shards/) in the manifest, under the write lock.

        A (cell, modality) already stored is never stored again: such latents are dropped from
        the shard first (it is rewritten under a new name, or removed when nothing new is left).
        Which cells the shard holds is read from its footer, or (``trust_footer=False``, or a
        shard of an older version) from its columns. Returns the name of the shard listed, or None."""
        with self._writing("add a shard"):
            if name in {s["file"] for s in self.manifest["shards"]}:
                return name
            path = self.root / "shards" / name
            new = self._shard_cells(path, trust_footer)
            stored = self._stored_index()
            overlap = {c: mods & stored[c] for c, mods in new.items() if mods & stored.get(c, set())}
            if overlap:
                table = _without_stored(self._read_file(path, None), overlap, self.modalities)
                if table.num_rows:
                    name = self.add_shard(write_shard_file(self.root, table))
                else:
                    name = None
                path.unlink(missing_ok=True)
                return name
            self.manifest["shards"].append(self._entry(path, new))
            self._write_manifest()
            for c, mods in new.items():
                self._index.setdefault(c, set()).update(mods)
            return name

    def _entry(self, path: Path, cells: dict[str, set[str]]) -> dict:
        """The manifest's record of a shard: rows, bytes and sha256 as written, cells by modalities."""
        return {"file": path.name, "rows": pq.read_metadata(path).num_rows, "bytes": path.stat().st_size,
                "sha256": file_sha256(path), "cells": pack_cells(cells)}

    def _shard_cells(self, path: Path, trust_footer: bool = True) -> dict[str, set[str]]:
        """Which modalities each cell of a shard file has: from its footer, or (shards of
        older versions, or ``trust_footer=False``) from its columns."""
        try:
            _, record = shard_footer(path)
        except FileNotFoundError:
            raise _damaged(self.root, path.name, "is missing") from None
        except (pa.ArrowException, OSError) as exc:
            raise _damaged(self.root, path.name, f"is unreadable ({exc})") from None
        if trust_footer and "cells" in record:
            return unpack_cells(record["cells"])
        cols = ["grid_cell", *self.modalities]
        return cells_index(self._read_file(path, cols), self.modalities)

    # ------------------------------------------------------------------ reading
    def shard_paths(self) -> list[Path]:
        return [self.root / "shards" / s["file"] for s in self.manifest["shards"]]

    def _on_disk(self, entry: dict) -> Path:
        """The path of a listed shard, checked: present, and of the size it was written with."""
        path = self.root / "shards" / entry["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise _damaged(self.root, entry["file"], "is missing (listed in manifest.json, not on disk)") from None
        if "bytes" in entry and size != entry["bytes"]:
            raise _damaged(self.root, entry["file"], f"has changed since it was written ({size} bytes, "
                                                     f"{entry['bytes']} recorded): it is damaged or was replaced")
        return path

    def _read_file(self, path: Path, columns: Sequence[str] | None) -> pa.Table:
        try:
            return pq.read_table(path, columns=list(columns) if columns is not None else None)
        except FileNotFoundError:
            raise _damaged(self.root, path.name, "is missing") from None
        except (pa.ArrowException, OSError, KeyError) as exc:
            raise _damaged(self.root, path.name, f"is unreadable ({exc})") from None

    def _stored_index(self) -> dict[str, set[str]]:
        """The live ``{cell: stored modalities}`` of the manifest, built once (then kept up to date
        by :meth:`add_shard`); building it checks every listed shard on disk."""
        if self._index is None:
            index: dict[str, set[str]] = {}
            for entry in self.manifest["shards"]:
                path = self._on_disk(entry)
                if "cells" not in entry:  # listed by an older version
                    entry["cells"] = pack_cells(self._shard_cells(path))
                for c, mods in unpack_cells(entry["cells"]).items():
                    index.setdefault(c, set()).update(mods)
            self._index = index
        return self._index

    def cell_modalities(self) -> dict[str, set[str]]:
        """``{cell: modalities stored for it}``, from the manifest; every listed shard is checked
        to be on disk with the size it was written with (a :class:`StoreError` naming it if not)."""
        for entry in self.manifest["shards"]:
            self._on_disk(entry)
        return {c: set(m) for c, m in self._stored_index().items()}

    def stored_cells(self) -> set[str]:
        """Cells with at least one modality stored."""
        return set(self.cell_modalities())

    def _columns_to_read(self, columns: Sequence[str] | None) -> list[str] | None:
        """Columns needed to return ``columns`` merged: the fragment key, and a modality's latents
        whenever its product id or timestamp is asked for."""
        if columns is None:
            return None
        extra = [m for m in self.modalities if m not in columns
                 and any(_modality_of(c, [m]) for c in columns)]
        return list(dict.fromkeys(["grid_cell", "fragment_index", *columns, *extra]))

    def table(self, columns: Sequence[str] | None = None, cells: Iterable[str] | None = None) -> pa.Table:
        """All rows (optionally some columns, some cells) as one Arrow table, one row per
        fragment. A missing, changed or unreadable shard is a :class:`StoreError` naming it."""
        wanted = None if cells is None else set(cells)
        read = self._columns_to_read(columns)
        parts, origin, files = [], [], []
        for entry in self.manifest["shards"]:
            if wanted is not None and "cells" in entry and not wanted & set(unpack_cells(entry["cells"])):
                continue
            t = self._read_file(self._on_disk(entry), read)
            if wanted is not None:
                t = t.filter(pc.is_in(t.column("grid_cell"), pa.array(sorted(wanted), pa.string())))
            origin.append(np.full(t.num_rows, len(files)))
            files.append(entry["file"])
            parts.append(t)
        if parts:
            t = pa.concat_tables(parts)
        else:
            t = store_schema(self.modalities).empty_table()
            t = t.select(read) if read else t
        t = merge_fragments(t, self.modalities, np.concatenate(origin) if origin else None, files, self.root)
        return t.select(list(columns)) if columns else t

    def content_key(self) -> str:
        """A digest of the listed shards as they are on disk (name, size, mtime in ns), and of
        a recorded dataset split: it changes whenever a shard is added, removed, rewritten or
        replaced. Stat, not a content hash: a key must cost nothing next to the read it spares."""
        h = hashlib.sha256()
        for entry in self.manifest["shards"]:
            st = self._on_disk(entry).stat()
            h.update(f"{entry['file']}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        h.update(json.dumps(self.manifest.get("dataset"), sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def lookup(self, cells: Iterable[str] | None = None, region: BaseGeometry | None = None) -> pd.DataFrame:
        """Fragments of some cells or intersecting a region (EPSG:4326), with a boolean
        ``has_<M>`` column per modality; no latent columns."""
        meta = [f.name for f in store_schema(self.modalities) if f.name not in self.modalities]
        t = self.table(meta + self.modalities, cells=cells)
        df = t.select(meta).to_pandas()
        for m in self.modalities:
            df[f"has_{m}"] = t.column(m).is_valid().to_numpy(zero_copy_only=False)
        if region is not None:
            geoms = shapely.from_wkb(df["geometry"].to_numpy())
            df = df[shapely.intersects(geoms, region) & ~shapely.touches(geoms, region)]
        return df.reset_index(drop=True)

    def info(self) -> dict[str, Any]:
        """Rows, cells, per-modality coverage (fragments and cells), codec, size on disk."""
        meta_cols = ["grid_cell"] + self.modalities
        t = self.table(meta_cols)
        cells = pc.unique(t.column("grid_cell")).to_pylist() if t.num_rows else []
        coverage = {}
        for m in self.modalities:
            valid = t.column(m).is_valid()
            coverage[m] = {"fragments": int(pc.sum(valid).as_py() or 0),
                           "cells": len(pc.unique(t.column("grid_cell").filter(valid))) if t.num_rows else 0}
        all_valid = np.ones(t.num_rows, bool)
        for m in self.modalities:
            all_valid &= t.column(m).is_valid().to_numpy(zero_copy_only=False)
        size = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return {"root": str(self.root), "rows": t.num_rows, "cells": len(cells), "shards": len(self.manifest["shards"]),
                "coverage": coverage, "aligned_fragments": int(all_valid.sum()), "codec": self.codec,
                "fragment_mode": self.manifest["fragment_mode"], "size_bytes": size}


def _is_leftover(name: str) -> bool:
    """A temporary file of an interrupted write: :func:`staging.atomic_path`'s, or the
    ``.NAME.tmp`` of stores written by earlier versions."""
    return is_temporary(name) or (name.startswith(".") and name.endswith(".tmp"))


def _temporaries(folder: Path) -> list[Path]:
    """The leftover temporary files directly in ``folder``."""
    return [p for p in folder.glob(".*") if p.is_file() and _is_leftover(p.name)] if folder.is_dir() else []


def _refuse_unlisted_folder(root: Path) -> None:
    """A folder without manifest.json may become a new store only if it holds nothing but what a
    first ingest leaves before writing the manifest (codec, lock, temporary files)."""
    if not root.exists():
        return
    if any((root / "shards").glob("part-*.parquet")):
        raise StoreError(f"{root}: the store has shards but no manifest.json; {_repair_hint(root)}")
    other = [p.name for p in root.iterdir() if p.name not in (CODEC_DIR, "shards", LOCK_FILE)
             and not _is_leftover(p.name)]
    if other:
        raise StoreError(f"{root}: exists, is not empty and has no manifest.json; not a latent store")


@dataclass
class AlignedArrays:
    """Aligned latent moments for training: ``moments[m]`` float16 ``(N, *moment_shape)`` for
    each requested modality (row i of every array is the same fragment), ``grid_cell`` (N,)."""

    moments: dict[str, np.ndarray]
    grid_cell: np.ndarray
    fragment_index: np.ndarray

    def __len__(self) -> int:
        return len(self.grid_cell)

    def get(self, idx) -> dict[str, np.ndarray]:
        """Random access: ``{m: moments[m][idx]}`` (idx an int, slice or index array)."""
        return {m: a[idx] for m, a in self.moments.items()}


def moment_array(table: pa.Table, column: str, dtype=np.float16, shape: Sequence[int] = MOMENT_SHAPE) -> np.ndarray:
    """A modality column without nulls as an array ``(rows, *shape)`` (default ``(8, 32, 32)``)."""
    if table.column(column).null_count:
        raise StoreError(f"column {column} has {table.column(column).null_count} missing fragments; filter them first")
    flat = table.column(column).combine_chunks().flatten() if table.num_rows else pa.array([], pa.float16())
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape((-1,) + tuple(shape))


def has_all(table: pa.Table, modalities: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows that have every one of ``modalities``."""
    mask = np.ones(table.num_rows, bool)
    for m in modalities:
        mask &= table.column(m).is_valid().to_numpy(zero_copy_only=False)
    return mask


def complete_rows(table: pa.Table, modalities: Sequence[str], what: str) -> pa.Table:
    """The rows having every one of ``modalities``; an error naming ``what`` if none has."""
    table = table.filter(pa.array(has_all(table, modalities)))
    if table.num_rows == 0:
        raise StoreError(f"no fragment of {what} has all of {list(modalities)}")
    return table


def load_aligned(store: LatentStore, modalities: Sequence[str], *, split: str | None = None,
                 test_fraction: float = 0.05, seed: int = 0, cache: bool = False) -> AlignedArrays:
    """Fragments that have every requested modality, as contiguous arrays.

    ``split`` = 'train' | 'test' | None keeps the cells of :func:`split_cells` (or the split
    recorded in a training set built by ``dataset build``). With
    ``cache=True`` the arrays are written once under ``STORE/cache/`` and memory-mapped; the
    cache is keyed on :meth:`LatentStore.content_key` (every shard's name, size and mtime), so
    a shard added, removed, rewritten or damaged makes it be built again (or fail, naming the
    shard) instead of serving stale latents."""
    unknown = [m for m in modalities if m not in store.modalities]
    if unknown:
        raise StoreError(f"modalities {unknown} are not in the store (it has {store.modalities})")
    prefix = f"sorted_{'-'.join(modalities)}_{split or 'all'}_{test_fraction}_{seed}"  # sorted: rows by cell
    cache_dir = store.root / "cache" / f"{prefix}_{store.content_key()}" if cache else None
    if cache and (cache_dir / "done").exists():
        return AlignedArrays({m: np.load(cache_dir / f"{m}.npy", mmap_mode="r") for m in modalities},
                             np.load(cache_dir / "grid_cell.npy", allow_pickle=False),
                             np.load(cache_dir / "fragment_index.npy"))
    t = store.table(["grid_cell", "fragment_index"] + list(modalities))
    mask = has_all(t, modalities)
    if split is not None:
        if split not in ("train", "test"):
            raise StoreError(f"split must be 'train' or 'test', got {split!r}")
        recorded = recorded_split(store.manifest)
        if recorded is not None:
            keep = {c for c, s in recorded.items() if s == split}
        else:
            train, test = split_cells(t.column("grid_cell").to_pylist(), test_fraction, seed)
            keep = set(train if split == "train" else test)
        mask &= np.isin(t.column("grid_cell").to_numpy(zero_copy_only=False), list(keep))
    t = t.filter(pa.array(mask))
    # rows by (cell, fragment): what a store holds, not the order its shards happened to be written in
    # (parallel ingest finishes them in any order), decides the arrays, hence training and evaluation
    t = t.sort_by([("grid_cell", "ascending"), ("fragment_index", "ascending")])
    moments = {m: moment_array(t, m, shape=store.moment_shape(m)) for m in modalities}
    cells = np.asarray(t.column("grid_cell").to_pylist(), dtype=str)
    frag = t.column("fragment_index").to_numpy()
    if cache:
        tmp = cache_dir.with_name(cache_dir.name + f".{uuid.uuid4().hex}.tmp")
        tmp.mkdir(parents=True)
        for m, a in moments.items():
            np.save(tmp / f"{m}.npy", a)
        np.save(tmp / "grid_cell.npy", cells)
        np.save(tmp / "fragment_index.npy", frag)
        (tmp / "done").write_text("")
        swap_in(tmp, cache_dir)
        for old in cache_dir.parent.glob(f"{prefix}_*"):  # caches of earlier store contents
            if old.is_dir() and old != cache_dir and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
        return load_aligned(store, modalities, split=split, test_fraction=test_fraction, seed=seed, cache=True)
    return AlignedArrays(moments, cells, frag)
