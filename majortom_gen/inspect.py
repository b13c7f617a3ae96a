"""Summaries of Major TOM data on disk: an image shard, a dataset folder (``Core-XXX/``)
or a root holding several datasets; plus a thumbnail preview sheet.

Returns plain data; printing is the CLI's job.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from majortom_gen.errors import MajorTomGenError, ShardError
from majortom_gen.fragments import to_product_grid
from majortom_gen.modalities import MODALITIES
from majortom_gen.sources import decode_product_thumbnail, detect_modality, read_metadata, read_product, read_product_of

PREVIEW_TILE_PX = 178  # thumbnails are shown at 1/6 of their 1068 px


@dataclass
class ShardSummary:
    path: str
    modality: str
    columns: list[tuple[str, str]]  # (name, arrow type)
    rows: int
    row_groups: int
    cells: int
    size_bytes: int


@dataclass
class DatasetSummary:
    path: str
    modality: str
    products: int
    cells: int
    duplicate_cells: int
    shards: int
    crs_values: int
    time_range: tuple[str, str] | None
    cloud_cover_mean: float | None
    nodata_mean: float
    columns: list[tuple[str, str]]


@dataclass
class WorldSummary:
    path: str
    datasets: list[DatasetSummary]
    cells_per_modality: dict[str, int]
    cells_in_all: int
    cells_in_any: int


def summarise_shard(path: str | os.PathLike) -> ShardSummary:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-parquet input
        raise ShardError(f"{path}: not a readable parquet file ({exc})") from exc
    schema = pf.schema_arrow
    modality = detect_modality(schema.names)
    cells = pf.read(columns=["grid_cell"]).column("grid_cell").unique()
    return ShardSummary(str(path), modality.name, [(f.name, str(f.type)) for f in schema], pf.metadata.num_rows,
                        pf.metadata.num_row_groups, len(cells), Path(path).stat().st_size)


def summarise_dataset(folder: str | os.PathLike) -> DatasetSummary:
    folder = Path(folder)
    modality = _modality_of_folder(folder)
    md = read_metadata(folder, modality)
    ts = md["timestamp"] if "timestamp" in md.columns else None
    schema = pq.read_schema(folder / "metadata.parquet")
    return DatasetSummary(
        path=str(folder),
        modality=modality,
        products=len(md),
        cells=int(md["grid_cell"].nunique()),
        duplicate_cells=int(md["grid_cell"].duplicated().sum()),
        shards=int(md["parquet_url"].nunique()),
        crs_values=int(md["crs"].nunique()),
        time_range=(str(ts.min()), str(ts.max())) if ts is not None and len(md) else None,
        cloud_cover_mean=float(md["cloud_cover"].mean()) if "cloud_cover" in md.columns else None,
        nodata_mean=float(md["nodata"].mean()),
        columns=[(f.name, str(f.type)) for f in schema],
    )


def summarise_world(root: str | os.PathLike) -> WorldSummary:
    root = Path(root)
    datasets, cells = [], {}
    for name, m in MODALITIES.items():
        folder = root / m.hub_repo.split("/")[-1]
        if (folder / "metadata.parquet").exists():
            datasets.append(summarise_dataset(folder))
            cells[name] = set(read_metadata(folder, name)["grid_cell"])
    if not datasets:
        raise MajorTomGenError(f"{root}: no Core-* dataset folders with a metadata.parquet")
    sets = list(cells.values())
    return WorldSummary(str(root), datasets, {k: len(v) for k, v in cells.items()},
                        len(set.intersection(*sets)), len(set.union(*sets)))


def _modality_of_folder(folder: Path) -> str:
    name = folder.name
    for m in MODALITIES.values():
        if name == m.hub_repo.split("/")[-1]:
            return m.name
    shards = sorted((folder / "images").glob("part_*.parquet"))
    if shards:
        return detect_modality(pq.read_schema(shards[0]).names).name
    raise MajorTomGenError(f"{folder}: cannot tell the modality (not named Core-XXX and no images/part_*.parquet)")


def preview_sheet(path: str | os.PathLike, out_png: str | os.PathLike, max_products: int = 8) -> Path:
    """Write a PNG sheet of up to ``max_products`` thumbnails per modality (one row each). A
    thumbnail that cannot be read is drawn as a red tile and reported in a warning; the rest
    of the sheet is still made."""
    path = Path(path)
    rows: list[np.ndarray] = []
    problems: list[str] = []
    if path.is_file():
        detect_modality(pq.read_schema(path).names)  # refuses a shard of no known modality
        n = min(pq.ParquetFile(path).metadata.num_row_groups, max_products)
        thumbs = [_thumbnail_or_placeholder(lambda i=i: decode_product_thumbnail(read_product(path, i, ["thumbnail"]),
                                                                          item=f"{path} row group {i}"), problems)
                  for i in range(n)]
        rows.append(_strip(thumbs))
    else:
        folders = [path] if (path / "metadata.parquet").exists() else [
            path / m.hub_repo.split("/")[-1] for m in MODALITIES.values()
            if (path / m.hub_repo.split("/")[-1] / "metadata.parquet").exists()]
        for folder in folders:
            md = read_metadata(folder, _modality_of_folder(folder)).head(max_products)
            thumbs = [_thumbnail_or_placeholder(lambda r=r: decode_product_thumbnail(read_product_of(r, ["thumbnail"]),
                                                                              item=f"{folder} {r.grid_cell}"), problems)
                      for _, r in md.iterrows()]
            rows.append(_strip(thumbs))
    if not rows:
        raise MajorTomGenError(f"{path}: nothing to preview")
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(out_png)
    if problems:
        warnings.warn(f"{len(problems)} thumbnail(s) could not be read and are drawn red: " + "; ".join(problems),
                      stacklevel=2)
    return out_png


def _thumbnail_or_placeholder(read, problems: list[str]) -> np.ndarray:
    """``read()``'s thumbnail, or a red 1068 px square when it fails (the reason is noted)."""
    try:
        return read()
    except MajorTomGenError as exc:
        problems.append(str(exc))
        return np.broadcast_to(np.array([200, 0, 0], np.uint8), (1068, 1068, 3)).copy()


def _strip(thumbs: list[np.ndarray]) -> np.ndarray:
    tiles = [np.asarray(Image.fromarray(to_product_grid(t)).resize((PREVIEW_TILE_PX, PREVIEW_TILE_PX), Image.BILINEAR))
             for t in thumbs]
    return np.concatenate(tiles, axis=1)

