"""The ``majortom-gen`` command line: parse, call the library, print.

User mistakes (a bad cell id, an invalid polygon, a corrupt file) end with one red line
on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from majortom_gen.errors import MajorTomGenError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Generative modelling of Copernicus data on the Major TOM grid.")
grid_app = typer.Typer(no_args_is_help=True, help="The Major TOM grid: locate points, list the cells of a region.")
app.add_typer(grid_app, name="grid")
console = Console()
err_console = Console(stderr=True)


def _user_errors(fn):
    """Turn MajorTomGenError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MajorTomGenError, OSError) as exc:  # OSError: unwritable --out, full disk, ...
            err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _cells_from(cells: list[str] | None, region: str | None) -> list[str]:
    from majortom_gen.selection import cells_from

    return cells_from(cells, region)


def _cells_file(path: Path, option: str) -> list[str]:
    """The cell ids of a file given to ``option`` (see :func:`majortom_gen.selection.parse_cell_list`)."""
    from majortom_gen.selection import parse_cell_list

    if not path.is_file():
        raise MajorTomGenError(f"{option} {path}: no such file")
    return parse_cell_list([str(path)])


CellsOption = Annotated[Optional[list[str]], typer.Option(
    help="Cell ids: --cells 501U_60R 502U_60R, comma-separated, or a text/CSV file of ids.")]
RegionOption = Annotated[Optional[str], typer.Option(help="Vector file, WKT polygon or bbox 'west,south,east,north'.")]


@contextmanager
def _progress(description: str, unit: str, total: int | None = None):
    """A rich progress bar; yields ``update(done, total=None, note='')`` showing ``unit``/s."""
    start = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")

        def update(done: int, total: int | None = None, note: str = "") -> None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            progress.update(task, completed=done, total=total if total is not None else progress.tasks[task].total,
                            rate=f"{note}{rate:.2f} {unit}/s")

        yield update


def _command_line(command: str, **options) -> str:
    """The command with the options it ran with (recorded in what it makes): ``None`` options
    are left out, ``True`` flags written bare, lists joined by commas."""
    parts = [f"majortom-gen {command}"]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- grid
@grid_app.command("locate")
@_user_errors
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
@_user_errors
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
    with _progress("synthesising cells", "cells", total=len(ids)) as update:

        def tick(cell: str) -> None:
            nonlocal done
            done += 1
            update(done)

        return write_world(ids, out, options, progress=tick)


@app.command(context_settings={"allow_extra_args": True})
@_user_errors
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

    ids = _cells_from((cells or []) + list(ctx.args), region)
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
@_user_errors
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


# ----------------------------------------------------------------------------- ingest and store
store_app = typer.Typer(no_args_is_help=True, help="The grid-indexed latent store.")
app.add_typer(store_app, name="store")
EXIT_COMPLETED_WITH_ERRORS = 3


def run_ingest(source: str, ids: list[str], store: Path, options, *, modalities: tuple[str, ...], filters, rule: str):
    from pipelines.ingest import ingest

    with _progress("ingesting cells", "cells") as update:
        report = ingest(source, ids, store, options, modalities=modalities, filters=filters, rule=rule, progress=update)
    console.print(f"[green]stored[/] {report.cells_written} cells, {report.fragments_written} fragments in "
                  f"{report.shards_written} shard(s) -> {report.store} ({report.seconds:.1f} s); "
                  f"{report.cells_already_stored} cells were already stored")
    console.print("products per modality: " + ", ".join(f"{m} {n} cells" for m, n in report.coverage.items()), highlight=False)
    for m, why in report.missing_modalities.items():
        console.print(f"[yellow]no {m}:[/] {why}", highlight=False)
    for m, why in report.failed_modalities.items():
        err_console.print(Text.assemble((f"{m} failed: ", "bold red"), why, f"; no {m} was stored. Fix it and run the "
                                        f"same command again: the cells get {m} added."), soft_wrap=True)
    codec = report.codec
    line = f"codec {codec['name']} ({codec['config_hash'][:12]})"
    if report.codec_psnr_db is not None:
        line += f", set up now: reconstruction PSNR {report.codec_psnr_db:.1f} dB on the first cells"
    console.print(line)
    if report.quarantined:
        err_console.print(Text(f"{len(report.quarantined)} cell(s) quarantined (see {report.store}/ingest-errors.jsonl):", style="yellow"))
        for cell, reason in sorted(report.quarantined.items())[:20]:
            err_console.print(Text(f"  {cell}: {reason}"), soft_wrap=True)
    return report


@app.command(context_settings={"allow_extra_args": True})
@_user_errors
def ingest(
    ctx: typer.Context,
    source: Annotated[str, typer.Option(help="Folder (or URL, e.g. hf://datasets/Major-TOM) holding Core-*/ datasets.")],
    store: Annotated[Path, typer.Option(help="Latent store folder (created or extended).")],
    cells: CellsOption = None,
    region: RegionOption = None,
    codec: Annotated[str, typer.Option(help="small-vae (offline, learned, shipped), patch-pca (linear, fitted on the "
                                            "data) or sd-vae.")] = "small-vae",
    codec_source: Annotated[Optional[str], typer.Option(help="sd-vae weights: hub id, folder or .pth (the official "
                                                             "encoder is autoencoder_kl.pth; ENCODE,DECODE gives both); "
                                                             "small-vae: a folder from `codec train` (default: shipped); patch-pca: an "
                                                             "existing fit, e.g. another store's STORE/codec (default: "
                                                             "fit on the data).")] = None,
    modalities: Annotated[str, typer.Option(help="Comma-separated modalities.")] = "DEM,S1RTC,S2L1C,S2L2A",
    fragments: Annotated[str, typer.Option(help="grid (4x4 of 256 px) or centre (one 256 px crop).")] = "grid",
    start: Annotated[Optional[str], typer.Option(help="Earliest acquisition date, YYYY-MM-DD.")] = None,
    end: Annotated[Optional[str], typer.Option(help="Latest acquisition date, YYYY-MM-DD.")] = None,
    max_cloud_cover: Annotated[Optional[float], typer.Option(help="Max S2 cloud cover, percent.")] = None,
    max_nodata: Annotated[Optional[float], typer.Option(help="Max nodata fraction 0..1.")] = None,
    rule: Annotated[str, typer.Option(help="Product choice per cell: least-cloudy or most-recent.")] = "least-cloudy",
    scheduler: Annotated[Optional[str], typer.Option(help="Dask scheduler address; default: an embedded local cluster.")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Local cluster workers (default: all cores).")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="Threads per worker.")] = 1,
    cells_per_shard: Annotated[int, typer.Option(min=1, help="Cells per store shard (one Dask encode task each).")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (sd-vae).")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or bf16 (sd-vae on GPU).")] = "fp32",
) -> None:
    """Ingest Major TOM shards into a grid-indexed latent store (Dask)."""
    from majortom_gen.modalities import parse_modalities
    from majortom_gen.selection import Filters
    from pipelines.ingest import IngestOptions

    ids = _cells_from((cells or []) + list(ctx.args), region)
    options = IngestOptions(codec=codec, codec_source=codec_source, fragment_mode=fragments, cells_per_shard=cells_per_shard,
                            scheduler=scheduler, workers=workers or None, threads=threads, device=device, precision=precision)
    filters = Filters(start, end, max_cloud_cover, max_nodata)
    report = run_ingest(source, ids, store, options, modalities=parse_modalities(modalities), filters=filters, rule=rule)
    if report.completed_with_errors:
        err_console.print(Text("completed with errors", style="bold yellow"))
        raise typer.Exit(EXIT_COMPLETED_WITH_ERRORS)


codec_app = typer.Typer(no_args_is_help=True, help="The learned offline codec: train one, measure one.")
app.add_typer(codec_app, name="codec")


@codec_app.command("train")
@_user_errors
def codec_train(
    source: Annotated[str, typer.Option(help="Major TOM root (local folder or URL) with the Core datasets.")],
    out: Annotated[Path, typer.Option(help="Codec folder to write (model files + codec.json).")],
    cells: CellsOption = None,
    region: RegionOption = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 3000,
    batch_size: Annotated[int, typer.Option(min=1, help="Crops per step.")] = 16,
    crop: Annotated[int, typer.Option(min=8, help="Crop size in pixels (a multiple of 8).")] = 96,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW, cosine decay).")] = 1e-3,
    seed: Annotated[int, typer.Option(min=0, help="Seed of every random choice (crops, flips, init).")] = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Train the small-vae codec (a small kl-f8 AutoencoderKL, 4 x 32 x 32 latents) on the
    thumbnail fragments of every modality of the given cells, with one latent normalisation
    per modality. The shipped codec was made this way (see its codec.json)."""
    from pipelines.codec import CodecTrainConfig, train_codec

    ids = _cells_from(cells, region)
    config = CodecTrainConfig(steps=steps, batch_size=batch_size, crop=crop, lr=lr, seed=seed)
    with _progress("training codec", "steps") as update:
        def tick(step: int, total: int, loss: float) -> None:
            update(step, total, note=f"loss {loss:.4f}, ")

        try:
            command = _command_line("codec train", source=source, cells=cells, region=region, out=out, steps=steps,
                                    batch_size=batch_size, crop=crop, lr=lr, seed=seed)
            result = train_codec(source, ids, out, config=config, command=command, progress=tick, overwrite=overwrite)
        except ValueError as exc:
            raise MajorTomGenError(str(exc)) from None
    console.print(f"[green]codec[/] -> {result.folder} ({result.seconds:.0f} s); fragments per modality "
                  f"{result.fragments}; reconstruction PSNR on them (dB): {result.psnr_db}", highlight=False)


@codec_app.command("eval")
@_user_errors
def codec_eval(
    codec: Annotated[str, typer.Option(help="A codec folder (codec train output, STORE/codec) or 'small-vae' (shipped).")],
    source: Annotated[Optional[str], typer.Option(help="Major TOM root whose cells' fragments to reconstruct.")] = None,
    cells: CellsOption = None,
    region: RegionOption = None,
    images: Annotated[Optional[list[Path]], typer.Option(
        help="Image files (PNG/JPEG/WebP, 256 x 256 fragments) to reconstruct, e.g. real fragments.")] = None,
) -> None:
    """Reconstruction PSNR (dB, 8-bit scale) of a codec per modality of a source's cells, and
    per image file."""
    from pipelines.codec import image_psnr, open_codec, psnr_by_modality, source_fragments

    if source is None and not images:
        raise MajorTomGenError("give --source with --cells/--region, or --images")
    c = open_codec(codec)
    if source is not None:
        frags = source_fragments(source, _cells_from(cells, region))
        console.print(f"{c.name} on {source}: " + ", ".join(f"{m} {v:.2f} dB ({len(frags[m])} fragments)"
                                                            for m, v in psnr_by_modality(c, frags).items()), highlight=False)
    for path in images or []:
        console.print(f"{c.name} on {path}: {image_psnr(c, path):.2f} dB", highlight=False)


@store_app.command("info")
@_user_errors
def store_info(store: Annotated[Path, typer.Argument(help="Latent store folder.")]) -> None:
    """Rows, cells, modality coverage, codec and size of a latent store."""
    from majortom_gen.store import LatentStore

    info = LatentStore.open(store).info()
    console.print(f"[bold]{info['root']}[/]: {info['rows']} fragments of {info['cells']} cells in {info['shards']} shard(s), "
                  f"{info['size_bytes'] / 1e6:.1f} MB; {info['fragment_mode']} fragments", highlight=False)
    table = Table(title="modality coverage")
    for col in ("modality", "fragments", "cells"):
        table.add_column(col, justify="right" if col != "modality" else "left")
    for m, cov in info["coverage"].items():
        table.add_row(m, str(cov["fragments"]), str(cov["cells"]))
    table.add_row("[bold]all aligned[/]", str(info["aligned_fragments"]), "")
    console.print(table)
    codec = info["codec"]
    console.print(f"codec: {codec['name']} ({codec['config_hash'][:12]}) {json_dumps_short(codec['config'])}", highlight=False)


@store_app.command("check")
@_user_errors
def store_check(
    store: Annotated[Path, typer.Argument(help="Latent store folder.")],
    repair: Annotated[bool, typer.Option("--repair", help="Move unreadable shards to STORE/quarantine/, rebuild "
                                         "manifest.json from the intact shards and list the cells to ingest again.")] = False,
) -> None:
    """Read every shard: report missing, unreadable, changed and unlisted shards and fragments
    stored twice (exit 3 if any); with --repair, make the store consistent again."""
    from majortom_gen.store import check_store

    report = check_store(store, repair=repair)
    say = functools.partial(console.print, highlight=False, soft_wrap=True)
    say(f"[bold]{report.root}[/]: {report.shards} intact shard(s), {report.rows} rows")
    if report.writer:
        say(f"[yellow]note[/]: a writer is running ({report.writer}); shards it is writing show as unlisted")
    if report.manifest:
        say(f"[red]manifest.json[/]: {report.manifest}")
    for p in report.problems:
        held = "" if not p.cells else " (cells " + ", ".join(f"{c}: {'+'.join(m)}" for c, m in sorted(p.cells.items())) + ")"
        say(f"[red]shards/{p.file}[/]: {p.problem}: {p.reason}{held}")
    for line in report.duplicates[:20]:
        say(f"[red]stored twice[/]: {line}")
    if len(report.duplicates) > 20:
        say(f"... and {len(report.duplicates) - 20} more fragments stored twice")
    if report.ok:
        say("[green]ok[/]: every listed shard is readable, nothing is stored twice")
        return
    if not report.repaired:
        say(f"run `majortom-gen store check --repair {report.root}` to repair it")
        raise typer.Exit(EXIT_COMPLETED_WITH_ERRORS)
    for path in report.moved:
        say(f"moved aside: {path}")
    say(f"[green]repaired[/]: manifest.json rebuilt from {report.shards} intact shard(s)")
    if report.reingest:
        ids = ",".join(sorted(report.reingest))
        say(f"cells to ingest again ({len(report.reingest)}): " + ", ".join(
            f"{c} ({'+'.join(m)})" for c, m in sorted(report.reingest.items())))
        say(f"e.g. majortom-gen ingest --source SOURCE --store {report.root} --cells {ids}")
    if report.unknown:
        say(f"the cells of {', '.join(report.unknown)} are unknown (no manifest recorded them): ingest your cells "
            "again; those stored are skipped")


def json_dumps_short(config: dict) -> str:
    import json

    text = json.dumps(config, default=str)
    return text if len(text) < 200 else text[:197] + "..."


# ----------------------------------------------------------------------------- model
ReflectanceOption = Annotated[bool, typer.Option(
    help="Also write generated S2 fragments as approximate reflectance (inverted thumbnail, below saturation only).")]
CodecSourceOption = Annotated[Optional[str], typer.Option(
    help="For stores made with sd-vae: the VAE the store was encoded with (hub id, folder or .pth), or ENCODE,DECODE "
         "to decode with other weights (official: autoencoder_kl.pth,autoencoder_kl_ema.pth); small-vae and patch-pca "
         "need nothing.")]
WorkersOption = Annotated[Optional[int], typer.Option(
    min=0, help="Sampling workers on a local Dask cluster (default: one per GPU when there are several, else in-process).")]


def _device_option(value: str | None) -> str | None:
    """Refuse a device torch cannot use (``cuda``/``cuda:N`` without CUDA, ``mps`` without
    MPS, an unknown name) before any work; ``train`` applies its stricter rule itself."""
    if value is None:
        return value
    from pipelines.sample import device_problem

    problem = device_problem(value)
    if problem:
        raise typer.BadParameter(problem)
    return value


DeviceOption = Annotated[Optional[str], typer.Option(callback=_device_option,
                                                     help="cpu or cuda (default: cuda when available).")]
OverwriteOption = Annotated[bool, typer.Option(
    help="Replace --out when it holds an earlier output of majortom-gen (never a folder it did not write).")]


def run_train(config: str, store: Path, out: Path, *, max_steps: int | None, resume: bool, test_fraction: float = 0.05,
              device: str | None = None, init_from: Path | None = None, command: str = "",
              keep_checkpoints: int | None = None):
    """Train with a progress bar; training warnings (a damaged checkpoint skipped, a config
    changed on resume) are printed as one yellow line each."""
    import warnings

    from pipelines.train import TrainingWarning, train_on_store

    others = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TrainingWarning):
            err_console.print(Text.assemble(("warning: ", "bold yellow"), str(message)), highlight=False, soft_wrap=True)
        else:
            others(message, category, filename, lineno, file, line)

    with warnings.catch_warnings(), _progress("training", "steps") as update:
        warnings.showwarning = show
        warnings.simplefilter("always", TrainingWarning)

        def tick(step: int, total: int, loss: float) -> None:
            update(step, total, note=f"loss {loss:.4f}, ")

        try:
            result = train_on_store(config, store, out, max_steps=max_steps, resume=resume, progress=tick,
                                    test_fraction=test_fraction, device=device, init_from=init_from, command=command,
                                    keep_checkpoints=keep_checkpoints)
        except ValueError as exc:
            raise MajorTomGenError(str(exc)) from None
    last = f"last loss {result.last_loss:.4f}" if result.losses else "no step left to run"
    console.print(f"[green]trained[/] {result.steps} steps, {last}; EMA model -> {result.model_dir}; "
                  f"loss curve -> {out / 'loss.png'}", highlight=False)
    return result


@app.command()
@_user_errors
def train(
    store: Annotated[Path, typer.Option(help="Latent store to train on (its training split).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, log, loss curve, final EMA model.")],
    config: Annotated[str, typer.Option(help="tiny, paper, release, or a YAML path.")] = "tiny",
    max_steps: Annotated[Optional[int], typer.Option(
        min=1, help="Stop after this many steps (default: the config's).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Resume from the last complete checkpoint in --out (refused on a store of another codec).")] = False,
    test_fraction: Annotated[float, typer.Option(help="Share of cells held out for testing (by grid cell, seeded).")] = 0.05,
    init_from: Annotated[Optional[Path], typer.Option(
        help="Start from this model's weights (fine-tuning; same network config), e.g. the shipped demo model.")] = None,
    device: DeviceOption = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(
        min=1, help="Keep the newest N checkpoints, deleting older ones (default: the config's, 3).")] = None,
) -> None:
    """Train the multimodal U-ViT on a latent store (accelerate; GPU when present)."""
    command = _command_line("train", config=config, store=store, out=out, max_steps=max_steps, resume=resume,
                            test_fraction=test_fraction, init_from=init_from, device=device,
                            keep_checkpoints=keep_checkpoints)
    run_train(config, store, out, max_steps=max_steps, resume=resume, test_fraction=test_fraction, device=device,
              init_from=init_from, command=command, keep_checkpoints=keep_checkpoints)


@app.command(context_settings={"allow_extra_args": True})
@_user_errors
def sample(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="A trained or converted model folder (save_pretrained).")],
    store: Annotated[Path, typer.Option(help="Latent store holding the conditions.")],
    out: Annotated[Path, typer.Option(help="Output folder: samples.npz, samples.json, PNG grids.")],
    generate: Annotated[str, typer.Option(help="Modalities to generate, comma-separated.")],
    condition: Annotated[str, typer.Option(help="Condition modalities, comma-separated, or 'none'.")] = "none",
    cells: CellsOption = None,
    region: RegionOption = None,
    n_samples: Annotated[int, typer.Option(min=1, help="Samples per fragment.")] = 1,
    steps: Annotated[int, typer.Option(min=1, help="DPM-Solver++ steps.")] = 50,
    seed: Annotated[int, typer.Option(min=0, help="Seed; each fragment's noise derives from (seed, cell, fragment).")] = 0,
    deterministic_conditions: Annotated[bool, typer.Option(help="Use the conditions' latent means, not samples.")] = False,
    device: DeviceOption = None,
    workers: WorkersOption = None,
    codec_source: CodecSourceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Generate any subset of modalities from any other subset, for fragments of a store."""
    from majortom_gen.modalities import parse_modalities
    from pipelines.sample import sample_store

    ids = _cells_from((cells or []) + list(ctx.args), region)
    cond = () if condition.strip().lower() in ("", "none") else parse_modalities(condition)
    try:
        with _progress("sampling", "fragments") as update:
            result = sample_store(model, store, ids, cond, parse_modalities(generate), out, n_samples=n_samples,
                                  steps=steps, seed=seed, deterministic_conditions=deterministic_conditions, device=device,
                                  workers=workers, progress=update, codec_source=codec_source, overwrite=overwrite)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None
    console.print(f"[green]sampled[/] {result.fragments} fragments x {n_samples} -> {result.out} "
                  f"({len(result.files)} files)", highlight=False)


@app.command(context_settings={"allow_extra_args": True})
@_user_errors
def chain(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="A trained or converted model folder.")],
    store: Annotated[Path, typer.Option(help="Latent store with both sides of the chain.")],
    out: Annotated[Path, typer.Option(help="Output folder: chain.npz, chain.json, a PNG per cell.")],
    a: Annotated[str, typer.Option(help="Start modalities (taken from the store), comma-separated.")],
    b: Annotated[str, typer.Option(help="The other side, comma-separated.")],
    n: Annotated[int, typer.Option(min=1, help="Generations: b from a, a from b, ... n times.")] = 4,
    cells: CellsOption = None,
    region: RegionOption = None,
    steps: Annotated[int, typer.Option(min=1, help="DPM-Solver++ steps.")] = 50,
    seed: Annotated[int, typer.Option(min=0, help="Seed (iteration i uses seed + i).")] = 0,
    device: DeviceOption = None,
    codec_source: CodecSourceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """The paper's looping experiment: generate B from the real A, then A from the generated B,
    n times, to see what survives repeated translation."""
    from majortom_gen.modalities import parse_modalities
    from pipelines.sample import chain_store

    ids = _cells_from((cells or []) + list(ctx.args), region)
    try:
        result = chain_store(model, store, ids, parse_modalities(a), parse_modalities(b), n, out, steps=steps, seed=seed,
                             device=device, codec_source=codec_source, overwrite=overwrite)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None
    console.print(f"[green]chained[/] {result.fragments} fragments x {n} generations -> {result.out}", highlight=False)


@app.command()
@_user_errors
def export(
    samples: Annotated[Path, typer.Option(help="Output folder of `majortom-gen sample`.")],
    store: Annotated[Path, typer.Option(help="The latent store the samples were drawn from.")],
    out: Annotated[Path, typer.Option(help="Folder for the GeoTIFFs: <cell>/<modality>/f<fragment>_s<sample>.tif.")],
    crs: Annotated[str, typer.Option(help="CRS of the blended mosaic COGs.")] = "EPSG:4326",
    region: RegionOption = None,
    mosaic: Annotated[bool, typer.Option(help="Also write mosaics: a VRT per UTM zone and a blended COG per modality and sample.")] = True,
    reflectance: ReflectanceOption = False,
    codec_source: CodecSourceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Write generated fragments as Cloud-Optimized GeoTIFFs in their cell's UTM CRS, and mosaics."""
    from majortom_gen.georef import normalise_crs
    from majortom_gen.regions import read_region
    from pipelines.export import export_samples

    result = export_samples(samples, store, out, mosaic=mosaic, dst_crs=normalise_crs(crs, item="--crs"), reflectance=reflectance,
                            codec_source=codec_source, overwrite=overwrite,
                            region=read_region(region) if region else None)
    console.print(f"[green]exported[/] {len(result.files)} COGs -> {result.out}", highlight=False)


@app.command("generate", context_settings={"allow_extra_args": True})
@_user_errors
def generate_region_cmd(
    ctx: typer.Context,
    store: Annotated[Path, typer.Option(help="Latent store holding what the region has.")],
    model: Annotated[Path, typer.Option(help="A trained or converted model folder.")],
    out: Annotated[Path, typer.Option(help="Output folder: samples/, geotiff/ (fragments and mosaics), region.json.")],
    generate: Annotated[str, typer.Option(help="Modalities to generate, comma-separated (e.g. DEM,S1RTC).")],
    region: RegionOption = None,
    cells: CellsOption = None,
    condition: Annotated[str, typer.Option(help="'auto' (everything each cell has) or comma-separated modalities.")] = "auto",
    source: Annotated[Optional[str], typer.Option(help="Major TOM source to ingest cells the store lacks.")] = None,
    n_samples: Annotated[int, typer.Option(min=1, help="Samples per fragment (> 1 adds mean/std rasters).")] = 1,
    steps: Annotated[int, typer.Option(min=1, help="DPM-Solver++ steps.")] = 50,
    seed: Annotated[int, typer.Option(min=0, help="Seed; fragment noise derives from (seed, cell, fragment).")] = 0,
    crs: Annotated[str, typer.Option(help="CRS of the mosaic COGs.")] = "EPSG:4326",
    reflectance: ReflectanceOption = False,
    device: DeviceOption = None,
    workers: WorkersOption = None,
    codec_source: CodecSourceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Fill a region: generate the missing modalities for the cells covering a polygon and
    export them as GeoTIFFs and mosaics."""
    from majortom_gen.georef import normalise_crs
    from majortom_gen.modalities import parse_modalities
    from majortom_gen.regions import read_region
    from majortom_gen.selection import parse_cell_list
    from pipelines.region import generate_region

    geom = read_region(region) if region else None
    ids = parse_cell_list((cells or []) + list(ctx.args))
    if geom is None and not ids:
        raise MajorTomGenError("give --region FILE|WKT|bbox or --cells IDS")
    cond = "auto" if condition.strip().lower() == "auto" else parse_modalities(condition)
    try:
        with _progress("sampling", "fragments") as update:
            result = generate_region(model, store, out, generate=parse_modalities(generate), region=geom, cells=ids,
                                     condition=cond, source=source, n_samples=n_samples, steps=steps, seed=seed,
                                     dst_crs=normalise_crs(crs, item="--crs"), reflectance=reflectance, device=device,
                                     workers=workers, progress=update, codec_source=codec_source,
                                     overwrite=overwrite)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None
    for name, group in result.groups.items():
        console.print(f"conditioned on {name}: {len(group)} cell(s)", highlight=False)
    if result.skipped:
        from majortom_gen.selection import summarise_cells

        err_console.print(Text(f"skipped {summarise_cells(result.skipped)} (all listed in {result.out / 'region.json'})",
                               style="yellow"), soft_wrap=True)
    console.print(f"[green]wrote[/] {len(result.files)} files -> {result.out}/geotiff (mosaics in geotiff/mosaic)", highlight=False)


dataset_app = typer.Typer(no_args_is_help=True, help="Training sets by grid id: split subsets of a store, HF datasets export.")
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("build", context_settings={"allow_extra_args": True})
@_user_errors
def dataset_build(
    ctx: typer.Context,
    store: Annotated[Path, typer.Option(help="Latent store to take the fragments from.")],
    out: Annotated[Path, typer.Option(help="Output folder: a latent store with a split column, plus hf/.")],
    cells: CellsOption = None,
    region: RegionOption = None,
    modalities: Annotated[Optional[str], typer.Option(help="Modalities every fragment must have (default: the store's).")] = None,
    split: Annotated[str, typer.Option(help="spatial (blocks of neighbouring cells) or random (per cell).")] = "spatial",
    test_fraction: Annotated[float, typer.Option(help="Share of cells in the test split.")] = 0.05,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the split.")] = 0,
    block_size: Annotated[int, typer.Option(min=1, help="Spatial blocks of N x N grid cells (about 10*N km).")] = 4,
    hf: Annotated[bool, typer.Option(help="Also export a Hugging Face datasets DatasetDict to OUT/hf.")] = True,
    overwrite: OverwriteOption = False,
) -> None:
    """A self-contained training set: the store's fragments for some cells (or all), split by
    grid cell (spatially blocked, reproducible), as GeoParquet and as a `datasets` export."""
    from majortom_gen.modalities import parse_modalities
    from pipelines.dataset import build_dataset

    ids = (cells or []) + list(ctx.args)
    selected = _cells_from(ids, region) if (ids or region) else None
    result = build_dataset(store, out, cells=selected, modalities=parse_modalities(modalities) if modalities else None,
                           split=split, test_fraction=test_fraction, seed=seed, block=block_size, hf=hf,
                           overwrite=overwrite)
    for s in ("train", "test"):
        console.print(f"{s:5s}: {len(result.cells[s]):5d} cells {result.fragments[s]:7d} fragments", highlight=False)
    console.print(f"[green]wrote[/] {result.out} (latent store with a split column"
                  f"{'; datasets export in ' + str(result.out / 'hf') if hf else ''})", highlight=False)


def run_evaluate(model: Path, store: Path, out: Path, options) -> list[dict]:
    """Run the evaluation with a progress bar and print the Table-1 layout."""
    from pipelines.evaluate import DISTRIBUTION_METRICS, evaluate

    with _progress("evaluating", "fragments") as update:
        result = evaluate(model, store, out, options, progress=lambda d, t, note: update(d, t, f"{note}: "))
    table = Table(title=f"N = {result.fragments} {options.split} fragments x {options.n_samples} sample(s); FID (Inception), "
                        "precision/recall/F (DINOv2)")
    table.add_column("condition")
    table.add_column("generated")
    for name in DISTRIBUTION_METRICS + ("psnr", "ssim"):
        table.add_column(name, justify="right")
    for r in result.rows:
        table.add_row(r["condition"], r["modality"], *[("" if r[k] != r[k] else f"{r[k]:.3g}")
                                                       for k in DISTRIBUTION_METRICS + ("psnr", "ssim")])
    console.print(table)
    console.print(f"[green]wrote[/] {', '.join(f.name for f in result.files if f.parent == result.out)} and plots/ -> {result.out}",
                  highlight=False)
    return result.rows


@app.command()
@_user_errors
def evaluate(
    model: Annotated[Path, typer.Option(help="A trained or converted model folder.")],
    store: Annotated[Path, typer.Option(help="Latent store with the real fragments.")],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.csv, table1.md, metrics.json, plots/.")],
    conditions: Annotated[str, typer.Option(help="Condition sets, comma-separated; 'none' = unconditional; "
                                                 "join modalities with '+' (S2L1C+S2L2A).")] = "none,DEM,S1RTC,S2L1C,S2L2A",
    generate: Annotated[Optional[str], typer.Option(help="Modalities to generate and score, comma-separated "
                                                         "(default: every modality not in the condition).")] = None,
    split: Annotated[str, typer.Option(help="Cells to evaluate on: test (held out in training), train or all.")] = "test",
    n_samples: Annotated[int, typer.Option(min=1, help="Samples per fragment (best-of-n PSNR and spread use them all).")] = 1,
    steps: Annotated[int, typer.Option(min=1, help="DPM-Solver++ steps.")] = 50,
    seed: Annotated[int, typer.Option(min=0, help="Seed; each fragment's noise derives from (seed, cell, fragment).")] = 0,
    k: Annotated[int, typer.Option(min=1, help="Nearest neighbours for precision/recall manifolds.")] = 3,
    max_fragments: Annotated[Optional[int], typer.Option(min=1, help="Evaluate at most this many fragments.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Fragments per sampling/feature batch.")] = 32,
    fid_extractor: Annotated[str, typer.Option(help="Inception state-dict file, or pt_inception-2015-12-05 (download).")] = "pt_inception-2015-12-05",
    pr_extractor: Annotated[str, typer.Option(help="DINOv2 folder or hub id.")] = "facebook/dinov2-small",
    codec: Annotated[Optional[str], typer.Option(help="Codec name (default: the store's).")] = None,
    codec_source: Annotated[Optional[str], typer.Option(help="Codec folder/hub id/file (default: STORE/codec).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache (default: STORE/cache/eval).")] = None,
    exclude_cells: Annotated[Optional[Path], typer.Option(
        help="Cells never to evaluate on: a text file of ids or a parquet with a grid_cell column (e.g. the official "
             "train_metadata.parquet of the published weights).")] = None,
    real_source: Annotated[Optional[str], typer.Option(
        help="Compare with the real thumbnails read from these Major TOM shards (as the paper), not the codec's "
             "reconstruction.")] = None,
    device: DeviceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Evaluate a model the COP-GEN-Beta way: FID, precision, recall, F-score per condition
    and generated modality (Table 1), plus PSNR/SSIM/MAE against the paired real fragment."""
    from majortom_gen.modalities import parse_modalities
    from pipelines.evaluate import EvalOptions, parse_conditions

    options = EvalOptions(conditions=parse_conditions(conditions), generate=parse_modalities(generate) if generate else None,
                          split=split, n_samples=n_samples, steps=steps,
                          seed=seed, k=k, max_fragments=max_fragments, batch_size=batch_size,
                          fid_extractor=fid_extractor, pr_extractor=pr_extractor, codec=codec, codec_source=codec_source,
                          cache_dir=str(cache_dir) if cache_dir else None, device=device,
                          exclude_cells=tuple(_cells_file(exclude_cells, "--exclude-cells")) if exclude_cells else (),
                          real_source=real_source, overwrite=overwrite)
    try:
        run_evaluate(model, store, out, options)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None


@app.command("convert-weights")
@_user_errors
def convert_weights(
    out: Annotated[Path, typer.Option(help="Folder for the converted model (save_pretrained).")],
    checkpoint: Annotated[str, typer.Option(help="nnet_ema_114000.pth path, or hub 'repo[:file]'.")] = "mespinosami/COP-GEN-Beta:nnet_ema_114000.pth",
    config: Annotated[str, typer.Option(help="Network config the checkpoint was trained with.")] = "release",
    training_cells: Annotated[Optional[Path], typer.Option(
        help="The cells the weights were trained on: the official train_metadata.parquet (grid_cell column) or a "
             "text file of ids; recorded so that evaluate leaves them out.")] = None,
) -> None:
    """Convert the published COP-GEN-Beta weights into this project's network. The folder
    records the codec they need (sd-vae, scale 0.18215) and, with --training-cells, the cells
    they were trained on."""
    from pipelines.weights import convert_published

    cells = _cells_file(training_cells, "--training-cells") if training_cells else None
    try:
        net = convert_published(checkpoint, out, config, training_cells=cells,
                                command=_command_line("convert-weights", out=out, checkpoint=checkpoint, config=config,
                                                      training_cells=training_cells))
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None
    n = sum(p.numel() for p in net.parameters())
    console.print(f"[green]converted[/] {n / 1e6:.1f} M parameters, modalities {net.modalities} -> {out}", highlight=False)
    if cells is None:
        console.print("[yellow]training cells unknown[/]: the published split cannot be recomputed (see the README, "
                      "real data); pass --training-cells train_metadata.parquet, or --exclude-cells to evaluate",
                      highlight=False)


# ----------------------------------------------------------------------------- demo
DEMO_REGION = "POLYGON ((7.45 44.97, 7.92 44.95, 7.95 45.22, 7.62 45.27, 7.42 45.15, 7.45 44.97))"  # Turin and its hills


DEMO_TEST_FRACTION = 0.125  # 2 of 16 cells held out: the region to fill and the evaluation set
DEMO_CONDITIONS = "none,S2L2A,S2L1C+S2L2A"  # what S2 buys for the withheld DEM and S1RTC
DEMO_GENERATE = "DEM,S1RTC"
DEMO_CONFIG = "small"  # the network of the shipped demo model
DEMO_FINE_TUNE_STEPS = 30


@app.command()
@_user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("demo-out"),
    cells: Annotated[int, typer.Option(min=4, max=21, help="How many grid cells of the demo region to use (it has 21).")] = 16,
    steps: Annotated[int, typer.Option(min=0, help="Fine-tuning steps of the shipped demo model on the demo's training "
                                                   "cells (0: use it as shipped).")] = DEMO_FINE_TUNE_STEPS,
    seed: Annotated[int, typer.Option(min=0, help="Seed for the synthetic world and the sampling.")] = 0,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes (default: all cores).")] = 0,
    device: DeviceOption = None,
) -> None:
    """The main job on an embedded default, offline: a synthetic Major TOM world around
    Turin in the Core format, inspected, ingested on a local Dask cluster into a latent store
    (the shipped learned codec), the shipped demo model fine-tuned briefly on it, a region
    polygon over held-out cells filled with DEM + S1RTC generated from S2 (COGs, mosaics,
    quick-looks), and the Table-1 evaluation of the model on those cells."""
    import geopandas as gpd
    from shapely.ops import unary_union

    from majortom_gen.georef import default_grid
    from majortom_gen.regions import read_region
    from majortom_gen.selection import Filters
    from majortom_gen.store import split_cells
    from pipelines.evaluate import EvalOptions, offline_extractors, parse_conditions
    from pipelines.ingest import IngestOptions
    from pipelines.region import generate_region
    from pipelines.train import SHIPPED_DEMO_MODEL

    grid = default_grid()
    ids = grid.cells_in(read_region(DEMO_REGION))[:cells]
    if len(ids) < 4:
        raise MajorTomGenError(f"--cells must be >= 4 (some are held out to fill and evaluate), got {cells}")
    n_workers = workers or (os.cpu_count() or 1)
    start = time.perf_counter()
    world, store, run = out / "world", out / "store", out / "train"
    region_out, eval_out = out / "region", out / "evaluation"
    _reset_if_other_demo(out, {"seed": seed, "cells": ids, "steps": steps})
    _adopt_demo_outputs(region_out, eval_out)
    console.rule("[bold]1. synthetic Major TOM world")
    console.print(f"{len(ids)} cells around Turin, seed {seed} -> {world}")
    run_synth(ids, world, seed=seed, workers=n_workers, products_per_shard=500,
              quirks=(), modalities=("DEM", "S1RTC", "S2L1C", "S2L2A"))
    console.rule("[bold]2. inspect it")
    print_inspection(world, out / "world-preview.png")
    console.rule("[bold]3. ingest into a latent store (local Dask cluster, the shipped small-vae codec)")
    run_ingest(str(world), ids, store, IngestOptions(workers=n_workers, device=device or "auto"),
               modalities=("DEM", "S1RTC", "S2L1C", "S2L2A"), filters=Filters(), rule="least-cloudy")
    store_info(store)
    train_cells, test_cells = split_cells(ids, DEMO_TEST_FRACTION, 0)
    console.rule(f"[bold]4. fine-tune the shipped demo model ({steps} steps) on {len(train_cells)} cells; "
                 f"{len(test_cells)} held out")
    made = json.loads((SHIPPED_DEMO_MODEL / "training_data.json").read_text())
    console.print(Text(f"Starting from the demo model shipped with the package ({SHIPPED_DEMO_MODEL}): made by "
                       f"`{made['command']}` on {len(made['train_cells'])} cells of the synthetic world that are not "
                       f"the demo's ({made['steps']} steps on {made['hardware']['cpu_count']} CPU cores). A few CPU "
                       "minutes cannot teach a diffusion model the cross-modal mapping from scratch; the demo adapts "
                       "the shipped model to its own cells for a few steps.", style="yellow"), soft_wrap=True)
    run_train(DEMO_CONFIG, store, run, max_steps=steps, resume=(run / "checkpoints").exists(),
              test_fraction=DEMO_TEST_FRACTION, device=device, init_from=SHIPPED_DEMO_MODEL,
              command=f"majortom-gen train --config {DEMO_CONFIG} --store {store} --out {run} --max-steps {steps} "
                      f"--test-fraction {DEMO_TEST_FRACTION} --init-from {SHIPPED_DEMO_MODEL}")
    console.rule("[bold]5. fill a region: DEM and S1RTC withheld, generated from S2L1C + S2L2A")
    polygon = unary_union([grid.footprint(c) for c in test_cells]).buffer(-0.01)  # inside the held-out cells
    region_file = out / "region.geojson"
    gpd.GeoDataFrame({"name": ["demo region"]}, geometry=[polygon], crs="EPSG:4326").to_file(region_file, driver="GeoJSON")
    console.print(f"region: {len(test_cells)} held-out cells {', '.join(test_cells)} (the model never saw them); "
                  "the store keeps their real DEM/S1RTC for comparison, the model is not given them", soft_wrap=True)
    region = generate_region(run / "model", store, region_out, generate=("DEM", "S1RTC"), region=polygon,
                             condition=("S2L1C", "S2L2A"), n_samples=2, steps=25, seed=seed, device=device,
                             overwrite=True)  # the demo's own folder, rerun
    tifs = [f for f in region.files if f.suffix in (".tif", ".vrt")]
    console.print(f"{len(tifs)} GeoTIFFs/VRTs -> {region_out}/geotiff: <cell>/<modality>/f<fragment>_s<sample>.tif "
                  "(fragment COGs), mosaic/<modality>_s<k>_EPSG4326.tif (blended, clipped to the polygon), "
                  "mosaic/*.vrt (per UTM zone), mosaic/<modality>_mean|std_EPSG4326.tif (over samples); "
                  f"quick-looks {region_out}/samples/all/<cell>.png", soft_wrap=True)
    console.print("  each quick-look shows the cell as a whole (its 4 x 4 fragments in place): a row of the "
                  "conditions (S2L1C, S2L2A), then per generated modality: real | sample 1 | sample 2 | mean | "
                  "per-pixel std", soft_wrap=True)
    console.rule("[bold]6. evaluate (Table-1 layout) on the held-out cells")
    extractors = offline_extractors(out / "extractors", seed=seed)
    console.print(Text("  offline, the feature extractors are randomly initialised (the FID Inception-v3 "
                       "architecture and a small DINOv2), saved locally: the numbers rank runs of this demo only "
                       "and are not comparable with published FID/precision/recall (use the default extractors, "
                       "downloaded once, for that). The demo model is small and CPU-trained (2,000 steps): "
                       "its samples get each modality's colours and brightness, and use S2 a little for DEM, but stay "
                       "rough and blocky; compare the rows 'none' and 'S2L2A' of table1.md (mae_change) to see what "
                       "conditioning buys. Sharp, faithful samples need tens of thousands of steps on a GPU, or the "
                       "published weights.", style="yellow"), soft_wrap=True)
    options = EvalOptions(conditions=parse_conditions(DEMO_CONDITIONS), generate=tuple(DEMO_GENERATE.split(",")), steps=25, seed=seed, batch_size=48,
                          fid_extractor=str(extractors["inception"]), pr_extractor=str(extractors["dinov2"]),
                          device=device, overwrite=True)
    run_evaluate(run / "model", store, eval_out, options)
    console.rule("[bold]done")
    listing = _write_file_list(out)
    console.print(f"wall time {time.perf_counter() - start:.1f} s; every file written is listed in {listing}:",
                  highlight=False)
    for folder, (n, size) in _folder_sizes(out).items():
        console.print(f"  {folder + '/':24s} {n:5d} files {size / 2**20:8.1f} MiB", highlight=False)
    console.print(f"Look at: {out}/world-preview.png, {run}/loss.png, {region_out}/samples/all/*.png, "
                  f"{region_out}/geotiff/index.md, {eval_out}/table1.md, {eval_out}/plots/", soft_wrap=True, highlight=False)
    console.print(f"QGIS: Layer > Add Layer > Add Raster Layer, pick {region_out}/geotiff/mosaic/DEM_mean_EPSG4326.tif "
                  "(or any .tif/.vrt; or drag them in). Fragment COGs carry their cell's UTM CRS and land over their "
                  "grid cell; mosaics are in EPSG:4326, clipped to the region. Values are 8-bit visualisations "
                  "(hillshade, false colour), not elevation or backscatter.", soft_wrap=True, highlight=False)
    console.print("Repeat the steps by hand:")
    dev = f" --device {device}" if device else ""
    for line in (f"majortom-gen synth --cells {','.join(ids)} --out {world} --seed {seed}",
                 f"majortom-gen inspect {world} --preview {out / 'world-preview.png'}",
                 f"majortom-gen ingest --source {world} --cells {','.join(ids)} --store {store}",
                 f"majortom-gen store info {store}",
                 f"majortom-gen train --config {DEMO_CONFIG} --store {store} --out {run} --max-steps {steps} "
                 f"--test-fraction {DEMO_TEST_FRACTION} --init-from {SHIPPED_DEMO_MODEL}{dev}",
                 f"majortom-gen generate --model {run / 'model'} --store {store} --region {region_file} "
                 f"--condition S2L1C,S2L2A --generate DEM,S1RTC --n-samples 2 --steps 25 --seed {seed} --out {region_out} "
                 f"--overwrite{dev}",
                 f"majortom-gen evaluate --model {run / 'model'} --store {store} --out {eval_out} --conditions "
                 f"{DEMO_CONDITIONS} --generate {DEMO_GENERATE} --steps 25 --fid-extractor {extractors['inception']} --pr-extractor "
                 f"{extractors['dinov2']} --overwrite{dev}"):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    console.print("On real data: --source hf://datasets/Major-TOM (or a local mirror), --codec sd-vae --codec-source "
                  "<VAE>, `majortom-gen convert-weights` for the published COP-GEN-Beta model, and the default "
                  "extractors for evaluation (GPU advised). See the README.", soft_wrap=True)


def _folder_sizes(out: Path) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    for f in sorted(out.rglob("*")):
        if f.is_file():
            top = f.relative_to(out).parts[0] if len(f.relative_to(out).parts) > 1 else "."
            n, size = sizes.get(top, (0, 0))
            sizes[top] = (n + 1, size + f.stat().st_size)
    return sizes


def _write_file_list(out: Path) -> Path:
    """``FILES.md``: every file under the demo folder with its size."""
    path = out / "FILES.md"
    lines = ["# Files written by `majortom-gen demo`", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {f.relative_to(out).as_posix()} | {f.stat().st_size} |"
              for f in sorted(out.rglob("*")) if f.is_file() and f != path]
    path.write_text("\n".join(lines) + "\n")
    return path


def _reset_if_other_demo(out: Path, params: dict) -> None:
    """A demo folder is resumable for the same parameters; other parameters start afresh
    (a store must not mix latents of two worlds, nor a run resume on other cells: its
    held-out cells would differ)."""
    import json
    import shutil

    record = out / "demo.json"
    if record.exists() and json.loads(record.read_text()) != params:
        for name in ("world", "store", "train", "region", "evaluation"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(params))


def _adopt_demo_outputs(*folders: Path) -> None:
    """Folders of the demo's own output (``demo.json`` beside them) written by a version
    before output markers get one, so that the demo can replace them on a re-run."""
    from majortom_gen.staging import MARKER

    for folder in folders:
        if folder.is_dir() and not (folder / MARKER).exists() and (folder.parent / "demo.json").exists():
            (folder / MARKER).write_text(json.dumps({"made_by": "majortom-gen", "kind": "demo"}) + "\n")


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
