"""Export generated fragments as georeferenced Cloud-Optimized GeoTIFFs.

One COG per (cell, fragment, modality, sample), in the cell's UTM CRS with the exact affine
transform of that fragment's window in the 10 m product grid (from the store). Values are
what the model makes: 8-bit thumbnails (S2 true colour, S1 false-colour dB composite, DEM
hillshade as one band). Band descriptions and tags say so: a hillshade is never labelled
elevation, nor a false-colour composite backscatter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine

from majortom_gen.errors import MajorTomGenError
from majortom_gen.fragments import from_unit_range
from majortom_gen.staging import check_output, local_paths, staged_folder
from majortom_gen.thumbnails import s2_reflectance_from_thumbnail
from majortom_gen.store import LatentStore

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


@dataclass
class ExportResult:
    out: Path
    files: list[Path]


def write_fragment_cog(path: Path, pixels: np.ndarray, modality: str, crs: str, transform: Affine, tags: dict) -> Path:
    """Write uint8 (256, 256, 3) pixels of one modality as a COG (DEM: one hillshade band)."""
    bands = pixels.mean(axis=-1, keepdims=True).round().astype(np.uint8) if modality == "DEM" else pixels
    data = np.moveaxis(bands, -1, 0)  # (bands, rows, cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    profile = dict(driver="COG", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype="uint8",
                   crs=crs, transform=transform, compress="deflate", blocksize=256)
    with rasterio.open(tmp, "w", **profile) as ds:
        ds.write(data)
        for i, desc in enumerate(BANDS[modality], start=1):
            ds.set_band_description(i, desc)
        ds.update_tags(CONTENT=CONTENT[modality], **{k.upper(): str(v) for k, v in tags.items()})
        if modality != "DEM":
            ds.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green, rasterio.enums.ColorInterp.blue]
    os.replace(tmp, path)
    return path


def write_reflectance_cog(path: Path, pixels: np.ndarray, modality: str, crs: str, transform: Affine, tags: dict) -> Path:
    """Write the approximate reflectance of a generated S2 thumbnail ``(256, 256, 3)`` uint8 as
    a float32 COG of bands [B04, B03, B02] (NaN where a band is saturated), with the caveat in
    its tags."""
    if modality not in ("S2L1C", "S2L2A"):
        raise MajorTomGenError(f"reflectance can only be inverted from S2 thumbnails, not {modality}")
    refl = s2_reflectance_from_thumbnail(pixels).astype(np.float32)
    refl[pixels >= 255] = np.nan
    data = np.moveaxis(refl, -1, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    profile = dict(driver="COG", width=data.shape[2], height=data.shape[1], count=3, dtype="float32", nodata=np.nan,
                   crs=crs, transform=transform, compress="deflate", predictor=3, blocksize=256)
    kind = "surface" if modality == "S2L2A" else "top-of-atmosphere"
    with rasterio.open(tmp, "w", **profile) as ds:
        ds.write(data)
        for i, band in enumerate(("B04", "B03", "B02"), start=1):
            ds.set_band_description(i, f"{band}: approximate {kind} reflectance (0..1) inverted from the generated thumbnail")
        ds.update_tags(CONTENT=f"generated {modality} {kind} reflectance, approximate", CAVEAT=REFLECTANCE_CAVEAT,
                       **{k.upper(): str(v) for k, v in tags.items()})
    os.replace(tmp, path)
    return path


def export_samples(samples_dir: str | os.PathLike, store_dir: str | os.PathLike, out: str | os.PathLike, *,
                   mosaic: bool = True, dst_crs: str = "EPSG:4326", region=None, reflectance: bool = False,
                   codec_source: str | None = None, overwrite: bool = False) -> ExportResult:
    """Decode a ``majortom-gen sample`` run and write one COG per fragment, modality and sample
    (``out/<cell>/<modality>/f<fragment>_s<sample>.tif``, generated modalities only); with
    ``mosaic``, per modality and sample a VRT per UTM zone and a blended COG in ``dst_crs``
    clipped to ``region`` (``out/mosaic/``), plus mean/std rasters when there are several
    samples. With ``reflectance``, generated S2 fragments also get ``..._reflectance.tif``:
    approximate reflectance inverted from the thumbnail below saturation (see the CAVEAT tag)."""
    samples_dir, store_dir, out = Path(samples_dir), Path(store_dir), Path(out)
    check_output(out, overwrite=overwrite, inputs=(samples_dir, store_dir, *local_paths(codec_source)))
    meta = json.loads((samples_dir / "samples.json").read_text())
    z = np.load(samples_dir / "samples.npz")
    store = LatentStore.open(store_dir)
    from pipelines.codec import open_store_codec

    codec = open_store_codec(store_dir, codec_source)
    if codec is None:
        raise MajorTomGenError(f"{store_dir}: the store's latents were made by {store.codec['name']}; "
                               "pass --codec-source (the same VAE: hub id, folder or .pth) to decode them")
    cells = sorted(set(z["grid_cell"].tolist()))
    geo = store.lookup(cells=cells).set_index(["grid_cell", "fragment_index"])
    final = out
    with staged_folder(final, overwrite=overwrite, inputs=(samples_dir, store_dir, *local_paths(codec_source)), kind="export") as out:
        files = []
        for m in meta["generate"]:
            latents = torch.from_numpy(z[f"latent_{m}"].astype(np.float32))
            pixels = np.concatenate([from_unit_range(codec.decode_network(latents[i:i + 64], m).numpy())
                                     for i in range(0, len(latents), 64)])
            for i, (cell, frag, s) in enumerate(zip(z["grid_cell"].tolist(), z["fragment_index"].tolist(), z["sample"].tolist())):
                row = geo.loc[(cell, frag)]
                transform = Affine(*row["utm_transform"])
                product_ids = {p.removesuffix("_product_id"): row[p] for p in geo.columns if p.endswith("_product_id") and row[p]}
                tags = {"grid_cell": cell, "fragment_index": frag, "sample": s, "model": meta["model"], "codec": meta["codec"],
                        "condition": ",".join(meta["condition"]) or "none", "seed": meta["seed"], "steps": meta["steps"],
                        "source_product_ids": json.dumps(product_ids)}
                files.append(write_fragment_cog(out / cell / m / f"f{frag:02d}_s{s}.tif", pixels[i], m, row["utm_crs"], transform, tags))
                if reflectance and m in ("S2L1C", "S2L2A"):
                    files.append(write_reflectance_cog(out / cell / m / f"f{frag:02d}_s{s}_reflectance.tif", pixels[i], m,
                                                       row["utm_crs"], transform, tags))
        if mosaic:
            files += _mosaics(files, out / "mosaic", meta, dst_crs, region)
        files.append(_write_index(out, samples_dir, meta, files))
    return ExportResult(final, [final / f.relative_to(out) for f in files])


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


def _mosaics(files: list[Path], folder: Path, meta: dict, dst_crs: str, region) -> list[Path]:
    from pipelines.mosaic import vrts_per_zone, write_mosaic, write_uncertainty

    written = []
    for m in meta["generate"]:
        per_sample = []
        for s in range(meta["n_samples"]):
            tifs = [f for f in files if f.parent.name == m and f.stem.endswith(f"_s{s}")]  # thumbnails only
            stem = f"{m}_s{s}"
            written += vrts_per_zone(tifs, folder, stem)
            per_sample.append(write_mosaic(tifs, folder / f"{stem}_{dst_crs.replace(':', '')}.tif", dst_crs=dst_crs, region=region))
        written += per_sample
        if len(per_sample) > 1:
            tag = dst_crs.replace(":", "")
            written += write_uncertainty(per_sample, folder / f"{m}_mean_{tag}.tif", folder / f"{m}_std_{tag}.tif")
    return written
