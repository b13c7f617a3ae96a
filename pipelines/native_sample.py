"""Generate native band groups for stored cells and write them in physical units (#14).

For each requested cell, all 36 patches are generated at once from the given conditions
(band groups read from the native store, and the location/date tokens of each patch), with
DPM-Solver++ (:func:`model.sample.generate`); the generated latents are decoded by each
group's codec, mapped back to physical units (:func:`majortom_gen.native.from_model`), put
back on the product's band grid (overlaps averaged) and written as COGs
(:func:`majortom_gen.native_export.write_physical`): ``OUT/<cell>/<group>_s<k>.tif``.

Every patch sample draws its own starting noise from (seed, cell, patch, sample, modality),
as the thumbnail pipeline does, so a cell's result does not depend on the other cells asked for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from majortom_gen.errors import MajorTomGenError
from majortom_gen.georef import product_box
from majortom_gen.native import from_model, get_band_group, patch_layout
from majortom_gen.native_export import assemble_patches, write_physical
from majortom_gen.store import LatentStore, moment_array
from model.codecs import latent_norms, moment_means
from model.sample import generate
from model.uvit import MultiModalUViT
from pipelines.ingest_native import store_codec_set
from pipelines.native_scalars import scalar_moments
from pipelines.sample import fragment_noise


@dataclass(frozen=True)
class NativeSampling:
    """``steps`` of the solver, ``seed``, ``n_samples`` per patch, classifier-free ``guidance``
    on the image conditions (dropped together; 0: none), network calls of at most
    ``batch_size`` patch samples, ``device``."""

    steps: int = 25
    seed: int = 0
    n_samples: int = 1
    guidance: float = 0.0
    batch_size: int = 72
    device: str = "cpu"


@dataclass
class NativeResult:
    """Per (cell, group, sample): the physical product raster ``(bands, S, S)`` and its
    transform and CRS; the files written."""

    rasters: dict[tuple[str, str, int], tuple[np.ndarray, object, str]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def sample_native(model_dir: str | os.PathLike, store_dir: str | os.PathLike, cells: Sequence[str],
                  condition: Sequence[str], generate_groups: Sequence[str], out: str | os.PathLike | None = None,
                  options: NativeSampling = NativeSampling()) -> NativeResult:
    """Generate ``generate_groups`` of ``cells`` given ``condition`` (stored band groups and/or
    the scalar tokens ``3d_cartesian_lat_lon``, ``mean_timestamps``; the network's other
    modalities are marginalised). With ``out``, write the COGs there."""
    if not cells:
        raise MajorTomGenError("no cells to generate: give --cells or --region")
    if not generate_groups:
        raise MajorTomGenError("nothing to generate: give --generate")
    store = LatentStore.open(store_dir)
    if not store.native:
        raise MajorTomGenError(f"{store_dir} is a thumbnail store; native generation needs a --family native store")
    net = MultiModalUViT.from_pretrained(model_dir).to(options.device).eval()
    unknown = [m for m in list(condition) + list(generate_groups) if m not in net.modalities]
    if unknown:
        raise MajorTomGenError(f"the model does not model {unknown}; it models {net.modalities}")
    images = [m for m in condition if not get_band_group(m).is_scalar]
    absent = [m for m in images if m not in store.modalities]
    if absent:
        raise MajorTomGenError(f"the store has no {absent}; it holds {store.modalities}")
    stored_targets = [m for m in generate_groups if m in store.modalities]  # shown beside the samples
    table = store.table(["grid_cell", "fragment_index", *images, *stored_targets], cells=list(cells))
    table = table.sort_by([("grid_cell", "ascending"), ("fragment_index", "ascending")])
    mask = np.ones(table.num_rows, bool)
    for m in images:
        mask &= table.column(m).is_valid().to_numpy(zero_copy_only=False)
    table = table.filter(mask)
    grid_cell = np.asarray(table.column("grid_cell").to_pylist(), dtype=str)
    frags = table.column("fragment_index").to_numpy()
    missing = sorted(set(cells) - set(grid_cell.tolist()))
    if missing:
        raise MajorTomGenError(f"cells {missing} have no stored patches with all of {images}")
    norms = latent_norms(store.codec, net.modalities)
    n = options.n_samples
    cond = {}
    for m in condition:
        mom = (torch.from_numpy(scalar_moments(store, m, grid_cell, frags)) if get_band_group(m).is_scalar
               else torch.from_numpy(moment_array(table, m, np.float32, store.moment_shape(m))))
        cond[m] = norms[m].to_network(moment_means(mom)).repeat_interleave(n, dim=0)

    def noise(modalities: Sequence[str], tag: str = "") -> dict[str, torch.Tensor]:
        return {m: fragment_noise(grid_cell.tolist(), frags.tolist(), n, [m], options.seed, net.latent_shape(m),
                                  tag=tag)[m] for m in modalities}

    free = [m for m in net.modalities if m not in cond and m not in generate_groups]
    guided = bool(options.guidance) and bool(images)
    result = generate(net, {m: v.to(options.device) for m, v in cond.items()}, list(generate_groups), n_samples=1,
                      steps=options.steps, seed=options.seed, initial_noise=noise(generate_groups),
                      marginal_noise=noise(free + (images if guided else []), tag="marginal:"),
                      guidance={tuple(images): options.guidance} if guided else None,
                      batch_size=options.batch_size)
    codecs = store_codec_set(store, list(dict.fromkeys(
        [m for m in generate_groups if not get_band_group(m).is_scalar] + (images if out is not None else []))))
    out_root = Path(out) if out is not None else None
    res = NativeResult()
    for m in generate_groups:
        g = get_band_group(m)
        x = result[m].float().cpu()
        if g.is_scalar:
            continue  # generated location/date tokens are returned in the latents only
        decoded = torch.cat([codecs[m].decode_network(x[i:i + options.batch_size], m)
                             for i in range(0, len(x), options.batch_size)]).numpy()
        values = from_model(g, decoded)  # (N * n, bands, p, p), physical
        for cell in sorted(set(grid_cell.tolist())):
            box = product_box(cell)
            layout = {p.index: p for p in patch_layout(g, box.transform(g.resolution_m), box.crs)}
            rows = np.flatnonzero(grid_cell == cell)
            tags = {"generated_from": ",".join(condition) or "nothing", "seed": options.seed, "steps": options.steps}
            for s in range(n):
                patches = [(layout[int(frags[r])], values[r * n + s]) for r in rows]
                raster, transform = assemble_patches(g, patches)
                res.rasters[(cell, m, s)] = (raster, transform, box.crs)
                if out_root is not None:
                    res.files.append(write_physical(out_root / cell / f"{m}_s{s}.tif", g, raster, transform, box.crs,
                                                    tags=tags))
            if out_root is not None and n > 1 and g.encoding != "one_hot":
                samples = [res.rasters[(cell, m, s)][0] for s in range(n)]
                res.files += _write_statistics(out_root / cell, g, samples, transform, box.crs, tags)
    if out_root is not None:
        res.files += _quicklooks(out_root, table, grid_cell, frags, images, stored_targets, generate_groups, res, codecs,
                                 store, n)
    return res


def _stored_product(table, rows: np.ndarray, group, codec, shape) -> np.ndarray | None:
    """A group's stored product for the rows of one cell (its codec's reconstruction of the
    latent means, physical units on the product grid), or None where a patch lacks it."""
    column = table.column(group.name)
    if not all(column[int(r)].is_valid for r in rows):
        return None
    mom = torch.from_numpy(moment_array(table.take(rows.tolist()), group.name, np.float32, shape))
    return codec.decode(moment_means(mom)).numpy()


def _quicklooks(out_root: Path, table, grid_cell: np.ndarray, frags: np.ndarray, images: list[str],
                stored_targets: list[str], generate_groups: Sequence[str], res: NativeResult, codecs: dict,
                store: LatentStore, n: int) -> list[Path]:
    """``OUT/<cell>/quicklook.png`` per cell (:mod:`pipelines.native_quicklook`)."""
    from pipelines.native_quicklook import write_native_quicklook

    files = []
    for cell in sorted(set(grid_cell.tolist())):
        rows = np.flatnonzero(grid_cell == cell)
        box = product_box(cell)

        def product(name: str) -> np.ndarray | None:
            g = get_band_group(name)
            decoded = _stored_product(table, rows, g, codecs[name], store.moment_shape(name))
            if decoded is None:
                return None
            layout = {p.index: p for p in patch_layout(g, box.transform(g.resolution_m), box.crs)}
            return assemble_patches(g, [(layout[int(frags[r])], v) for r, v in zip(rows, from_model(g, decoded))])[0]

        conditions = {m: (get_band_group(m), product(m)) for m in images}
        generated = {m: (get_band_group(m), [res.rasters[(cell, m, s)][0] for s in range(n)],
                         product(m) if m in stored_targets else None)
                     for m in generate_groups if not get_band_group(m).is_scalar}
        files.append(write_native_quicklook(out_root / cell / "quicklook.png", cell,
                                            {k: v for k, v in conditions.items() if v[1] is not None}, generated))
    return files


def _write_statistics(folder: Path, group, samples: list[np.ndarray], transform, crs: str, tags: dict) -> list[Path]:
    """``<group>_mean.tif`` and ``<group>_std.tif`` of a cell's samples, per pixel: DEM in
    metres, S2 in reflectance (the mean as DN like the samples, the spread in DN), S1 in dB
    (both taken over the samples' dB values)."""
    from majortom_gen.rasters import GeoRaster, write_cog

    db = group.encoding == "log_db"
    stack = np.stack(samples).astype(np.float64)
    if db:
        stack = 10.0 * np.log10(np.maximum(stack, group.min_positive))
    mean, std = stack.mean(axis=0), stack.std(axis=0)
    n = len(samples)
    mean_path = write_physical(folder / f"{group.name}_mean.tif", group, 10.0 ** (mean / 10.0) if db else mean,
                               transform, crs, db=db, tags={**tags, "statistic": f"mean of {n} samples"})
    unit = {"log1p": "m", "log_db": "dB", "reflectance": "reflectance x 10000"}[group.encoding]
    raster = GeoRaster(std.astype(np.float32), crs, transform, descriptions=tuple(f"{b} std" for b in group.bands),
                       nodata=float("nan"))
    std_path = write_cog(folder / f"{group.name}_std.tif", raster, units=[unit] * len(group.bands),
                         tags={**tags, "modality": group.name, "units": unit, "statistic": f"std of {n} samples"})
    return [mean_path, std_path]
