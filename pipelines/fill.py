"""Gap filling: generate the missing pixels of one modality of stored products, keeping the
known ones exactly.

For each grid cell the observed thumbnail of the store's product is read from the Major TOM
source (one row group: the thumbnail, and the ``cloud_mask`` band when the gaps are its
clouds), cut into the store's 16 fragments, and its gaps found (:mod:`majortom_gen.gaps`).
Then:

1. **Latents.** The observed pixels with their gaps prefilled by a smooth interpolation of
   what surrounds them (:func:`prefill`, so no cloud or nodata leaks into the latents around
   a gap) are encoded with the store's codec; these latents are known outside the gaps, taken
   to the latent grid with a halo of ``halo`` latent pixels
   (:func:`majortom_gen.gaps.latent_gaps`); inside, the modality is generated with the other
   modalities given as conditions (each sample its own posterior draw, as in
   :mod:`pipelines.sample`), on one canvas per cell when sampling is seamless. Before every
   solver step the known part of the state is reset to the known latents noised to that
   step's level (blended latent diffusion; :func:`model.sample.generate`, ``known``), so the
   generated part grows around it. With ``strength`` below 1 the gaps start from the
   interpolation's latents noised to the level of the last ``strength`` share of the steps
   (SDEdit; the earlier steps are skipped), with ``resample``
   (:class:`pipelines.sample.SamplingOptions`) the noisy steps are repeated after jumps back
   to their level (RePaint), so the fill settles on what surrounds it.
2. **Pixels.** The result is decoded as generated (whole cells on a canvas). A decoder does not
   reproduce the known pixels exactly, so where the fill meets them it would show an edge:
   the difference between the observed and the decoded pixels, known outside the gap, is
   carried into the gap coarse to fine (:func:`harmonise`, a normalised convolution at
   falling scales) and added to the fill, which then joins the known pixels without a halo.
3. **Composite.** Outside the gaps the output is the observed thumbnail, bit for bit.

Outputs (``out/``): per cell, modality and sample the filled fragments as COGs
(``<cell>/<modality>/fNN_sS.tif``, placed like the store's fragments), the gap mask
(``fNN_gap.tif``, 1 = filled) and with several samples their mean; per sample a VRT per UTM
zone and a mosaic COG in EPSG:4326 (``mosaic/``, with mean and std for several samples); a
quick-look PNG per cell (observed with its gaps tinted, each filled sample, mean and spread);
``fill.json``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from affine import Affine

from majortom_gen.errors import MajorTomGenError
from majortom_gen.fragments import FRAGMENT_PX
from majortom_gen.gaps import MASK_SOURCES, cloud_gaps, file_gaps, latent_gaps, nodata_gaps
from majortom_gen.rasters import GeoRaster, write_cog
from majortom_gen.staging import check_output, local_paths, staged_folder
from majortom_gen.store import has_all, moment_array
from pipelines.cell_canvas import FRAGMENTS_PER_CELL, canvas_groups, cell_fragments, cell_mosaic
from pipelines.export import write_mosaics
from pipelines.model_folder import ModelOnStore
from pipelines.sample import FragmentBatch, SamplingOptions, condition_latents, fragment_georef, sample_fragments

HARMONISE_SIGMAS = (128.0, 64.0, 32.0, 16.0, 8.0, 4.0)  # px, coarse to fine
GAP_TINT = np.array([255, 0, 255], np.float32)  # the quick-look's colour for gaps
FILLED_CONTENT = ("{} thumbnail with its gaps filled by generation (8-bit visualisation); pixels outside the gaps "
                  "are the observed ones, unchanged")


@dataclass(frozen=True)
class FillRequest:
    """What to fill: ``modality``'s gaps from ``mask`` (``cloud_mask``, ``nodata`` or a raster
    or vector file), generated given ``condition`` (modalities the store has for the cell);
    ``halo``: latent pixels (8 px each) around a gap that are generated too."""

    modality: str
    mask: str
    condition: tuple[str, ...] = ()
    halo: int = 1


@dataclass
class ObservedCell:
    """A cell's observed fragments: ``pixels`` uint8 (16, 256, 256, 3) and ``gaps`` bool
    (16, 256, 256), in fragment index order, and the product they come from."""

    product_id: str
    pixels: np.ndarray
    gaps: np.ndarray


@dataclass
class FillResult:
    out: Path
    cells: list[str]
    files: list[Path]
    skipped: dict[str, str] = field(default_factory=dict)


def harmonise(fill: np.ndarray, observed: np.ndarray, gaps: np.ndarray,
              sigmas: Sequence[float] = HARMONISE_SIGMAS) -> np.ndarray:
    """The fill ``(H, W, 3)`` corrected so it joins the observed pixels ``(H, W, 3)`` around
    the ``gaps`` ``(H, W)``: the residual ``observed - fill``, known outside the gaps, is
    carried into them (:func:`interpolate_into_gaps`) and added to the fill. uint8 ``(H, W, 3)``."""
    residual = observed.astype(np.float32) - fill.astype(np.float32)
    return np.clip(np.rint(fill.astype(np.float32) + interpolate_into_gaps(residual, gaps, sigmas)), 0, 255).astype(np.uint8)


def prefill(observed: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """The observed image uint8 ``(H, W, 3)`` with its ``gaps`` ``(H, W)`` filled by smooth
    interpolation of the pixels around them (:func:`interpolate_into_gaps`): what the fill's
    known latents are encoded from, so no cloud or nodata leaks into them, and where the
    gaps start from at a strength below 1."""
    smooth = np.clip(np.rint(interpolate_into_gaps(observed.astype(np.float32), gaps)), 0, 255).astype(np.uint8)
    return np.where(gaps[..., None], smooth, observed)


def interpolate_into_gaps(values: np.ndarray, gaps: np.ndarray, sigmas: Sequence[float] = HARMONISE_SIGMAS,
                          blur: Callable[[np.ndarray, float], np.ndarray] | None = None) -> np.ndarray:
    """``values`` float ``(H, W, C)``, known outside the ``gaps`` ``(H, W)``, estimated
    everywhere by normalised convolution (the Gaussian-weighted mean of the known values) at
    each scale of ``sigmas`` (px, coarse to fine), each scale replacing the coarser where it
    has enough known pixels nearby. ``blur(image, sigma)``: the Gaussian filter (default: on a
    pyramid, :func:`_gaussian_pyramid_filter`). float32 ``(H, W, C)``."""
    blur = blur or _gaussian_pyramid_filter
    known = (~gaps).astype(np.float32)
    stack = np.concatenate([known[..., None], values.astype(np.float32) * known[..., None]], axis=-1)
    out = np.zeros(values.shape, np.float32)
    for sigma in sigmas:
        smoothed = blur(stack, sigma)
        weight = smoothed[..., :1]
        estimate = smoothed[..., 1:] / np.maximum(weight, 1e-6)
        trust = np.clip(weight / 0.1, 0.0, 1.0)  # enough known pixels within ~sigma
        out = trust * estimate + (1 - trust) * out
    return out


def _gaussian_pyramid_filter(image: np.ndarray, sigma: float) -> np.ndarray:
    """``image`` ``(H, W, C)`` float32 blurred by a Gaussian of ``sigma`` px, computed on an
    image k = 2^n times smaller (block means, n so that at least 2 px of sigma remain) and
    brought back by linear interpolation: on a 1024 px cell this is several times faster
    than the full-size filter and differs from it by well under a grey level on the smooth
    residuals it is used for (a block mean adds only k^2/12 px^2 to sigma^2)."""
    from scipy import ndimage

    h, w = image.shape[:2]
    k = 1
    while sigma / (2 * k) >= 2 and h % (2 * k) == 0 and w % (2 * k) == 0:
        k *= 2
    if k == 1:
        return ndimage.gaussian_filter(image, sigma, axes=(0, 1))
    small = image.reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, sigma / k, axes=(0, 1))
    rows, cols = _linear_upsampling(h // k, k), _linear_upsampling(w // k, k)
    return np.einsum("ia,abc,jb->ijc", rows, small, cols, optimize=True).astype(np.float32)


def _linear_upsampling(n: int, k: int) -> np.ndarray:
    """``(n * k, n)`` matrix that interpolates ``n`` block centres linearly onto the ``n * k``
    pixels they cover (pixel centres aligned, constant beyond the outer block centres): the
    same as torch's bilinear ``interpolate`` (``align_corners=False``), but as a separable
    matrix product it is about 7x faster on a cell than that or ``scipy.ndimage.zoom``."""
    x = np.clip((np.arange(n * k) + 0.5) / k - 0.5, 0, n - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    matrix = np.zeros((n * k, n), np.float32)
    matrix[np.arange(n * k), lo] += (1 - (x - lo)).astype(np.float32)
    matrix[np.arange(n * k), hi] += (x - lo).astype(np.float32)
    return matrix


def composite(fill: np.ndarray, observed: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """The observed pixels where known, the harmonised fill in the gaps (uint8, like ``observed``)."""
    return np.where(gaps[..., None], harmonise(fill, observed, gaps), observed)


def read_observed(source: str | os.PathLike, products: dict[str, str], modality: str, mask: str,
                  georef: dict[str, tuple[str, list[Affine]]]) -> tuple[dict[str, ObservedCell], dict[str, str]]:
    """The observed fragments and gaps of ``products`` = {cell: product id} of ``modality``
    under ``source`` (one row group each: the thumbnail, and ``cloud_mask`` for cloud gaps);
    ``georef`` = {cell: (UTM CRS, the 16 fragment transforms)} places a mask file. Returns
    ``(cells, skipped)``: a cell whose product is not in the source or cannot be read is
    skipped with the reason."""
    from majortom_gen.sources import dataset_root, decode_band, read_metadata, read_product_of
    from pipelines.ingest import thumbnail_fragments

    metadata = read_metadata(dataset_root(modality, source), modality)
    # a product listed twice (a Core quirk: one copy may be all nodata): the copy with the least nodata, as ingest chose
    ranked = metadata.reset_index(drop=True).sort_values("nodata", kind="stable")
    index = {}
    for i, c, p in zip(ranked.index, ranked["grid_cell"], ranked["product_id"]):
        index.setdefault((c, p), i)
    columns = ["grid_cell", "thumbnail"] + (["cloud_mask"] if mask == "cloud_mask" else [])
    cells, skipped = {}, {}
    for cell, product_id in products.items():
        item = f"{modality} {cell} product {product_id}"
        if (cell, product_id) not in index:
            skipped[cell] = f"{item}: not in {source} (the store was ingested from another source?)"
            continue
        row = metadata.iloc[index[(cell, product_id)]]
        try:
            product = read_product_of(row, columns)
            pixels = thumbnail_fragments(modality, cell, row["crs"], product["thumbnail"], "grid", item)
            if mask == "cloud_mask":
                gaps = np.stack(cloud_gaps(decode_band(product, "cloud_mask", item=item).array))
            elif mask == "nodata":
                gaps = nodata_gaps(pixels)
            else:
                crs, transforms = georef[cell]
                gaps = file_gaps(mask, crs, transforms)
        except MajorTomGenError as exc:
            skipped[cell] = str(exc)
            continue
        cells[cell] = ObservedCell(product_id, pixels, gaps)
    return cells, skipped


def _check_request(bound: ModelOnStore, request: FillRequest) -> None:
    m = request.modality
    if request.mask == "cloud_mask" and not m.startswith("S2"):
        raise MajorTomGenError(f"--mask cloud_mask: only S2 products have a cloud mask, not {m}; use nodata or a file")
    if request.mask not in MASK_SOURCES and not Path(request.mask).exists():
        raise MajorTomGenError(f"--mask {request.mask}: not {' or '.join(MASK_SOURCES)} and no such file")
    if m in request.condition:
        raise MajorTomGenError(f"{m} is both the modality to fill and a condition")
    if request.halo < 0:
        raise MajorTomGenError(f"--halo must be >= 0, got {request.halo}")
    bound.check([m, *request.condition], in_store=[m, *request.condition])


def fill_store(model_dir: str | os.PathLike, store_dir: str | os.PathLike, source: str | os.PathLike,
               cells: Sequence[str], request: FillRequest, out: str | os.PathLike,
               options: SamplingOptions = SamplingOptions(), *, progress: Callable[[int, int], None] | None = None,
               overwrite: bool = False) -> FillResult:
    """Fill the gaps of ``request.modality`` in the stored products of ``cells`` and write
    ``out`` (see the module docstring). Cells the store lacks (with the modality and every
    condition), whose product cannot be read, or without a gap pixel are skipped and listed
    in ``fill.json``; an error when none is left."""
    inputs = (model_dir, store_dir, *local_paths(str(source), options.codec_source, request.mask))
    check_output(out, overwrite=overwrite, inputs=inputs)
    bound = ModelOnStore.open(model_dir, store_dir, device=options.device, codec_source=options.codec_source)
    _check_request(bound, request)
    m, n = request.modality, options.n_samples
    wanted = [m, *request.condition]
    table = bound.store.table(["grid_cell", "fragment_index", f"{m}_product_id", *wanted], cells=list(cells))
    table = table.filter(pa.array(has_all(table, wanted)))
    rows = table.select(["grid_cell", "fragment_index", f"{m}_product_id"]).to_pandas()
    skipped = {c: f"the store has no complete fragments with {', '.join(wanted)}" for c in cells
               if c not in set(rows["grid_cell"])}
    groups, rest = canvas_groups(rows["grid_cell"].tolist(), rows["fragment_index"].tolist())
    skipped.update({rows["grid_cell"][r]: "the store does not hold all 16 fragments of the cell" for r in rest})
    rows_of_cell = {rows["grid_cell"][g[0]]: g for g in groups}  # row numbers in fragment order
    keep_cells = [c for c in dict.fromkeys(rows["grid_cell"]) if c not in skipped]
    georef = _cell_georef(bound, keep_cells)
    products = rows.drop_duplicates("grid_cell").set_index("grid_cell")[f"{m}_product_id"].to_dict()
    observed, unreadable = read_observed(source, {c: products[c] for c in keep_cells}, m, request.mask, georef)
    skipped.update(unreadable)
    no_gap = [c for c, o in observed.items() if not o.gaps.any()]
    skipped.update({c: f"no gap pixel in its {m} product ({request.mask})" for c in no_gap})
    todo = [c for c in keep_cells if c in observed and c not in no_gap]
    if not todo:
        from majortom_gen.selection import summarise_cells

        raise MajorTomGenError(f"nothing to fill among the {len(cells)} selected cells: {summarise_cells(skipped)}")
    part = table.take([r for c in todo for r in rows_of_cell[c]])
    gaps = np.concatenate([observed[c].gaps for c in todo])
    known = known_latents(bound, [observed[c] for c in todo], m)
    fills = fill_cells(bound, part, request, options, gaps, known, progress)
    with staged_folder(out, overwrite=overwrite, inputs=inputs, kind="fill") as tmp:
        files, summary, by_sample = [], {}, defaultdict(list)
        for i, cell in enumerate(todo):
            obs = observed[cell]
            filled = composite_cell(fills[i], obs.pixels, obs.gaps, options.seamless)
            files += _write_cell(tmp, cell, m, obs, filled, georef[cell], request, options, by_sample)
            summary[cell] = {"product_id": obs.product_id, "gap_fraction": round(float(obs.gaps.mean()), 4)}
        files += write_mosaics(m, by_sample, tmp / "mosaic", n, {"CONTENT": FILLED_CONTENT.format(m)}, "EPSG:4326", None)
        (tmp / "fill.json").write_text(json.dumps({
            "model": str(bound.model_dir), "store": str(bound.store_dir), "source": str(source), "modality": m,
            "mask": request.mask, "condition": list(request.condition), "halo": request.halo,
            "resample": options.resample, "strength": options.strength, "n_samples": n,
            "steps": options.steps, "seed": options.seed, "seamless": options.seamless,
            "codec": bound.store.codec["name"], "cells": summary, "skipped": skipped,
            "values": "8-bit thumbnails as the store's codec makes them; outside the gaps the observed pixels unchanged"},
            indent=1))
        files.append(tmp / "fill.json")
    return FillResult(Path(out), todo, [Path(out) / f.relative_to(tmp) for f in files], skipped)


def _cell_georef(bound: ModelOnStore, cells: list[str]) -> dict[str, tuple[str, list[Affine]]]:
    """{cell: (UTM CRS, transforms of fragments 0..15)} from the store."""
    if not cells:
        return {}
    cell_ids = [c for c in cells for _ in range(FRAGMENTS_PER_CELL)]
    frags = [f for _ in cells for f in range(FRAGMENTS_PER_CELL)]
    geo = fragment_georef(bound.store, cell_ids, frags)
    return {c: (str(geo["utm_crs"][i * 16]), [Affine(*t) for t in geo["utm_transform"][i * 16:(i + 1) * 16]])
            for i, c in enumerate(cells)}


def known_latents(bound: ModelOnStore, cells: Sequence[ObservedCell], modality: str) -> torch.Tensor:
    """The ``modality`` latents in the network's space ``(16 * len(cells), C, 32, 32)``, in
    fragment order per cell: each cell's observed pixels with their gaps prefilled on the
    whole cell (:func:`prefill`), encoded by the store's codec (latent means). Not the store's
    latents: those were encoded with the clouds or nodata in, which leak into the latents
    around a gap."""
    from majortom_gen.fragments import to_unit_range

    codec = bound.require_codec()
    out = []
    with torch.no_grad():
        for cell in cells:
            pixels = cell_fragments(prefill(cell_mosaic(cell.pixels), cell_mosaic(cell.gaps)))
            out.append(bound.network_means(codec.encode_moments(torch.from_numpy(to_unit_range(pixels))), modality))
    return torch.cat(out)


def fill_cells(bound: ModelOnStore, table, request: FillRequest, options: SamplingOptions, gaps: np.ndarray,
               known: torch.Tensor, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Generate the gaps of the whole cells of ``table`` (their 16 fragments each, in
    fragment order) and decode them as generated: ``gaps`` bool ``(N, 256, 256)`` per
    fragment, ``known`` the modality's latents in the network's space ``(N, C, 32, 32)``
    (kept outside the latent gaps), the conditions drawn from the table's moments. Returns
    uint8 ``(cells, 16, n_samples, 256, 256, 3)``: the decoded fills, not yet composited
    (:func:`composite_cell`)."""
    from pipelines.sample import sample_rows_of

    m, n = request.modality, options.n_samples
    cells, frags = table.column("grid_cell").to_pylist(), table.column("fragment_index").to_pylist()
    moments = {c: torch.from_numpy(moment_array(table, c, np.float32)) for c in request.condition}
    cond = condition_latents(moments, bound.norms, cells, frags, options.seed, options.deterministic_conditions, n)
    keep = torch.from_numpy(~latent_gaps(gaps, halo=request.halo)).float()[:, None]
    if tuple(keep.shape[-2:]) != tuple(known.shape[-2:]) or len(keep) != len(known) or len(known) != len(cells):
        raise MajorTomGenError(f"{len(cells)} fragments, {len(gaps)} gap masks {tuple(keep.shape[-2:])} (latent grid) and "
                               f"known latents {tuple(known.shape)} do not match")
    batch = FragmentBatch(cells, frags, cond, known={m: (known.repeat_interleave(n, dim=0), keep.repeat_interleave(n, dim=0))})
    latents = sample_fragments(bound.model_dir, batch, [m], options, progress)[m]
    rows_of = sample_rows_of(cells, frags, n) if options.seamless else {}
    pictures = bound.pictures(latents, m, **rows_of)  # decoded as generated
    return pictures.reshape(-1, FRAGMENTS_PER_CELL, n, FRAGMENT_PX, FRAGMENT_PX, 3)


def composite_cell(fills: np.ndarray, observed: np.ndarray, gaps: np.ndarray, seamless: bool = True) -> np.ndarray:
    """One cell's filled fragments uint8 ``(16, n_samples, 256, 256, 3)``: the decoded fills
    ``(16, n_samples, 256, 256, 3)`` composited with the observed fragments ``(16, 256, 256,
    3)`` around their ``gaps`` ``(16, 256, 256)`` (:func:`composite`), on the whole cell when
    it was generated as one (``seamless``), else fragment by fragment."""
    out = []
    for s in range(fills.shape[1]):
        if seamless:
            out.append(cell_fragments(composite(cell_mosaic(fills[:, s]), cell_mosaic(observed), cell_mosaic(gaps))))
        else:
            out.append(np.stack([composite(f, o, g) for f, o, g in zip(fills[:, s], observed, gaps)]))
    return np.stack(out, axis=1)


def _write_cell(out: Path, cell: str, modality: str, obs: ObservedCell, filled: np.ndarray,
                georef: tuple[str, list[Affine]], request: FillRequest, options: SamplingOptions,
                by_sample: dict[int, list]) -> list[Path]:
    """The COGs of one cell (filled samples, gap masks, mean) and its quick-look; each
    sample's (path, raster, cell) are added to ``by_sample`` for the mosaics."""
    from pipelines.export import fragment_raster
    from pipelines.quicklook import std_panel, write_quicklook

    crs, transforms = georef
    n = filled.shape[1]
    tags = {"grid_cell": cell, "modality": modality, "source_product_id": obs.product_id, "mask": request.mask,
            "condition": ",".join(request.condition) or "none", "seed": options.seed, "steps": options.steps,
            "CONTENT": FILLED_CONTENT.format(modality)}
    folder = out / cell / modality
    files = []
    mean = filled.astype(np.float32).mean(axis=1).round().astype(np.uint8) if n > 1 else None
    for f in range(FRAGMENTS_PER_CELL):
        for s in range(n):
            raster = fragment_raster(filled[f, s], modality, crs, transforms[f])
            files.append(write_cog(folder / f"f{f:02d}_s{s}.tif", raster, {**tags, "fragment_index": f, "sample": s},
                                   rgb=raster.count == 3))
            by_sample[s].append((files[-1], raster, cell))
        gap = GeoRaster(obs.gaps[f][None].astype(np.uint8), crs, transforms[f], ("1 = gap filled by generation",))
        files.append(write_cog(folder / f"f{f:02d}_gap.tif", gap, {**tags, "CONTENT": "gap mask", "fragment_index": f}))
        if mean is not None:
            raster = fragment_raster(mean[f], modality, crs, transforms[f])
            files.append(write_cog(folder / f"f{f:02d}_mean.tif", raster, {**tags, "fragment_index": f, "sample": "mean"},
                                   rgb=raster.count == 3))
    observed, gaps = cell_mosaic(obs.pixels), cell_mosaic(obs.gaps)
    tinted = np.where(gaps[..., None], (0.5 * observed + 0.5 * GAP_TINT).astype(np.uint8), observed)
    samples = [cell_mosaic(filled[:, s]) for s in range(n)]
    panels = [(f"{modality} observed, gaps ({gaps.mean():.0%}) tinted", tinted)]
    panels += [(f"filled, sample {s + 1}", px) for s, px in enumerate(samples)]
    if n > 1:
        panels += [("filled, mean", cell_mosaic(mean)), ("spread (std x4)", std_panel(np.stack(samples)))]
    title = (f"{cell}: {modality} gaps ({request.mask}) filled from "
             f"{', '.join(request.condition) or 'the known pixels only'}")
    (out / "quicklook").mkdir(exist_ok=True)
    files.append(write_quicklook(out / "quicklook" / f"{cell}.png", title, [panels]))
    return files
