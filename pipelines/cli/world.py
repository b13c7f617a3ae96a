"""Commands on Major TOM data itself: the grid, the synthetic world, inspection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from majortom_gen.errors import MajorTomGenError
from pipelines.cli.common import (
    CellsOption,
    RegionOption,
    app,
    cells_from_options,
    console,
    err_console,
    grid_app,
    progress_bar,
    user_errors,
)


# ----------------------------------------------------------------------------- grid
@grid_app.command("locate")
@user_errors
def grid_locate(
    lat: Annotated[float, typer.Option(help="Latitude, degrees (WGS84).")],
    lon: Annotated[float, typer.Option(help="Longitude, degrees (WGS84).")],
    dist_km: Annotated[float, typer.Option(help="Grid cell size in km (Core: 10).")] = 10.0,
) -> None:
    """The cell holding a point, with its footprint and UTM zone."""
    from majortom_gen.georef import product_box
    from majortom_gen.grid import Grid

    grid = Grid(dist_km)
    cell = grid.cells_at([lat], [lon])[0]
    w, s, e, n = grid.bounds(cell)
    table = Table(show_header=False)
    table.add_row("cell", f"[bold]{cell}[/]")
    table.add_row("footprint (lon/lat)", f"{w:.6f}, {s:.6f}, {e:.6f}, {n:.6f}")
    table.add_row("UTM", f"EPSG:{grid.utm_epsg(cell)}")
    if dist_km == 10.0:
        box = product_box(cell, grid)
        table.add_row("Core product box (UTM m)", f"{box.west:.2f}, {box.south:.2f}, {box.east:.2f}, {box.north:.2f}")
    console.print(table)


@grid_app.command("cells")
@user_errors
def grid_cells(
    region: Annotated[str, typer.Option(help="Vector file (GeoJSON/GPKG/SHP), WKT polygon, or bbox 'west,south,east,north'.")],
    dist_km: Annotated[float, typer.Option(help="Grid cell size in km.")] = 10.0,
    out: Annotated[Optional[Path], typer.Option(help="Write the ids to this text file, one per line.")] = None,
) -> None:
    """All cells whose footprint intersects a region."""
    from majortom_gen.grid import Grid
    from majortom_gen.regions import read_region

    ids = Grid(dist_km).cells_in(read_region(region))
    if out is not None:
        out.write_text("\n".join(ids) + "\n")
        console.print(f"{len(ids)} cells written to {out}")
    else:
        console.print("\n".join(ids), highlight=False)
        err_console.print(f"{len(ids)} cells")


# ----------------------------------------------------------------------------- synth
def run_synth(ids: list[str], out: Path, *, seed: int, workers: int, products_per_shard: int,
              quirks: tuple[str, ...], modalities: tuple[str, ...]) -> dict:
    from majortom_gen.synth import SynthOptions, write_world

    options = SynthOptions(seed=seed, modalities=modalities, products_per_shard=products_per_shard,
                           quirks=quirks, workers=workers)
    done = 0
    with progress_bar("synthesising cells", "cells", total=len(ids)) as update:

        def tick(cell: str) -> None:
            nonlocal done
            done += 1
            update(done)

        return write_world(ids, out, options, progress=tick)


@app.command(context_settings={"allow_extra_args": True})
@user_errors
def synth(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder to write Core-*/ datasets into.")],
    cells: CellsOption = None,
    region: RegionOption = None,
    seed: Annotated[int, typer.Option(min=0, help="World seed: same seed, same bytes.")] = 0,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes (default: all cores).")] = 0,
    products_per_shard: Annotated[int, typer.Option(min=1, help="Row groups (products) per images/part_*.parquet (real data: 500).")] = 500,
    quirks: Annotated[Optional[list[str]], typer.Option(help="Reproduce real-data quirks: epsg_prefix, duplicate_cell, s1_1069px, or 'all'.")] = None,
    modalities: Annotated[str, typer.Option(help="Comma-separated modalities to write.")] = "DEM,S1RTC,S2L1C,S2L2A",
) -> None:
    """Write a format-true synthetic Major TOM world (all four Core modalities)."""
    from majortom_gen.modalities import parse_modalities
    from majortom_gen.synth.world import QUIRKS

    ids = cells_from_options((cells or []) + list(ctx.args), region)
    chosen = tuple(QUIRKS) if quirks and "all" in quirks else tuple(quirks or ())
    written = run_synth(ids, out, seed=seed, workers=workers or (os.cpu_count() or 1),
                        products_per_shard=products_per_shard, quirks=chosen, modalities=parse_modalities(modalities))
    for name, folder in written.items():
        console.print(f"[green]wrote[/] {name:6s} {folder}")


# ----------------------------------------------------------------------------- inspect
def print_inspection(path: Path, preview: Path | None) -> None:
    from majortom_gen import inspect as insp

    if path.is_file():
        s = insp.summarise_shard(path)
        console.print(f"[bold]{s.path}[/]: {s.modality} image shard, {s.rows} products in {s.row_groups} row groups, "
                      f"{s.cells} cells, {s.size_bytes / 1e6:.1f} MB")
        _print_columns(s.columns)
    elif (path / "metadata.parquet").exists():
        _print_dataset(insp.summarise_dataset(path))
    else:
        w = insp.summarise_world(path)
        for d in w.datasets:
            _print_dataset(d)
        table = Table(title="grid-cell coverage")
        table.add_column("modality")
        table.add_column("cells", justify="right")
        for name, n in w.cells_per_modality.items():
            table.add_row(name, str(n))
        table.add_row("[bold]all of them[/]", str(w.cells_in_all))
        table.add_row("[bold]any of them[/]", str(w.cells_in_any))
        console.print(table)
    if preview is not None:
        console.print(f"preview: {insp.preview_sheet(path, preview)}")


def _print_columns(columns: list[tuple[str, str]]) -> None:
    console.print("  columns: " + ", ".join(f"{n} [dim]{t}[/]" for n, t in columns), highlight=False)


def _print_dataset(d) -> None:
    line = (f"[bold]{d.modality}[/] {d.path}: {d.products} products, {d.cells} cells "
            f"({d.duplicate_cells} duplicate), {d.shards} shard(s), {d.crs_values} UTM zone(s), mean nodata {d.nodata_mean:.3f}")
    if d.cloud_cover_mean is not None:
        line += f", mean cloud cover {d.cloud_cover_mean:.1f}%"
    if d.time_range is not None:
        line += f", {d.time_range[0][:10]} .. {d.time_range[1][:10]}"
    console.print(line, highlight=False)
    _print_columns(d.columns)


@app.command()
@user_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="An images/part_*.parquet shard, a Core-XXX/ folder, or a folder of them.")],
    preview: Annotated[Optional[Path], typer.Option(help="Thumbnail preview PNG to write [default: ./<name>-preview.png].")] = None,
    no_preview: Annotated[bool, typer.Option("--no-preview", help="Do not write a preview.")] = False,
) -> None:
    """Schema, products, cells and coverage of Major TOM data, and a thumbnail preview sheet."""
    if not path.exists():
        raise MajorTomGenError(f"{path}: no such file or folder")
    if preview is None and not no_preview:
        preview = Path(f"{path.resolve().stem}-preview.png")
    print_inspection(path, None if no_preview else preview)


