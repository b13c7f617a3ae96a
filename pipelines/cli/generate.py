"""Commands that generate: sample, chain, export, fill a region."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from majortom_gen.errors import MajorTomGenError
from majortom_gen.gaps import RESAMPLE_DEFAULT, STRENGTH_DEFAULT
from pipelines.cli.common import (
    CellsOption,
    CodecSourceOption,
    DeviceOption,
    GuidanceOption,
    OverwriteOption,
    ReflectanceOption,
    RegionOption,
    SeamlessOption,
    WorkersOption,
    app,
    cells_from_options,
    console,
    err_console,
    progress_bar,
    user_errors,
)
from pipelines.guidance import GUIDANCE_DEFAULT


@app.command(context_settings={"allow_extra_args": True})
@user_errors
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
    guidance: GuidanceOption = GUIDANCE_DEFAULT,
    seed: Annotated[int, typer.Option(min=0, help="Seed; each fragment's noise derives from (seed, cell, fragment).")] = 0,
    deterministic_conditions: Annotated[bool, typer.Option(help="Use the conditions' latent means, not samples.")] = False,
    device: DeviceOption = None,
    workers: WorkersOption = None,
    seamless: SeamlessOption = True,
    codec_source: CodecSourceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Generate any subset of modalities from any other subset, for fragments of a store. On a
    native store (``ingest --family native``): band groups and location/date tokens, written
    as GeoTIFFs in physical units per cell (OUT/<cell>/<group>_s<k>.tif)."""
    from majortom_gen.modalities import parse_modalities
    from majortom_gen.store import LatentStore
    from pipelines.sample import SamplingOptions, sample_store

    ids = cells_from_options((cells or []) + list(ctx.args), region)
    if LatentStore.open(store).native:
        _sample_native(model, store, out, ids, condition, generate, n_samples, steps, guidance, seed, device, overwrite)
        return
    cond = () if condition.strip().lower() in ("", "none") else parse_modalities(condition)
    options = SamplingOptions(n_samples=n_samples, steps=steps, guidance=guidance, seed=seed, deterministic_conditions=deterministic_conditions,
                              device=device, workers=workers, codec_source=codec_source, seamless=seamless)
    try:
        with progress_bar("sampling", "fragments") as update:
            result = sample_store(model, store, ids, cond, parse_modalities(generate), out, options, progress=update,
                                  overwrite=overwrite)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None
    console.print(f"[green]sampled[/] {result.fragments} fragments x {n_samples} -> {result.out} "
                  f"({len(result.files)} files)", highlight=False)


def _sample_native(model: Path, store: Path, out: Path, ids: list[str], condition: str, generate: str, n_samples: int,
                   steps: int, guidance: float, seed: int, device: str | None, overwrite: bool) -> None:
    """``sample`` on a native store: every patch of the cells, physical-unit GeoTIFFs per cell."""
    from majortom_gen.native import parse_band_groups
    from majortom_gen.staging import staged_folder
    from pipelines.native_sample import NativeSampling, sample_native

    options = NativeSampling(steps=steps, seed=seed, n_samples=n_samples, guidance=guidance, device=device or "cpu")
    with staged_folder(out, overwrite=overwrite, inputs=(store, model), kind="sample") as tmp:
        result = sample_native(model, store, ids, parse_band_groups(condition), parse_band_groups(generate), tmp, options)
    console.print(f"[green]sampled[/] {len(ids)} cells x 36 patches x {n_samples} -> {out} "
                  f"({len(result.files)} GeoTIFFs in physical units)", highlight=False)


@app.command(context_settings={"allow_extra_args": True})
@user_errors
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
    from pipelines.sample import SamplingOptions, chain_store

    ids = cells_from_options((cells or []) + list(ctx.args), region)
    options = SamplingOptions(steps=steps, seed=seed, device=device, codec_source=codec_source)
    try:
        result = chain_store(model, store, ids, parse_modalities(a), parse_modalities(b), n, out, options, overwrite=overwrite)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None
    console.print(f"[green]chained[/] {result.fragments} fragments x {n} generations -> {result.out}", highlight=False)


@app.command()
@user_errors
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
@user_errors
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
    guidance: GuidanceOption = GUIDANCE_DEFAULT,
    seed: Annotated[int, typer.Option(min=0, help="Seed; fragment noise derives from (seed, cell, fragment).")] = 0,
    crs: Annotated[str, typer.Option(help="CRS of the mosaic COGs.")] = "EPSG:4326",
    reflectance: ReflectanceOption = False,
    device: DeviceOption = None,
    workers: WorkersOption = None,
    seamless: SeamlessOption = True,
    join_cells: Annotated[bool, typer.Option(
        "--join-cells/--independent-cells",
        help="Generate neighbouring cells in waves, each given what its generated neighbours put where their products "
             "overlap, so they agree there (the default); --independent-cells: every cell on its own, the same "
             "whatever else is requested.")] = True,
    codec_source: CodecSourceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Fill a region: generate the missing modalities for the cells covering a polygon and
    export them as GeoTIFFs and mosaics."""
    from majortom_gen.georef import normalise_crs
    from majortom_gen.modalities import parse_modalities
    from majortom_gen.regions import read_region
    from majortom_gen.selection import parse_cell_list
    from pipelines.region import RegionRequest, generate_region
    from pipelines.sample import SamplingOptions

    geom = read_region(region) if region else None
    ids = parse_cell_list((cells or []) + list(ctx.args))
    if geom is None and not ids:
        raise MajorTomGenError("give --region FILE|WKT|bbox or --cells IDS")
    from majortom_gen.store import LatentStore

    if LatentStore.open(store).native:
        from majortom_gen.native import parse_band_groups
        from pipelines.native_region import generate_native_region
        from pipelines.native_sample import NativeSampling

        record = generate_native_region(
            model, store, out, generate=parse_band_groups(generate), region=geom, cells=ids,
            condition="auto" if condition.strip().lower() == "auto" else parse_band_groups(condition),
            dst_crs=normalise_crs(crs, item="--crs"), overwrite=overwrite,
            options=NativeSampling(steps=steps, seed=seed, n_samples=n_samples, guidance=guidance, device=device or "cpu"))
        console.print(f"[green]generated[/] {', '.join(record['generate'])} for {len(record['cells'])} cells from "
                      f"{', '.join(record['condition']) or 'nothing'} -> {out} ({len(record['files']['mosaic'])} mosaics "
                      "in physical units)", highlight=False)
        return
    request = RegionRequest(generate=parse_modalities(generate), region=geom, cells=tuple(ids),
                            condition="auto" if condition.strip().lower() == "auto" else parse_modalities(condition),
                            source=source, dst_crs=normalise_crs(crs, item="--crs"), reflectance=reflectance,
                            join_cells=join_cells)
    options = SamplingOptions(n_samples=n_samples, steps=steps, guidance=guidance, seed=seed, device=device, workers=workers,
                              codec_source=codec_source, seamless=seamless)
    try:
        with progress_bar("sampling", "fragments") as update:
            result = generate_region(model, store, out, request, options, progress=update, overwrite=overwrite)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None
    for name, group in result.groups.items():
        console.print(f"conditioned on {name}: {len(group)} cell(s)", highlight=False)
    if result.skipped:
        from majortom_gen.selection import summarise_cells

        err_console.print(Text(f"skipped {summarise_cells(result.skipped)} (all listed in {result.out / 'region.json'})",
                               style="yellow"), soft_wrap=True)
    console.print(f"[green]wrote[/] {len(result.files)} files -> {result.out}/geotiff (mosaics in geotiff/mosaic)", highlight=False)




@app.command(context_settings={"allow_extra_args": True})
@user_errors
def fill(
    ctx: typer.Context,
    store: Annotated[Path, typer.Option(help="Latent store holding the products with gaps (and the conditions).")],
    model: Annotated[Path, typer.Option(help="A trained or converted model folder.")],
    source: Annotated[str, typer.Option(help="The Major TOM source the store was ingested from (the observed pixels).")],
    out: Annotated[Path, typer.Option(help="Output folder: filled fragment COGs, gap masks, quick-looks, fill.json.")],
    modality: Annotated[str, typer.Option(help="The modality whose gaps to fill (e.g. S2L2A).")],
    mask: Annotated[str, typer.Option(
        help="The gaps: cloud_mask (the S2 product's clouds and shadows), nodata (black thumbnail pixels), or a "
             "raster (non-zero = gap) or vector file (polygons) in any CRS.")] = "cloud_mask",
    condition: Annotated[str, typer.Option(help="Modalities to condition on, comma-separated, or 'none'.")] = "none",
    cells: CellsOption = None,
    region: RegionOption = None,
    n_samples: Annotated[int, typer.Option(min=1, help="Fills per gap (> 1 adds their mean).")] = 1,
    steps: Annotated[int, typer.Option(min=1, help="DPM-Solver++ steps.")] = 50,
    guidance: GuidanceOption = GUIDANCE_DEFAULT,
    seed: Annotated[int, typer.Option(min=0, help="Seed; noise derives from (seed, cell, fragment).")] = 0,
    halo: Annotated[int, typer.Option(min=0, help="Latent pixels (8 px each) around a gap generated too.")] = 1,
    resample: Annotated[int, typer.Option(
        min=0, help="RePaint jumps back per noisy solver step, so the fill agrees with what surrounds it (2: about twice "
                    "the time); 0: none.")] = RESAMPLE_DEFAULT,
    strength: Annotated[float, typer.Option(
        min=0.01, max=1.0,
        help="How much of the solver the gaps go through: 1 starts them from pure noise; lower starts them from a smooth "
             "interpolation of their surroundings noised to that share of the steps (SDEdit, as diffusers' inpainting "
             "strength): closer to the surroundings' tones, less new detail, fewer steps.")] = STRENGTH_DEFAULT,
    device: DeviceOption = None,
    workers: WorkersOption = None,
    seamless: SeamlessOption = True,
    codec_source: CodecSourceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Fill gaps (clouds, shadows, nodata, a mask of your own) in one modality of stored
    products: the known pixels stay exactly as they are, the gaps are generated around them
    and from the other modalities."""
    from majortom_gen.modalities import parse_modalities
    from pipelines.fill import FillRequest, fill_store
    from pipelines.sample import SamplingOptions

    ids = cells_from_options((cells or []) + list(ctx.args), region)
    targets = parse_modalities(modality)
    if len(targets) != 1:
        raise MajorTomGenError(f"--modality takes one modality, got {modality!r}")
    target = targets[0]
    cond = () if condition.strip().lower() in ("", "none") else tuple(parse_modalities(condition))
    request = FillRequest(target, mask, cond, halo)
    options = SamplingOptions(n_samples=n_samples, steps=steps, guidance=guidance, seed=seed, device=device, workers=workers,
                              codec_source=codec_source, seamless=seamless, resample=resample,
                              strength=strength)
    try:
        with progress_bar("filling", "fragments") as update:
            result = fill_store(model, store, source, ids, request, out, options, progress=update, overwrite=overwrite)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None
    if result.skipped:
        from majortom_gen.selection import summarise_cells

        err_console.print(Text(f"skipped {summarise_cells(result.skipped)} (listed in {result.out / 'fill.json'})",
                               style="yellow"), soft_wrap=True)
    console.print(f"[green]filled[/] {len(result.cells)} cell(s) -> {result.out} (quick-looks in {result.out / 'quicklook'})",
                  highlight=False)
