"""Readers for Major TOM datasets: ``metadata.parquet`` and one product (one row group)
of an image shard, from a local path or any fsspec URL (``hf://datasets/Major-TOM/...``
through huggingface_hub; ``https://huggingface.co/datasets/.../resolve/...`` URLs are
mapped to ``hf://`` so that partial reads use the hub's file system).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import geopandas as gpd
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from majortom_gen.errors import MajorTomGenError, MetadataError, ShardError
from majortom_gen.formats import Raster, decode_geotiff, decode_thumbnail
from majortom_gen.georef import normalise_crs
from majortom_gen.modalities import MODALITIES, Modality, get_modality

REQUIRED_METADATA = ("grid_cell", "grid_row_u", "grid_col_r", "centre_lat", "centre_lon", "crs", "parquet_url", "parquet_row")
FOOTER_SAMPLE_BYTES = 4 * 1024 * 1024  # Core shard footers are large (500 row groups x ~17 columns)
_HF_RESOLVE = re.compile(r"^https?://huggingface\.co/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def to_fsspec_url(url: str) -> str:
    """Strip ``?...`` and map hub ``resolve`` URLs to ``hf://datasets/<repo>@<rev>/<path>``."""
    url = str(url).split("?", 1)[0]
    m = _HF_RESOLVE.match(url)
    if m:
        repo, rev, path = m.groups()
        rev = "" if rev == "main" else f"@{rev}"
        return f"hf://datasets/{repo}{rev}/{path}"
    return url


def resolve_parquet_url(parquet_url: str, root: str | os.PathLike | None) -> str:
    """Where to read a product's shard from.

    Relative ``parquet_url`` values (the synthetic world's) are joined to ``root``, the
    dataset folder holding ``metadata.parquet``. For absolute URLs, a local mirror
    ``root/images/<file name>`` is preferred when it exists; otherwise the URL is used."""
    url = str(parquet_url).split("?", 1)[0]
    if root is not None and not is_remote(root):
        if "://" not in url and not os.path.isabs(url):
            return str(Path(root) / url)
        local = Path(root) / "images" / url.rsplit("/", 1)[-1]
        if local.exists():
            return str(local)
    elif root is not None and "://" not in url:
        return f"{str(root).rstrip('/')}/{url}"
    return to_fsspec_url(url)


def dataset_root(modality: str | Modality, source: str | os.PathLike) -> str:
    """Folder of a modality's dataset under ``source``: ``source/Core-XXX`` if it exists (or
    ``source`` is remote), else ``source`` itself if it holds a metadata.parquet."""
    m = get_modality(modality)
    folder = m.hub_repo.split("/")[-1]
    if is_remote(source):
        return f"{str(source).rstrip('/')}/{folder}"
    src = Path(source)
    if (src / folder).is_dir():
        return str(src / folder)
    if (src / "metadata.parquet").exists():
        return str(src)
    raise MajorTomGenError(f"{src}: no {folder}/ folder and no metadata.parquet for modality {m.name}")


def read_metadata(path: str | os.PathLike, modality: str | Modality | None = None) -> gpd.GeoDataFrame:
    """Read a Core ``metadata.parquet`` into a GeoDataFrame (EPSG:4326 centre points).

    Normalises ``crs`` (``EPSG:EPSG:32633`` -> ``EPSG:32633``), parses ``timestamp``
    (``YYYYMMDDTHHMMSS``) to UTC datetimes, strips ``?...`` from ``parquet_url`` and adds
    ``source_root`` (the folder relative ``parquet_url`` values refer to). ``path`` may be
    the file or its folder, local or remote."""
    url = to_fsspec_url(str(path))
    if not url.endswith(".parquet"):
        url = url.rstrip("/") + "/metadata.parquet"
    try:
        with fsspec.open(url, "rb") as f:
            table = pq.read_table(f)
    except FileNotFoundError as exc:
        raise MetadataError(f"{url}: metadata file not found") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise MetadataError(f"{url}: not a readable parquet file ({exc})") from exc
    df = table.to_pandas()
    required = list(REQUIRED_METADATA)
    if modality is not None:
        required += [c for c in get_modality(modality).metadata_columns if c not in required]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise MetadataError(f"{url}: missing metadata columns {missing} (has {list(df.columns)})")
    mapping = {}
    for value in df["crs"].unique():  # few distinct values among millions of rows
        row = int((df["crs"] == value).to_numpy().nonzero()[0][0])
        mapping[value] = normalise_crs(value, item=f"{url} row {row} crs")
    df["crs"] = df["crs"].map(mapping)
    if "timestamp" in df.columns:
        parsed = pd.to_datetime(df["timestamp"], format="%Y%m%dT%H%M%S", utc=True, errors="coerce")
        bad = parsed.isna() & df["timestamp"].notna()
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise MetadataError(f"{url}: row {i} timestamp {df['timestamp'].iloc[i]!r} is not YYYYMMDDTHHMMSS")
        df["timestamp"] = parsed
    df["parquet_url"] = df["parquet_url"].astype(str).str.split("?", n=1).str[0]
    df["source_root"] = url.rsplit("/", 1)[0]
    if "geometry" in df.columns:
        df = df.drop(columns="geometry")
    return gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(df["centre_lon"], df["centre_lat"]), crs="EPSG:4326")


def read_product(
    url: str | os.PathLike,
    row_group: int,
    columns: Sequence[str] | None = None,
    *,
    footer_sample_size: int = FOOTER_SAMPLE_BYTES,
) -> dict[str, Any]:
    """Read one product (one row group) of an image shard as ``{column: value}``.

    Remote files are read partially: the footer and the requested columns of that row group
    only. Raises :class:`ShardError` naming the file and row group when the file, the row
    group or a column is missing, or when the row group does not hold exactly one row."""
    (_, result), = read_row_groups(url, [row_group], columns, footer_sample_size=footer_sample_size)
    if isinstance(result, ShardError):
        raise result
    return result


def read_row_groups(
    url: str | os.PathLike,
    row_groups: Sequence[int],
    columns: Sequence[str] | None = None,
    *,
    footer_sample_size: int = FOOTER_SAMPLE_BYTES,
) -> Iterator[tuple[int, dict[str, Any] | ShardError]]:
    """Read several products of one shard, opening the file once: yields
    ``(row_group, {column: value})`` or ``(row_group, ShardError)`` per requested row group,
    so one bad row group does not stop the others. A file that cannot be opened at all
    yields the same error for every row group."""
    url = to_fsspec_url(str(url))
    cols = list(columns) if columns is not None else None
    wanted = [int(r) for r in row_groups]
    try:
        if is_remote(url):
            from fsspec.parquet import open_parquet_file

            opened = open_parquet_file(url, columns=cols, row_groups=wanted, footer_sample_size=footer_sample_size)
        else:
            opened = open(url, "rb")
        with opened as f:
            pf = pq.ParquetFile(f)
            n, names = pf.metadata.num_row_groups, pf.schema_arrow.names
            absent = [c for c in cols or [] if c not in names]
            for rg in wanted:
                item = f"{url} row group {rg}"
                if absent:
                    yield rg, ShardError(f"{item}: no column(s) {absent} (has {names})")
                elif not 0 <= rg < n:
                    yield rg, ShardError(f"{item}: out of range, the file has {n} row groups")
                else:
                    try:
                        table = pf.read_row_group(rg, columns=cols)
                    except (pa.ArrowInvalid, OSError) as exc:
                        yield rg, ShardError(f"{item}: unreadable row group ({exc})")
                        continue
                    if table.num_rows != 1:
                        yield rg, ShardError(f"{item}: holds {table.num_rows} rows, expected one product per row group")
                    else:
                        yield rg, {name: table.column(name)[0].as_py() for name in table.column_names}
    except FileNotFoundError:
        for rg in wanted:
            yield rg, ShardError(f"{url}: shard not found (metadata row group {rg} points at it)")
    except (pa.ArrowInvalid, OSError) as exc:
        for rg in wanted:
            yield rg, ShardError(f"{url} row group {rg}: unreadable parquet ({exc})")


def read_product_of(row: pd.Series, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """Read the product a metadata row points at (``parquet_url`` + ``parquet_row``)."""
    url = resolve_parquet_url(row["parquet_url"], row.get("source_root"))
    return read_product(url, int(row["parquet_row"]), columns)


def decode_band(product: dict[str, Any], band: str, *, item: str = "product") -> Raster:
    if band not in product:
        raise ShardError(f"{item}: column {band!r} was not read")
    return decode_geotiff(product[band], item=f"{item}, column {band}")


def decode_product_thumbnail(product: dict[str, Any], *, item: str = "product"):
    if "thumbnail" not in product:
        raise ShardError(f"{item}: column 'thumbnail' was not read")
    return decode_thumbnail(product["thumbnail"], item=f"{item}, column thumbnail")


def detect_modality(columns: Sequence[str]) -> Modality:
    """The modality whose shard schema matches these column names."""
    cols = tuple(columns)
    for m in MODALITIES.values():
        if cols == m.shard_columns:
            return m
    for m in MODALITIES.values():
        if set(m.shard_columns) <= set(cols):
            return m
    raise ShardError(f"columns {list(cols)} match no Core modality's shard schema")
