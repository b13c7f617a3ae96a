"""Commands that build and look after latent stores: ingest, store info/check, the codec,
training sets."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from majortom_gen.errors import MajorTomGenError
from pipelines.cli.common import (
    EXIT_COMPLETED_WITH_ERRORS,
    CellsOption,
    OverwriteOption,
    RegionOption,
    app,
    cells_from_options,
    codec_app,
    command_line,
    console,
    dataset_app,
    err_console,
    progress_bar,
    store_app,
    user_errors,
)


def run_ingest(source: str, ids: list[str], store: Path, options, *, modalities: tuple[str, ...], filters, rule: str,
               groups: tuple[str, ...] | None = None):
    """The thumbnail ingest, or with ``groups`` the native family's (COP-GEN band groups)."""
    from pipelines.ingest import ingest
    from pipelines.ingest_native import ingest_native

    with progress_bar("ingesting cells", "cells") as update:
        if groups is not None:
            report = ingest_native(source, ids, store, options, groups=groups, filters=filters, rule=rule, progress=update)
        else:
            report = ingest(source, ids, store, options, modalities=modalities, filters=filters, rule=rule,
                            progress=update)
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
@user_errors
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
    family: Annotated[str, typer.Option(
        help="thumbnails (COP-GEN-Beta: 4x4 fragments of the thumbnails) or native (COP-GEN: band groups at their "
             "native resolution, 6x6 patches; --codec patch-pca or cop-gen-vae).")] = "thumbnails",
    groups: Annotated[Optional[str], typer.Option(
        help="native: comma-separated band groups (default: DEM_DEM, S1RTC_vh_vv and the three S2L2A groups).")] = None,
) -> None:
    """Ingest Major TOM shards into a grid-indexed latent store (Dask): thumbnail fragments,
    or (``--family native``) COP-GEN band groups in their official normalisation."""
    from majortom_gen.modalities import parse_modalities
    from majortom_gen.selection import Filters
    from pipelines.ingest import IngestOptions

    ids = cells_from_options((cells or []) + list(ctx.args), region)
    options = IngestOptions(codec=codec, codec_source=codec_source, fragment_mode=fragments, cells_per_shard=cells_per_shard,
                            scheduler=scheduler, workers=workers or None, threads=threads, device=device, precision=precision)
    filters = Filters(start, end, max_cloud_cover, max_nodata)
    if family not in ("thumbnails", "native"):
        raise MajorTomGenError(f"--family must be thumbnails or native, got {family!r}")
    if family == "thumbnails" and groups:
        raise MajorTomGenError("--groups goes with --family native")
    chosen = None
    if family == "native":
        from majortom_gen.native import parse_band_groups
        from pipelines.ingest_native import DEFAULT_GROUPS

        chosen = tuple(parse_band_groups(groups)) if groups else DEFAULT_GROUPS
        if codec == "small-vae" and not codec_source:  # the thumbnail default; natively: patch-pca fitted on the data
            options = replace(options, codec="patch-pca")
    report = run_ingest(source, ids, store, options, modalities=parse_modalities(modalities), filters=filters, rule=rule,
                        groups=chosen)
    if report.completed_with_errors:
        err_console.print(Text("completed with errors", style="bold yellow"))
        raise typer.Exit(EXIT_COMPLETED_WITH_ERRORS)




@codec_app.command("train")
@user_errors
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
    family: Annotated[str, typer.Option(help="thumbnails, or native: one band group's codec (--group) into "
                                             "OUT/<group>/, for ingest --family native --codec small-vae "
                                             "--codec-source OUT.")] = "thumbnails",
    group: Annotated[Optional[str], typer.Option(help="native: the band group, e.g. DEM_DEM.")] = None,
) -> None:
    """Train the small-vae codec (a small kl-f8 AutoencoderKL, 4 x 32 x 32 latents) on the
    thumbnail fragments of every modality of the given cells, with one latent normalisation
    per modality. The shipped codec was made this way (see its codec.json). With --family
    native: the same architecture with 8 latent channels for one band group, on its patches
    in the official normalisation."""
    from pipelines.codec import CodecTrainConfig, train_codec

    ids = cells_from_options(cells, region)
    config = CodecTrainConfig(steps=steps, batch_size=batch_size, crop=crop, lr=lr, seed=seed)
    if family not in ("thumbnails", "native") or (family == "native") != bool(group):
        raise MajorTomGenError("--family native goes with --group G (a band group); --family thumbnails without")
    if family == "native":
        from pipelines.native_codec import train_native_codec

        command = command_line("codec train", source=source, cells=cells, region=region, out=out, steps=steps,
                               batch_size=batch_size, crop=crop, lr=lr, seed=seed, family=family, group=group)
        with progress_bar("training codec", "steps") as update:
            result = train_native_codec(source, ids, group, out, config=config, command=command, overwrite=overwrite,
                                        progress=lambda s, t, loss: update(s, t, note=f"loss {loss:.4f}, "))
        console.print(f"[green]codec[/] -> {result.folder} ({result.seconds:.0f} s, {result.patches} patches); "
                      f"reconstruction error on them {result.mae:.3f} {result.unit}", highlight=False)
        return
    with progress_bar("training codec", "steps") as update:
        def tick(step: int, total: int, loss: float) -> None:
            update(step, total, note=f"loss {loss:.4f}, ")

        try:
            command = command_line("codec train", source=source, cells=cells, region=region, out=out, steps=steps,
                                    batch_size=batch_size, crop=crop, lr=lr, seed=seed)
            result = train_codec(source, ids, out, config=config, command=command, progress=tick, overwrite=overwrite)
        except ValueError as exc:
            raise MajorTomGenError(str(exc)) from None
    console.print(f"[green]codec[/] -> {result.folder} ({result.seconds:.0f} s); fragments per modality "
                  f"{result.fragments}; reconstruction PSNR on them (dB): {result.psnr_db}", highlight=False)


@codec_app.command("tune-decoder")
@user_errors
def codec_tune_decoder(
    source: Annotated[str, typer.Option(help="Major TOM root (local folder or URL) with the Core datasets.")],
    out: Annotated[Path, typer.Option(help="Codec folder to write (the codec with its tuned decoder).")],
    codec: Annotated[str, typer.Option(help="The small-vae codec folder to start from, or 'small-vae' (shipped).")] = "small-vae",
    cells: CellsOption = None,
    region: RegionOption = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 600,
    latent_noise: Annotated[float, typer.Option(min=0.0, help="Largest latent noise std, in the diffusion "
                                                              "network's units (per-modality normalised latents).")] = 0.3,
    batch_size: Annotated[int, typer.Option(min=1, help="Crops per step.")] = 16,
    crop: Annotated[int, typer.Option(min=8, help="Crop size in pixels (a multiple of 8).")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW, cosine decay).")] = 2e-4,
    seed: Annotated[int, typer.Option(min=0, help="Seed of every random choice (crops, flips, noise).")] = 0,
    psnr_fragments: Annotated[int, typer.Option(min=1, help="Fragments per modality the reconstruction PSNR is "
                                                            "measured on, before and after.")] = 16,
    overwrite: OverwriteOption = False,
) -> None:
    """Fine-tune a small-vae codec's decoder so that it draws generated latents without speckle
    and 8 px blocks: it learns to decode latents with added noise (the residual error a
    diffusion model leaves) to the clean fragments of the given cells. The encoder, and so
    the latents of every store made with the codec, stay the same and the codec's identity
    does not change: a store ingested with the new folder copies it, and a store made with the
    original decodes with it given --codec-source OUT.
    The shipped codec's decoder was made this way (see its codec.json)."""
    from pipelines.codec import DecoderTuneConfig, tune_codec_decoder

    ids = cells_from_options(cells, region)
    config = DecoderTuneConfig(steps=steps, batch_size=batch_size, crop=crop, lr=lr, latent_noise=latent_noise, seed=seed)
    command = command_line("codec tune-decoder", source=source, codec=codec, cells=cells, region=region, out=out,
                           steps=steps, latent_noise=latent_noise, batch_size=batch_size, crop=crop, lr=lr, seed=seed)
    with progress_bar("tuning the decoder", "steps") as update:
        try:
            result = tune_codec_decoder(codec, source, ids, out, config=config, command=command, overwrite=overwrite,
                                        psnr_fragments=psnr_fragments,
                                        progress=lambda s, t, loss: update(s, t, note=f"loss {loss:.4f}, "))
        except ValueError as exc:
            raise MajorTomGenError(str(exc)) from None
    console.print(f"[green]codec[/] -> {result.folder} ({result.seconds:.0f} s); fragments per modality "
                  f"{result.fragments}; reconstruction PSNR on them (dB): {result.psnr_db}", highlight=False)


@codec_app.command("eval")
@user_errors
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
    from pipelines.codec import (
        image_psnr,
        open_codec,
        psnr_by_modality,
        source_fragments,
    )

    if source is None and not images:
        raise MajorTomGenError("give --source with --cells/--region, or --images")
    c = open_codec(codec)
    if source is not None:
        frags = source_fragments(source, cells_from_options(cells, region))
        console.print(f"{c.name} on {source}: " + ", ".join(f"{m} {v:.2f} dB ({len(frags[m])} fragments)"
                                                            for m, v in psnr_by_modality(c, frags).items()), highlight=False)
    for path in images or []:
        console.print(f"{c.name} on {path}: {image_psnr(c, path):.2f} dB", highlight=False)


@store_app.command("info")
@user_errors
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
@user_errors
def store_check(
    store: Annotated[Path, typer.Argument(help="Latent store folder.")],
    repair: Annotated[bool, typer.Option("--repair", help="Move unreadable shards to STORE/quarantine/, rebuild "
                                         "manifest.json from the intact shards and list the cells to ingest again.")] = False,
) -> None:
    """Read every shard: report missing, unreadable, changed and unlisted shards and fragments
    stored twice (exit 3 if any); with --repair, make the store consistent again."""
    from majortom_gen.store_check import check_store

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

    text = json.dumps(config, default=str)
    return text if len(text) < 200 else text[:197] + "..."




@dataset_app.command("build", context_settings={"allow_extra_args": True})
@user_errors
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
    selected = cells_from_options(ids, region) if (ids or region) else None
    result = build_dataset(store, out, cells=selected, modalities=parse_modalities(modalities) if modalities else None,
                           split=split, test_fraction=test_fraction, seed=seed, block=block_size, hf=hf,
                           overwrite=overwrite)
    for s in ("train", "test"):
        console.print(f"{s:5s}: {len(result.cells[s]):5d} cells {result.fragments[s]:7d} fragments", highlight=False)
    console.print(f"[green]wrote[/] {result.out} (latent store with a split column"
                  f"{'; datasets export in ' + str(result.out / 'hf') if hf else ''})", highlight=False)


