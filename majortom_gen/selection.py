"""Choosing what to ingest: grid cells (ids, files of ids, regions), metadata filters, and
one product per cell and modality.

The default rule picks, per cell, the product with the least cloud cover (S2), then the
least nodata, then the most recent; ``most-recent`` puts recency first. Products that are
entirely nodata (``nodata >= 1``, a quirk of duplicated cells) are never chosen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from majortom_gen.errors import MajorTomGenError, MetadataError
from majortom_gen.georef import default_grid
from majortom_gen.modalities import MODALITY_NAMES, get_modality
from majortom_gen.regions import read_region
from majortom_gen.sources import dataset_root, read_metadata, resolve_parquet_url

PRODUCT_RULES = ("least-cloudy", "most-recent")


@dataclass(frozen=True)
class Filters:
    """Metadata filters. Dates are inclusive ISO strings (``'2020-01-01'``), compared in UTC;
    cloud cover in percent (S2 only); nodata as a fraction 0..1."""

    start: str | None = None
    end: str | None = None
    max_cloud_cover: float | None = None
    max_nodata: float | None = None


@dataclass
class Selection:
    """One chosen product per (cell, modality).

    ``products`` columns: grid_cell, modality, product_id, timestamp, cloud_cover, nodata,
    crs, shard (where to read it), parquet_row."""

    cells: list[str]
    products: pd.DataFrame
    missing: dict[str, str] = field(default_factory=dict)  # modality -> why it has no products

    def coverage(self) -> dict[str, int]:
        """Cells that have each modality."""
        counts = self.products.groupby("modality")["grid_cell"].nunique()
        return {m: int(counts.get(m, 0)) for m in MODALITY_NAMES}


def parse_cell_list(values: list[str] | tuple[str, ...]) -> list[str]:
    """Cell ids from arguments: ids separated by commas/whitespace, or paths of files: text/CSV
    with ids separated by commas or new lines (a ``grid_cell`` header is allowed; ``#`` starts a
    comment), or a parquet table with a ``grid_cell`` column (e.g. the ``train_metadata.parquet``
    of the official COP-GEN-Beta data preparation). Validated, deduplicated, in order of
    appearance; a bad id in a file names the file and the line."""
    grid = default_grid()
    ids: list[str] = []
    for value in values:
        if os.path.isfile(value):
            ids.extend(_cells_in_file(Path(value), grid))
        else:
            ids.extend(grid.check_cell(t) for t in value.replace(",", " ").split())
    return list(dict.fromkeys(ids))


def _cells_in_file(path: Path, grid) -> list[str]:
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["grid_cell"])
        except Exception as exc:  # noqa: BLE001 - any parquet failure becomes one clear message
            raise MajorTomGenError(f"{path}: cannot read a grid_cell column ({exc})") from None
        return [grid.check_cell(c) for c in table.column("grid_cell").to_pylist() if c]
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        for token in line.split("#", 1)[0].replace(";", ",").split(","):
            token = token.strip()
            if not token or token.lower() in ("grid_cell", "cell", "cell_id"):
                continue
            try:
                out.append(grid.check_cell(token))
            except MajorTomGenError as exc:
                raise type(exc)(f"{path}, line {number}: {exc}") from None
    return out


def cells_from(cells: list[str] | tuple[str, ...] | None = None, region: str | None = None) -> list[str]:
    """Cells from ``--cells`` values and/or a ``--region`` (file, WKT or bbox)."""
    ids = parse_cell_list(list(cells or []))
    if region:
        ids.extend(c for c in default_grid().cells_in(read_region(region)) if c not in set(ids))
    if not ids:
        raise MajorTomGenError("no grid cells selected: give --cells IDS|FILE or --region FILE|WKT|bbox")
    return ids


def _apply_filters(md: pd.DataFrame, f: Filters) -> pd.DataFrame:
    keep = md["nodata"] < 1.0
    if f.max_nodata is not None:
        keep &= md["nodata"] <= f.max_nodata
    if "timestamp" in md.columns:
        if f.start is not None:
            keep &= md["timestamp"] >= pd.Timestamp(f.start, tz="UTC")
        if f.end is not None:
            keep &= md["timestamp"] < pd.Timestamp(f.end, tz="UTC") + pd.Timedelta(days=1)
    if "cloud_cover" in md.columns and f.max_cloud_cover is not None:
        keep &= md["cloud_cover"] <= f.max_cloud_cover
    return md[keep]


def choose_products(md: pd.DataFrame, rule: str = "least-cloudy") -> pd.DataFrame:
    """One row per grid cell according to ``rule``."""
    if rule not in PRODUCT_RULES:
        raise MajorTomGenError(f"unknown product rule {rule!r}; valid rules: {', '.join(PRODUCT_RULES)}")
    md = md.copy()
    md["_cloud"] = md["cloud_cover"].fillna(0.0) if "cloud_cover" in md.columns else 0.0
    md["_time"] = md["timestamp"] if "timestamp" in md.columns else pd.Timestamp(0, tz="UTC")
    keys = ["_cloud", "nodata", "_time"] if rule == "least-cloudy" else ["_time", "_cloud", "nodata"]
    ascending = [True, True, False] if rule == "least-cloudy" else [False, True, True]
    md = md.sort_values(keys + ["parquet_url", "parquet_row"], ascending=ascending + [True, True], kind="stable")
    return md.drop_duplicates("grid_cell", keep="first").drop(columns=["_cloud", "_time"])


def select(
    source: str | os.PathLike,
    cells: list[str],
    modalities: tuple[str, ...] = MODALITY_NAMES,
    filters: Filters = Filters(),
    rule: str = "least-cloudy",
) -> Selection:
    """Read each modality's metadata under ``source`` and choose one product per cell.

    A modality whose dataset folder or metadata is missing is reported in
    ``Selection.missing`` rather than failing the whole selection."""
    wanted = set(cells)
    frames, missing = [], {}
    for name in modalities:
        m = get_modality(name)
        try:
            root = dataset_root(m.name, source)
            md = read_metadata(root, m.name)
        except (MetadataError, MajorTomGenError) as exc:
            missing[m.name] = str(exc)
            continue
        md = choose_products(_apply_filters(md[md["grid_cell"].isin(wanted)], filters), rule)
        frames.append(pd.DataFrame({
            "grid_cell": md["grid_cell"].to_numpy(),
            "modality": m.name,
            "product_id": md["product_id"].to_numpy() if "product_id" in md.columns else None,
            "timestamp": md["timestamp"].to_numpy() if "timestamp" in md.columns else pd.NaT,
            "cloud_cover": md["cloud_cover"].to_numpy() if "cloud_cover" in md.columns else float("nan"),
            "nodata": md["nodata"].to_numpy(),
            "crs": md["crs"].to_numpy(),
            "shard": [resolve_parquet_url(u, r) for u, r in zip(md["parquet_url"], md["source_root"])],
            "parquet_row": md["parquet_row"].astype("int64").to_numpy(),
        }))
    if not frames:
        raise MajorTomGenError(f"{source}: none of {', '.join(modalities)} could be read: " + "; ".join(missing.values()))
    products = pd.concat(frames, ignore_index=True)
    if products.empty:
        raise MajorTomGenError(f"{source}: no product matches the {len(cells)} selected cells and the filters")
    return Selection(list(cells), products, missing)


def summarise_cells(reasons: dict[str, str], limit: int = 10, full_list: str | os.PathLike | None = None) -> str:
    """One readable line for many cells with reasons (``{cell: why}``): the cells grouped by
    reason, the first ``limit`` of each named, with a count of the rest; with ``full_list``,
    every cell and reason is written to that file (tab-separated) and the line says so."""
    by_reason: dict[str, list[str]] = {}
    for cell, why in reasons.items():
        by_reason.setdefault(why, []).append(cell)
    parts = []
    for why, cells in by_reason.items():
        shown = ", ".join(cells[:limit]) + (f" and {len(cells) - limit:,} more" if len(cells) > limit else "")
        parts.append(f"{len(cells):,} cell{'s' if len(cells) != 1 else ''} {why}: {shown}")
    text = "; ".join(parts)
    if full_list is not None and len(reasons) > limit:
        Path(full_list).write_text("".join(f"{c}\t{w}\n" for c, w in reasons.items()))
        text += f" (full list in {full_list})"
    return text
