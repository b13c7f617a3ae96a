"""The grid-indexed latent store: a folder of GeoParquet shards, one row per
(grid cell, fragment), one nullable column per modality holding its latent moments.

Layout::

    STORE/
      manifest.json        format, codec (name, config hash, config), fragment mode, shards
      shards/part-*.parquet GeoParquet 1.0; each holds whole cells (all their fragments)
      codec/               the codec's own files, when it is stored with the store (patch-pca)
      ingest-errors.jsonl  cells the last ingest quarantined, with reasons
      cache/               memory-mappable arrays built by the training reader

Columns (units and axes stated; pixel windows are in the 1068 px, 10 m product grid, as
row/col offsets): ``grid_cell``, ``grid_row_u``, ``grid_col_r``, ``fragment_row``,
``fragment_col``, ``fragment_index`` (row*4+col, -1 for a centre crop), ``row_off``,
``col_off``, ``height``, ``width`` (pixels), ``utm_crs`` (``'EPSG:326zz'``),
``utm_transform`` (rasterio affine a, b, c, d, e, f; metres), ``utm_footprint`` (WKT, metres),
``geometry`` (WGS84 footprint polygon, WKB), ``centre_lat``, ``centre_lon`` (degrees),
``<M>_product_id``, ``<M>_timestamp`` and ``<M>`` for each modality M in DEM, S1RTC, S2L1C,
S2L2A: latent moments (mean and log-variance stacked, ``(8, 32, 32)``) as float16.

Writes are atomic: a shard is written to a temporary name and renamed; the manifest is
rewritten the same way. Shards present on disk but missing from the manifest (a run killed
between the two renames) are adopted when the store is opened, temporary files removed,
so a killed ingest run again ends with exactly the rows of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
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

from majortom_gen.errors import MajorTomGenError
from majortom_gen.fragments import FRAGMENT_PX
from majortom_gen.georef import product_box
from majortom_gen.grid import parse_cell_id
from majortom_gen.modalities import MODALITY_NAMES

FORMAT = "majortom-gen-latent-store"
VERSION = 1
MOMENT_SHAPE = (8, 32, 32)  # mean (4) and log-variance (4) of a kl-f8 style latent, 32x32
MOMENT_SIZE = int(np.prod(MOMENT_SHAPE))


class StoreError(MajorTomGenError):
    """The store is missing, inconsistent, or asked to mix codecs."""


def store_schema(modalities: Sequence[str] = MODALITY_NAMES) -> pa.Schema:
    fields = [
        ("grid_cell", pa.string()), ("grid_row_u", pa.int32()), ("grid_col_r", pa.int32()),
        ("fragment_row", pa.int8()), ("fragment_col", pa.int8()), ("fragment_index", pa.int8()),
        ("row_off", pa.int16()), ("col_off", pa.int16()), ("height", pa.int16()), ("width", pa.int16()),
        ("utm_crs", pa.string()), ("utm_transform", pa.list_(pa.float64(), 6)), ("utm_footprint", pa.string()),
        ("geometry", pa.binary()), ("centre_lat", pa.float64()), ("centre_lon", pa.float64()),
    ]
    for m in modalities:
        fields += [(f"{m}_product_id", pa.string()), (f"{m}_timestamp", pa.timestamp("us", tz="UTC")),
                   (m, pa.list_(pa.float16(), MOMENT_SIZE))]
    return pa.schema(fields)


@dataclass(frozen=True)
class CodecInfo:
    """Which codec produced a store's latents."""

    name: str
    config_hash: str
    config: dict

    def as_dict(self) -> dict:
        return {"name": self.name, "config_hash": self.config_hash, "config": self.config}


@dataclass
class CellLatents:
    """One cell's fragments ready to store.

    ``moments[m]`` is float16/float32 ``(n_fragments, 8, 32, 32)`` for each modality the cell
    has; ``products[m]`` is ``(product_id, timestamp)``; ``windows`` the fragments'
    ``(fragment_row, fragment_col, row_off, col_off)`` in the 1068 grid."""

    grid_cell: str
    windows: list[tuple[int, int, int, int]]
    moments: dict[str, np.ndarray]
    products: dict[str, tuple[str | None, pd.Timestamp | None]]


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


def cells_table(cells: Iterable[CellLatents], modalities: Sequence[str] = MODALITY_NAMES) -> pa.Table:
    """Arrow table (store schema) of cells' fragments."""
    schema = store_schema(modalities)
    cols: dict[str, list] = {f.name: [] for f in schema}
    for cell in cells:
        n = len(cell.windows)
        row_u, col_r = parse_cell_id(cell.grid_cell)
        epsg = product_box(cell.grid_cell).epsg
        geo = fragment_geometry(cell.grid_cell, cell.windows)
        cols["grid_cell"] += [cell.grid_cell] * n
        cols["grid_row_u"] += [row_u] * n
        cols["grid_col_r"] += [col_r] * n
        for fr, fc, r0, c0 in cell.windows:
            cols["fragment_row"].append(fr)
            cols["fragment_col"].append(fc)
            cols["fragment_index"].append(fr * 4 + fc if fr >= 0 else -1)
            cols["row_off"].append(r0)
            cols["col_off"].append(c0)
            cols["height"].append(FRAGMENT_PX)
            cols["width"].append(FRAGMENT_PX)
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
                if mom.shape != (n,) + MOMENT_SHAPE:
                    raise StoreError(f"{cell.grid_cell} {m}: moments of shape {mom.shape}, expected {(n,) + MOMENT_SHAPE}")
                cols[m].append(np.asarray(mom, dtype=np.float16).reshape(n, MOMENT_SIZE))
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
            chunks.append(pa.FixedSizeListArray.from_arrays(pa.array(p.ravel(), pa.float16()), MOMENT_SIZE))
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


class LatentStore:
    """A latent store folder. Open with :meth:`open` (existing) or :meth:`create`."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, root: str | os.PathLike, codec: CodecInfo, fragment_mode: str = "grid",
               modalities: Sequence[str] = MODALITY_NAMES) -> "LatentStore":
        """Open the store at ``root``, creating it if absent; refuses a different codec or
        fragment mode than the existing store's."""
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
            return store
        if root.exists() and any(p for p in root.iterdir() if p.name not in ("codec",)):
            raise StoreError(f"{root}: exists, is not empty and has no manifest.json; not a latent store")
        (root / "shards").mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "codec": codec.as_dict(), "fragment_mode": fragment_mode,
                    "modalities": list(modalities), "moment_shape": list(MOMENT_SHAPE), "shards": []}
        store = cls(root, manifest)
        store._write_manifest()
        return store

    @classmethod
    def open(cls, root: str | os.PathLike) -> "LatentStore":
        root = Path(root)
        path = root / "manifest.json"
        if not path.exists():
            raise StoreError(f"{root}: not a latent store (no manifest.json); create one with `majortom-gen ingest`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: unreadable manifest ({exc})") from exc
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{path}: not a {FORMAT} manifest")
        store = cls(root, manifest)
        store._reconcile()
        return store

    def _write_manifest(self) -> None:
        tmp = self.root / f".manifest.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.root / "manifest.json")

    def _reconcile(self) -> None:
        """Adopt complete shards missing from the manifest; drop temporary files and entries
        whose file is gone."""
        shard_dir = self.root / "shards"
        shard_dir.mkdir(exist_ok=True)
        for tmp in list(shard_dir.glob(".*.tmp")) + list(self.root.glob(".manifest.*.tmp")):
            tmp.unlink(missing_ok=True)
        listed = {s["file"] for s in self.manifest["shards"]}
        changed = False
        for path in sorted(shard_dir.glob("part-*.parquet")):
            if path.name not in listed:
                meta = pq.read_metadata(path)
                self.manifest["shards"].append({"file": path.name, "rows": meta.num_rows})
                changed = True
        kept = [s for s in self.manifest["shards"] if (shard_dir / s["file"]).exists()]
        if len(kept) != len(self.manifest["shards"]):
            self.manifest["shards"] = kept
            changed = True
        if changed:
            self._write_manifest()

    # ------------------------------------------------------------------ writing
    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["modalities"])

    @property
    def codec(self) -> dict:
        return self.manifest["codec"]

    def write_shard(self, table: pa.Table) -> str:
        """Write one shard atomically and list it in the manifest. Returns its file name."""
        return self.add_shard(write_shard_file(self.root, table))

    def add_shard(self, name: str) -> str:
        """List a shard (already renamed into shards/) in the manifest."""
        rows = pq.read_metadata(self.root / "shards" / name).num_rows
        if name not in {s["file"] for s in self.manifest["shards"]}:
            self.manifest["shards"].append({"file": name, "rows": rows})
            self._write_manifest()
        return name

    # ------------------------------------------------------------------ reading
    def shard_paths(self) -> list[Path]:
        return [self.root / "shards" / s["file"] for s in self.manifest["shards"]]

    def stored_cells(self) -> set[str]:
        cells: set[str] = set()
        for p in self.shard_paths():
            cells.update(pq.read_table(p, columns=["grid_cell"]).column("grid_cell").unique().to_pylist())
        return cells

    def table(self, columns: Sequence[str] | None = None, cells: Iterable[str] | None = None) -> pa.Table:
        """All rows (optionally some columns, some cells) as one Arrow table."""
        paths = self.shard_paths()
        if paths:
            t = pa.concat_tables([pq.read_table(p, columns=list(columns) if columns else None) for p in paths])
        else:
            t = store_schema(self.modalities).empty_table()
            t = t.select(list(columns)) if columns else t
        if cells is not None:
            t = t.filter(pc.is_in(t.column("grid_cell"), pa.array(sorted(set(cells)), pa.string())))
        return t

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


def write_shard_file(root: str | os.PathLike, table: pa.Table) -> str:
    """Write a shard into ``root/shards`` atomically (temporary name, fsync, rename); it is
    not yet in the manifest. Safe to call from worker processes."""
    shard_dir = Path(root) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    tmp = shard_dir / f".{name}.tmp"
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"geo": _geo_metadata(table)})
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd", row_group_size=1024)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, shard_dir / name)
    return name


@dataclass
class AlignedArrays:
    """Aligned latent moments for training: ``moments[m]`` float16 ``(N, 8, 32, 32)`` for
    each requested modality (row i of every array is the same fragment), ``grid_cell`` (N,)."""

    moments: dict[str, np.ndarray]
    grid_cell: np.ndarray
    fragment_index: np.ndarray

    def __len__(self) -> int:
        return len(self.grid_cell)

    def get(self, idx) -> dict[str, np.ndarray]:
        """Random access: ``{m: moments[m][idx]}`` (idx an int, slice or index array)."""
        return {m: a[idx] for m, a in self.moments.items()}


def moment_array(table: pa.Table, column: str, dtype=np.float16) -> np.ndarray:
    """A modality column without nulls as an array ``(rows, 8, 32, 32)``."""
    if table.column(column).null_count:
        raise StoreError(f"column {column} has {table.column(column).null_count} missing fragments; filter them first")
    flat = table.column(column).combine_chunks().flatten() if table.num_rows else pa.array([], pa.float16())
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape((-1,) + MOMENT_SHAPE)


def split_cells(cells: Iterable[str], test_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """Reproducible train/test split by grid cell (no cell in both): a seeded permutation
    of the sorted cell ids."""
    if not 0 <= test_fraction < 1:
        raise StoreError(f"test_fraction must be in [0, 1), got {test_fraction}")
    ordered = sorted(set(cells))
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_test = int(round(test_fraction * len(ordered)))
    if test_fraction > 0 and len(ordered) > 1:
        n_test = max(n_test, 1)
    test = sorted(ordered[i] for i in perm[:n_test])
    train = sorted(ordered[i] for i in perm[n_test:])
    return train, test


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


def recorded_split(store: LatentStore) -> dict[str, str] | None:
    """``{cell: 'train' | 'test'}`` recorded by ``majortom-gen dataset build``, if the store is
    such a training set (then it overrides ``test_fraction``/``seed`` splits)."""
    d = store.manifest.get("dataset")
    if not d:
        return None
    return {c: s for s, cells in d["cells"].items() for c in cells}


def load_aligned(store: LatentStore, modalities: Sequence[str], *, split: str | None = None,
                 test_fraction: float = 0.05, seed: int = 0, cache: bool = False) -> AlignedArrays:
    """Fragments that have every requested modality, as contiguous arrays.

    ``split`` = 'train' | 'test' | None keeps the cells of :func:`split_cells` (or the split
    recorded in a training set built by ``dataset build``). With
    ``cache=True`` the arrays are written once under ``STORE/cache/`` and memory-mapped."""
    unknown = [m for m in modalities if m not in store.modalities]
    if unknown:
        raise StoreError(f"modalities {unknown} are not in the store (it has {store.modalities})")
    key = f"{'-'.join(modalities)}_{split or 'all'}_{test_fraction}_{seed}_{len(store.manifest['shards'])}"
    cache_dir = store.root / "cache" / key
    if cache and (cache_dir / "done").exists():
        return AlignedArrays({m: np.load(cache_dir / f"{m}.npy", mmap_mode="r") for m in modalities},
                             np.load(cache_dir / "grid_cell.npy", allow_pickle=False),
                             np.load(cache_dir / "fragment_index.npy"))
    t = store.table(["grid_cell", "fragment_index"] + list(modalities))
    mask = has_all(t, modalities)
    if split is not None:
        if split not in ("train", "test"):
            raise StoreError(f"split must be 'train' or 'test', got {split!r}")
        recorded = recorded_split(store)
        if recorded is not None:
            keep = {c for c, s in recorded.items() if s == split}
        else:
            train, test = split_cells(t.column("grid_cell").to_pylist(), test_fraction, seed)
            keep = set(train if split == "train" else test)
        mask &= np.isin(t.column("grid_cell").to_numpy(zero_copy_only=False), list(keep))
    t = t.filter(pa.array(mask))
    moments = {m: moment_array(t, m) for m in modalities}
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
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
        return load_aligned(store, modalities, split=split, test_fraction=test_fraction, seed=seed, cache=True)
    return AlignedArrays(moments, cells, frag)
