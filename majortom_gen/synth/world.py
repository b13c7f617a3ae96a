"""Write a synthetic Major TOM world in the exact Core layout.

For every requested modality: ``<out>/Core-<NAME>/metadata.parquet`` and
``<out>/Core-<NAME>/images/part_NNNNN.parquet`` (one product per row group,
``products_per_shard`` per file), with every column of the real schema. Band columns hold
GeoTIFFs in the cell's UTM CRS over the product box of majortom-format.md §2; thumbnails are
made from the bands with the official formulas and encoded as the real ones (S2: JPEG,
S1: PNG, DEM: 356 px greyscale PNG). ``parquet_url`` values are relative to the dataset
folder (``images/part_00001.parquet``); readers resolve them with
:func:`majortom_gen.sources.resolve_parquet_url`.

Deterministic by seed: each cell draws from a generator seeded by (seed, row, col), and
the terrain is a function of position, so a world does not depend on worker count or on
which other cells are generated. Output is staged and moved into place at the end, so an
interrupted run leaves no half-written dataset.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from majortom_gen.errors import MajorTomGenError
from majortom_gen.formats import encode_geotiff, encode_jpeg, encode_png
from majortom_gen.georef import default_grid, product_box
from majortom_gen.grid import parse_cell_id
from majortom_gen.modalities import MODALITIES, MODALITY_NAMES, get_modality
from majortom_gen.staging import swap_in
from majortom_gen.synth.scene import Acquisition, make_scene
from majortom_gen.thumbnails import dem_thumbnail, s1_thumbnail, s2_thumbnail

QUIRKS = ("epsg_prefix", "duplicate_cell", "s1_1069px")


@dataclass(frozen=True)
class SynthOptions:
    """What to write. ``quirks`` reproduces known quirks of the real data on a few cells:
    an ``EPSG:EPSG:`` crs string, a duplicate cell whose second copy is all nodata, and an
    S1 raster of 1069 x 1069 px."""

    seed: int = 0
    modalities: tuple[str, ...] = MODALITY_NAMES
    products_per_shard: int = 500
    quirks: tuple[str, ...] = ()
    workers: int = 1


@dataclass
class CellProducts:
    """One cell's products: per modality a list of (metadata row, shard row)."""

    cell_id: str
    products: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = field(default_factory=dict)


def _mgrs_tile(lat: float, lon: float, epsg: int, easting: float, northing: float) -> str:
    """MGRS tile id (e.g. '33TVF') of a point, as Sentinel-2 product names carry it."""
    zone = epsg % 100
    band = "CDEFGHJKLMNPQRSTUVWX"[int(np.clip((lat + 80) // 8, 0, 19))]
    col_sets = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")
    col = col_sets[(zone - 1) % 3][int(np.clip(easting // 100_000 - 1, 0, 7))]
    row_letters = "ABCDEFGHJKLMNPQRSTUV"
    row = row_letters[(int(northing // 100_000) + (5 if zone % 2 == 0 else 0)) % 20]
    return f"{zone:02d}{band}{col}{row}"


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%S")


def _quirk_cells(cells: list[str], quirks: tuple[str, ...]) -> dict[str, set[str]]:
    """Deterministically assign each requested quirk to one cell."""
    out: dict[str, set[str]] = {c: set() for c in cells}
    for i, q in enumerate(quirks):
        if q not in QUIRKS:
            raise MajorTomGenError(f"unknown quirk {q!r}; valid quirks: {', '.join(QUIRKS)}")
        out[cells[i % len(cells)]].add(q)
    return out


def _geotiff(array: np.ndarray, box, res: float, nodata, *, compress: str = "deflate") -> bytes:
    if compress == "none":
        return encode_geotiff(array, crs=box.crs, transform=box.transform(res), nodata=nodata, compress="none")
    return encode_geotiff(array, crs=box.crs, transform=box.transform(res), nodata=nodata,
                          compress=compress, predictor=2, zlevel=1)


def make_cell_products(cell_id: str, seed: int, modalities: tuple[str, ...], quirks: frozenset[str] = frozenset()) -> CellProducts:
    """Generate every requested product of one cell (runs in a worker process)."""
    row_u, col_r = parse_cell_id(cell_id)
    grid = default_grid()
    box = product_box(cell_id, grid)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, row_u & 0xFFFFFFFF, col_r & 0xFFFFFFFF])
    cloudy = rng.random() < 0.25
    acq = Acquisition(
        cloud_fraction=float(rng.uniform(0.02, 0.3)) if cloudy else 0.0,
        aerosol=float(rng.uniform(0.6, 1.4)),
        s2_swath_edge=float(rng.uniform(0.05, 0.4)) if rng.random() < 0.1 else None,
        s1_ascending=bool(rng.random() < 0.5),
        s1_edge=float(rng.uniform(0.05, 0.3)) if rng.random() < 0.1 else None,
        speckle_seed=int(rng.integers(1, 2**31)),
    )
    scene = make_scene(box, seed * 1_000_003 + 17, acq)

    lat0, lon0 = grid.corner(cell_id)
    e0, n0 = box.west + 340.0, box.south + 340.0
    day = dt.datetime(2019, 5, 1) + dt.timedelta(days=int(rng.integers(0, 4 * 365)))
    day = day.replace(month=min(max(day.month, 5), 9))
    local_solar = dt.timedelta(hours=10.5 - lon0 / 15.0)
    s2_time = day + local_solar + dt.timedelta(seconds=int(rng.integers(0, 600)))
    s1_time = day + dt.timedelta(days=int(rng.integers(-6, 7)), hours=(17.8 if acq.s1_ascending else 5.8) - lon0 / 15.0,
                                 seconds=int(rng.integers(0, 600)))
    crs = f"EPSG:EPSG:{box.epsg}" if "epsg_prefix" in quirks else box.crs
    common = {"grid_cell": cell_id, "grid_row_u": row_u, "grid_col_r": col_r}
    tail = {"centre_lat": box.centre_lat, "centre_lon": box.centre_lon, "crs": crs}
    out = CellProducts(cell_id)
    sat = "S2A" if rng.random() < 0.5 else "S2B"
    tile = _mgrs_tile(lat0, lon0, box.epsg, e0, n0)
    rel_orbit = int(rng.integers(1, 144))

    for name in modalities:
        m = get_modality(name)
        if m.name in ("S2L2A", "S2L1C"):
            bands = scene.l2a if m.name == "S2L2A" else scene.l1c
            level = "MSIL2A" if m.name == "S2L2A" else "MSIL1C"
            proc = s2_time + dt.timedelta(hours=2, minutes=int(rng.integers(0, 59)))
            pid = f"{sat}_{level}_{_fmt(s2_time)}_N0400_R{rel_orbit:03d}_T{tile}_{_fmt(proc)}"
            row = {"product_id": pid, "grid_cell": cell_id, "product_datetime": _fmt(s2_time),
                   "thumbnail": encode_jpeg(s2_thumbnail(bands["B04"], bands["B03"], bands["B02"]))}
            for b in m.bands:
                arr = scene.cloud_mask if b.name == "cloud_mask" else bands[b.name]
                row[b.name] = _geotiff(arr, box, b.resolution_m, b.nodata)
            valid = scene.s2_valid
            cloud_cover = 100.0 * float(np.isin(scene.cloud_mask[valid], (1, 2)).mean()) if valid.any() else 0.0
            meta = {**common, "product_id": pid, "timestamp": _fmt(s2_time), "cloud_cover": cloud_cover,
                    "nodata": float(1.0 - valid.mean()), **tail}
            out.products[m.name] = [(meta, row)]
            if "duplicate_cell" in quirks:
                out.products[m.name].append(_nodata_duplicate(m.name, meta, row, box))
        elif m.name == "S1RTC":
            vv, vh = scene.vv, scene.vh
            transform_px = 1069 if "s1_1069px" in quirks else 1068
            if transform_px == 1069:  # one extra row and column, as some real rasters
                vv = np.pad(vv, ((0, 1), (0, 1)), mode="edge")
                vh = np.pad(vh, ((0, 1), (0, 1)), mode="edge")
            sat1 = "S1A" if rng.random() < 0.7 else "S1B"
            absorbit = int(rng.integers(10_000, 50_000))
            pid = (f"{sat1}_IW_GRDH_1SDV_{_fmt(s1_time)}_{_fmt(s1_time + dt.timedelta(seconds=25))}_"
                   f"{absorbit:06d}_{int(rng.integers(0, 2**20)):05X}_{int(rng.integers(0, 2**16)):04X}")
            row = {"product_id": pid, "grid_cell": cell_id, "product_datetime": _fmt(s1_time),
                   "thumbnail": encode_png(s1_thumbnail(vv, vh), compress_level=1),
                   # speckled float32 does not compress: store it plain, as fast as it gets
                   "vv": _geotiff(vv, box, 10.0, -32768.0, compress="none"),
                   "vh": _geotiff(vh, box, 10.0, -32768.0, compress="none")}
            meta = {**common, "product_id": pid, "timestamp": _fmt(s1_time),
                    "nodata": float((vv == -32768.0).mean()),
                    "orbit_state": "ASCENDING" if acq.s1_ascending else "DESCENDING", **tail}
            out.products[m.name] = [(meta, row)]
        else:  # DEM
            dem = scene.dem30
            compressed = np.clip(np.rint(dem), 0, 65535).astype(np.uint16)
            row = {"grid_cell": cell_id, "thumbnail": encode_png(dem_thumbnail(dem), compress_level=1),
                   "compressed": encode_png(compressed, compress_level=1),
                   "DEM": _geotiff(dem, box, 30.0, -32768.0, compress="lzw")}
            meta = {**common, "nodata": 0.0, "min_val": float(dem.min()), "max_val": float(dem.max()), **tail}
            out.products[m.name] = [(meta, row)]
    return out


def _nodata_duplicate(name: str, meta: dict, row: dict, box) -> tuple[dict, dict]:
    """A second copy of a product that is entirely nodata (a quirk of the real metadata)."""
    m = get_modality(name)
    dup_row = {"product_id": row["product_id"], "grid_cell": row["grid_cell"],
               "product_datetime": row["product_datetime"],
               "thumbnail": encode_jpeg(np.zeros((1068, 1068, 3), np.uint8))}
    for b in m.bands:
        dup_row[b.name] = _geotiff(np.zeros((b.size_px, b.size_px), np.dtype(b.dtype)), box, b.resolution_m, b.nodata)
    return {**meta, "nodata": 1.0, "cloud_cover": 0.0}, dup_row


def _shard_schema(name: str) -> pa.Schema:
    m = get_modality(name)
    text = {"product_id", "grid_cell", "product_datetime"}
    return pa.schema([(c, pa.string() if c in text else pa.binary()) for c in m.shard_columns])


def _metadata_schema(name: str) -> pa.Schema:
    types = {"grid_cell": pa.string(), "grid_row_u": pa.int64(), "grid_col_r": pa.int64(),
             "product_id": pa.string(), "timestamp": pa.string(), "cloud_cover": pa.float64(),
             "nodata": pa.float64(), "orbit_state": pa.string(), "min_val": pa.float64(),
             "max_val": pa.float64(), "centre_lat": pa.float64(), "centre_lon": pa.float64(),
             "crs": pa.string(), "parquet_url": pa.string(), "parquet_row": pa.int64()}
    return pa.schema([(c, types[c]) for c in get_modality(name).metadata_columns])


class _DatasetWriter:
    """Streams one modality's products into shards of ``per_shard`` row groups."""

    def __init__(self, name: str, folder: Path, per_shard: int) -> None:
        self.name, self.folder, self.per_shard = name, folder, per_shard
        (folder / "images").mkdir(parents=True, exist_ok=True)
        self.schema = _shard_schema(name)
        self.meta_rows: list[dict] = []
        self.part, self.in_part = 0, 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, meta: dict, row: dict) -> None:
        if self.writer is None:
            self.part += 1
            self.path = self.folder / "images" / f"part_{self.part:05d}.parquet"
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="none")
            self.in_part = 0
        self.writer.write_table(pa.Table.from_pylist([row], schema=self.schema), row_group_size=1)
        self.meta_rows.append({**meta, "parquet_url": f"images/{self.path.name}", "parquet_row": self.in_part})
        self.in_part += 1
        if self.in_part == self.per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self) -> None:
        self.close_shard()
        table = pa.Table.from_pylist(self.meta_rows, schema=_metadata_schema(self.name))
        pq.write_table(table, self.folder / "metadata.parquet")


def _mp_context():
    """fork where the platform has it (fast, works from any entry point), else spawn."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _generate(cells: list[str], options: SynthOptions, quirks: dict[str, set[str]]) -> Iterator[CellProducts]:
    args = [(c, options.seed, options.modalities, frozenset(quirks[c])) for c in cells]
    if options.workers <= 1 or len(cells) == 1:
        for a in args:
            yield make_cell_products(*a)
        return
    with ProcessPoolExecutor(max_workers=options.workers, mp_context=_mp_context()) as pool:
        yield from pool.map(make_cell_products, *zip(*args))


def write_world(
    cells: Iterable[str],
    out: str | os.PathLike,
    options: SynthOptions = SynthOptions(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Write the synthetic world for ``cells`` under ``out``; returns {modality: dataset folder}.

    Existing ``Core-<NAME>`` folders for the written modalities are replaced only once the
    whole world has been written."""
    grid = default_grid()
    ids = sorted({grid.check_cell(c) for c in cells}, key=parse_cell_id)
    if not ids:
        raise MajorTomGenError("no grid cells to synthesise: give --cells or a --region that covers land in the grid")
    if options.products_per_shard < 1:
        raise MajorTomGenError(f"products_per_shard must be >= 1, got {options.products_per_shard}")
    names = tuple(n for n in MODALITY_NAMES if n in {get_modality(x).name for x in options.modalities})
    options = SynthOptions(options.seed, names, options.products_per_shard, tuple(options.quirks), options.workers)
    out = Path(out)
    staging = out / ".synth-staging"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run
    writers = {n: _DatasetWriter(n, staging / MODALITIES[n].hub_repo.split("/")[-1], options.products_per_shard) for n in names}
    quirks = _quirk_cells(ids, options.quirks)
    for cell in _generate(ids, options, quirks):
        for n in names:
            for meta, row in cell.products[n]:
                writers[n].add(meta, row)
        if progress is not None:
            progress(cell.cell_id)
    written = {}
    for n, w in writers.items():
        w.finish()
        final = out / w.folder.name
        swap_in(w.folder, final)  # an older dataset is removed only once the new one is in place
        written[n] = final
    shutil.rmtree(staging, ignore_errors=True)
    return written
