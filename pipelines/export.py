"""Export generated fragments as georeferenced Cloud-Optimized GeoTIFFs.

One COG per (cell, fragment, modality, sample), in the cell's UTM CRS with the exact affine
transform of that fragment's window in the 10 m product grid, as the sample run recorded it
(``utm_crs``, ``utm_transform``, ``source_product_ids`` in ``samples.npz``). Values are what
the model makes: 8-bit thumbnails (S2 true colour, S1 false-colour dB composite, DEM
hillshade as one band). Band descriptions and tags say so: a hillshade is never labelled
elevation, nor a false-colour composite backscatter. Mosaics are made from the same
in-memory rasters (:mod:`pipelines.mosaic`); every file goes through
:func:`majortom_gen.rasters.write_cog`.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from majortom_gen.errors import MajorTomGenError
from majortom_gen.rasters import GeoRaster, write_cog
from majortom_gen.staging import check_output, local_paths, staged_folder
from majortom_gen.thumbnails import s2_reflectance_from_thumbnail

BANDS = {
    "S2L2A": ["red: S2 L2A true-colour thumbnail (B04), 8-bit, 1.3*(DN/1e4)**0.6",
              "green: S2 L2A true-colour thumbnail (B03), 8-bit", "blue: S2 L2A true-colour thumbnail (B02), 8-bit"],
    "S2L1C": ["red: S2 L1C true-colour thumbnail (B04), 8-bit, 1.3*(DN/1e4)**0.6",
              "green: S2 L1C true-colour thumbnail (B03), 8-bit", "blue: S2 L1C true-colour thumbnail (B02), 8-bit"],
    "S1RTC": ["red: S1 VV dB, min-max scaled per image (not backscatter)", "green: VV+VH composite (not backscatter)",
              "blue: S1 VH dB, min-max scaled per image (not backscatter)"],
    "DEM": ["hillshade of the DEM (azimuth 315, altitude 45), 8-bit (not elevation)"],
}
CONTENT = {
    "S2L2A": "generated S2 L2A true-colour thumbnail (8-bit visualisation, not reflectance)",
    "S2L1C": "generated S2 L1C true-colour thumbnail (8-bit visualisation, not reflectance)",
    "S1RTC": "generated S1 RTC false-colour composite (8-bit visualisation, not backscatter)",
    "DEM": "generated DEM hillshade (8-bit visualisation, not elevation)",
}


REFLECTANCE_CAVEAT = ("approximate reflectance (0..1) inverted from the generated 8-bit thumbnail with the "
                      "official formula, reflectance = ((v + 0.5) / 255 / 1.3) ** (1 / 0.6); valid below saturation only "
                      "(NaN where the thumbnail is 255, i.e. reflectance above ~0.64); quantisation error up to one 8-bit "
                      "step (about 1% relative); a generated image, not a measurement")
S2_MODALITIES = ("S2L1C", "S2L2A")
GEOREF_KEYS = ("utm_crs", "utm_transform", "source_product_ids")  # per row of samples.npz, see pipelines.sample


@dataclass
class ExportResult:
    out: Path
    files: list[Path]


@dataclass(frozen=True)
class SampleRow:
    """One row of a sample run: which fragment sample it is and where it lies (``crs`` of its
    cell's UTM zone, ``transform`` of its 256 x 256 window of the 10 m grid, metres;
    ``source_product_ids`` a JSON object modality -> product id)."""

    grid_cell: str
    fragment_index: int
    sample: int
    crs: str
    transform: Affine
    source_product_ids: str


def sample_rows(z, samples_dir: Path) -> list[SampleRow]:
    """The rows of an opened ``samples.npz`` with their georeferencing; a run made before
    sample runs carried it is refused with a message saying to re-run ``majortom-gen sample``."""
    missing = [k for k in GEOREF_KEYS if k not in z.files]
    if missing:
        raise MajorTomGenError(f"{samples_dir}: this sample run was made by an older version of majortom-gen "
                               f"(samples.npz has no {', '.join(missing)}, so the fragments' georeferencing is unknown); "
                               "re-run `majortom-gen sample` and export the new run")
    cells, frags, samples = z["grid_cell"].tolist(), z["fragment_index"].tolist(), z["sample"].tolist()
    crs, products = z["utm_crs"].tolist(), z["source_product_ids"].tolist()
    transforms = np.asarray(z["utm_transform"], np.float64)
    if transforms.shape != (len(cells), 6) or len(crs) != len(cells) or len(products) != len(cells):
        raise MajorTomGenError(f"{samples_dir}/samples.npz: the georeferencing arrays do not have one row per fragment "
                               f"sample ({len(cells)} rows, utm_transform {transforms.shape}); re-run `majortom-gen sample`")
    return [SampleRow(str(c), int(f), int(s), str(r), Affine(*t), str(p))
            for c, f, s, r, t, p in zip(cells, frags, samples, crs, transforms, products)]


def fragment_raster(pixels: np.ndarray, modality: str, crs: str, transform: Affine) -> GeoRaster:
    """The raster of one generated fragment: uint8 ``(256, 256, 3)`` thumbnail pixels as
    3 bands (DEM: one band, the mean of the three, i.e. the hillshade), with the band
    descriptions of :data:`BANDS`; ``crs``/``transform`` place its window (UTM, metres)."""
    bands = pixels.mean(axis=-1, keepdims=True).round().astype(np.uint8) if modality == "DEM" else pixels
    return GeoRaster(np.ascontiguousarray(np.moveaxis(bands, -1, 0)), crs, transform, tuple(BANDS[modality]))


def reflectance_raster(pixels: np.ndarray, modality: str, crs: str, transform: Affine) -> GeoRaster:
    """The approximate reflectance (0..1, float32) of a generated S2 thumbnail ``(256, 256, 3)``
    uint8 as bands [B04, B03, B02], NaN (the nodata value) where a band is saturated."""
    if modality not in S2_MODALITIES:
        raise MajorTomGenError(f"reflectance can only be inverted from S2 thumbnails, not {modality}")
    refl = s2_reflectance_from_thumbnail(pixels).astype(np.float32)
    refl[pixels >= 255] = np.nan
    kind = _reflectance_kind(modality)
    descriptions = tuple(f"{band}: approximate {kind} reflectance (0..1) inverted from the generated thumbnail"
                         for band in ("B04", "B03", "B02"))
    return GeoRaster(np.ascontiguousarray(np.moveaxis(refl, -1, 0)), crs, transform, descriptions, nodata=np.nan)


def _reflectance_kind(modality: str) -> str:
    return "surface" if modality == "S2L2A" else "top-of-atmosphere"


def write_fragment_cog(path: Path, raster: GeoRaster, modality: str, tags: dict) -> Path:
    """Write a :func:`fragment_raster` with its CONTENT tag (and ``tags``); 3-band modalities
    are marked RGB."""
    return write_cog(path, raster, {"CONTENT": CONTENT[modality], **tags}, rgb=modality != "DEM")


def write_reflectance_cog(path: Path, raster: GeoRaster, modality: str, tags: dict) -> Path:
    """Write a :func:`reflectance_raster` with its CONTENT and CAVEAT tags (and ``tags``)."""
    content = f"generated {modality} {_reflectance_kind(modality)} reflectance, approximate"
    return write_cog(path, raster, {"CONTENT": content, "CAVEAT": REFLECTANCE_CAVEAT, **tags})


def export_samples(samples_dir: str | os.PathLike, store_dir: str | os.PathLike, out: str | os.PathLike, *,
                   mosaic: bool = True, dst_crs: str = "EPSG:4326", region=None, reflectance: bool = False,
                   codec_source: str | None = None, overwrite: bool = False) -> ExportResult:
    """Decode a ``majortom-gen sample`` run and write one COG per fragment, modality and sample
    (``out/<cell>/<modality>/f<fragment>_s<sample>.tif``, generated modalities only), placed by
    the run's own georeferencing; with ``mosaic``, per modality and sample a VRT per UTM zone
    and a blended COG in ``dst_crs`` clipped to ``region`` (``out/mosaic/``), plus mean/std
    rasters when there are several samples. With ``reflectance``, generated S2 fragments also
    get ``..._reflectance.tif``: approximate reflectance inverted from the thumbnail below
    saturation (see the CAVEAT tag). The store only provides the codec."""
    samples_dir, store_dir, out = Path(samples_dir), Path(store_dir), Path(out)
    check_output(out, overwrite=overwrite, inputs=(samples_dir, store_dir, *local_paths(codec_source)))
    meta = json.loads((samples_dir / "samples.json").read_text())
    z = np.load(samples_dir / "samples.npz")
    rows = sample_rows(z, samples_dir)
    from pipelines.codec import decode_fragments, decode_images, require_store_codec

    codec = require_store_codec(store_dir, codec_source)
    final = out
    with staged_folder(final, overwrite=overwrite, inputs=(samples_dir, store_dir, *local_paths(codec_source)), kind="export") as out:
        files, mosaics, tags = [], [], run_tags(meta)
        for m in meta["generate"]:
            pixels = (decode_fragments(codec, z[f"latent_{m}"], m, [r.grid_cell for r in rows],
                                       [r.fragment_index for r in rows], [r.sample for r in rows])
                      if meta.get("seamless") else decode_images(codec, z[f"latent_{m}"], m))  # decoded as generated
            written, by_sample = write_fragments(out, m, pixels, rows, tags, reflectance=reflectance)
            del pixels
            files += written
            if mosaic:
                mosaics += write_mosaics(m, by_sample, out / "mosaic", meta["n_samples"], tags, dst_crs, region)
        files += mosaics
        files.append(_write_index(out, samples_dir, meta, files))
    return ExportResult(final, [final / f.relative_to(out) for f in files])


def run_tags(meta: dict) -> dict[str, object]:
    """The tags every COG of a sample run carries: model, codec, conditions, seed, steps."""
    return {"model": meta["model"], "codec": meta["codec"], "condition": ",".join(meta["condition"]) or "none",
            "seed": meta["seed"], "steps": meta["steps"]}


def write_fragments(out: Path, modality: str, pixels: np.ndarray, rows: list[SampleRow], tags: dict, *,
                    reflectance: bool = False) -> tuple[list[Path], dict[int, list[tuple[Path, GeoRaster, str]]]]:
    """Write the fragment COGs of one modality, ``pixels`` uint8 ``(len(rows), 256, 256, 3)``
    in the order of ``rows``, to ``out/<cell>/<modality>/f<fragment>_s<sample>.tif`` (and
    ``..._reflectance.tif`` for S2 with ``reflectance``). Returns the files written and, per
    sample, the (path, raster, grid cell) of the thumbnails for the mosaics."""
    files: list[Path] = []
    by_sample: dict[int, list[tuple[Path, GeoRaster, str]]] = defaultdict(list)
    for row, px in zip(rows, pixels, strict=True):
        row_tags = {"grid_cell": row.grid_cell, "fragment_index": row.fragment_index, "sample": row.sample, **tags,
                    "source_product_ids": row.source_product_ids}
        stem = f"f{row.fragment_index:02d}_s{row.sample}"
        raster = fragment_raster(px, modality, row.crs, row.transform)
        path = write_fragment_cog(out / row.grid_cell / modality / f"{stem}.tif", raster, modality, row_tags)
        files.append(path)
        by_sample[row.sample].append((path, raster, row.grid_cell))
        if reflectance and modality in S2_MODALITIES:
            files.append(write_reflectance_cog(out / row.grid_cell / modality / f"{stem}_reflectance.tif",
                                               reflectance_raster(px, modality, row.crs, row.transform), modality, row_tags))
    return files, by_sample


def write_mosaics(modality: str, by_sample: dict[int, list[tuple[Path, GeoRaster, str]]], folder: Path, n_samples: int,
                  tags: dict, dst_crs: str, region) -> list[Path]:
    """Per sample the VRTs (one per UTM zone) and the mosaic COG in ``dst_crs`` (clipped to
    ``region``, EPSG:4326; neighbouring cells cross-faded where their products overlap) of one
    modality's fragments (path, raster, grid cell); with several samples also the per-pixel
    mean and std. Returns the files, VRTs first."""
    from pipelines.mosaic import vrts_per_zone, write_mosaic, write_uncertainty

    crs_tag = dst_crs.replace(":", "")
    vrts, paths, rasters = [], [], []
    for s in range(n_samples):
        fragments = by_sample.get(s, [])
        vrts += vrts_per_zone([(p, r) for p, r, _ in fragments], folder, f"{modality}_s{s}")
        paths.append(folder / f"{modality}_s{s}_{crs_tag}.tif")
        rasters.append(write_mosaic([r for _, r, _ in fragments], paths[-1], dst_crs=dst_crs, region=region,
                                    tags={"CONTENT": CONTENT[modality], **tags}, groups=[c for _, _, c in fragments]))
    if len(rasters) > 1:
        paths += write_uncertainty(rasters, folder / f"{modality}_mean_{crs_tag}.tif", folder / f"{modality}_std_{crs_tag}.tif")
    return vrts + paths


def _write_index(out: Path, samples_dir: Path, meta: dict, files: list[Path]) -> Path:
    """A markdown index of what was written, with the quick-looks of the sample run."""
    lines = ["# Generated GeoTIFFs", "",
             f"Model `{meta['model']}`, codec `{meta['codec']}`, conditions {', '.join(meta['condition']) or 'none'}, "
             f"generated {', '.join(meta['generate'])}, {meta['n_samples']} sample(s), {meta['steps']} steps, seed {meta['seed']}.",
             "", "Values are 8-bit visualisations as the model makes them (S2 true colour, S1 false colour, DEM "
             "hillshade), not reflectance, backscatter or elevation. Open the files in QGIS with "
             "*Layer → Add Raster Layer*; each carries its CRS and transform.", "", "## Mosaics", ""]
    lines += [f"- [{f.name}]({f.relative_to(out)})" for f in files if f.parent.name == "mosaic"] or ["- (none)"]
    lines += ["", "## Fragments by cell", ""]
    cells = sorted({f.parent.parent.name for f in files if f.suffix == ".tif" and f.parent.parent.parent == out})
    for cell in cells:
        n = sum(1 for f in files if f.parent.parent.name == cell and f.parent.parent.parent == out)
        quick = samples_dir / f"{cell}.png"
        look = f" — quick-look: ![{cell}]({os.path.relpath(quick, out)})" if quick.exists() else ""
        lines.append(f"- `{cell}/`: {n} fragment COGs{look}")
    path = out / "index.md"
    path.write_text("\n".join(lines) + "\n")
    return path
