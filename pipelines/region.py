"""Fill a region: the cells covering a polygon, conditioned on what the store has for each
cell, the requested modalities generated, exported as GeoTIFFs and mosaics.

With ``condition='auto'`` every cell is conditioned on all the modalities it has (except
those asked for); cells with the same set of conditions are sampled together. Cells the
store lacks are ingested first when a ``source`` is given. Neighbouring cells are joined where
their products overlap (:mod:`pipelines.cell_join`: waves, each cell given what its generated
neighbours put there), and the mosaics cross-fade overlapping products.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from shapely.geometry.base import BaseGeometry

from majortom_gen.errors import MajorTomGenError
from majortom_gen.georef import default_grid
from majortom_gen.selection import summarise_cells
from majortom_gen.staging import check_output, local_paths, staged_folder
from majortom_gen.store import LatentStore
from pipelines.cell_canvas import FRAGMENTS_PER_CELL
from pipelines.cell_join import NeighbourKnown, cell_grids, cell_waves
from pipelines.export import export_samples
from pipelines.model_folder import ModelOnStore, open_model_for_store
from pipelines.sample import SamplingOptions, sample_store


@dataclass(frozen=True)
class RegionRequest:
    """What to fill: ``generate`` these modalities for the cells covering ``region``
    (EPSG:4326) and/or the ``cells`` given; ``condition``: 'auto' (each cell on every modality
    it has, except those generated) or the modalities to condition on; ``source``: a Major TOM
    source to ingest cells the store lacks from; the mosaics in ``dst_crs``; ``reflectance``:
    also approximate S2 reflectance COGs; ``join_cells``: generate neighbouring cells so that
    they agree where their products overlap (:mod:`pipelines.cell_join`; False: every cell on
    its own, whatever else is requested)."""

    generate: tuple[str, ...]
    region: BaseGeometry | None = None
    cells: tuple[str, ...] = ()
    condition: str | tuple[str, ...] = "auto"
    source: str | None = None
    dst_crs: str = "EPSG:4326"
    reflectance: bool = False
    join_cells: bool = True  # neighbours generated in waves, each given what its neighbours made (pipelines.cell_join)


@dataclass
class RegionResult:
    out: Path
    cells: list[str]
    groups: dict[str, list[str]]  # condition set -> cells
    skipped: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def generate_region(model_dir: str | os.PathLike, store_dir: str | os.PathLike, out: str | os.PathLike,
                    request: RegionRequest, options: SamplingOptions = SamplingOptions(), *,
                    progress: Callable[[int, int], None] | None = None, overwrite: bool = False) -> RegionResult:
    """Fill a region (see the module docstring): sample each group of cells with the same
    conditions, then export the merged samples as COGs and mosaics into ``out``."""
    inputs = (model_dir, store_dir, *local_paths(options.codec_source, request.source))
    check_output(out, overwrite=overwrite, inputs=inputs)
    model_dir = open_model_for_store(model_dir, store_dir)
    wanted = _wanted_cells(request)
    store = _store_with(store_dir, wanted, request.source)
    groups, skipped = _condition_groups(store, wanted, request)
    with staged_folder(out, overwrite=overwrite, inputs=inputs, kind="generate") as tmp:
        runs, waves = sample_groups(model_dir, store_dir, groups, request, options, tmp / "samples", progress)
        merged = _merge_samples(runs, tmp / "samples" / "all")
        result = export_samples(merged, store_dir, tmp / "geotiff", dst_crs=request.dst_crs, region=request.region,
                                reflectance=request.reflectance, codec_source=options.codec_source)
        summary = {"cells": wanted, "groups": {"+".join(k) or "unconditional": v for k, v in groups.items()},
                   "skipped": skipped, "generate": list(request.generate), "n_samples": options.n_samples,
                   "seed": options.seed, "join_cells": request.join_cells, "waves": waves}
        (tmp / "region.json").write_text(json.dumps(summary, indent=1))
    final = Path(out)
    return RegionResult(final, wanted, summary["groups"], skipped, [final / f.relative_to(tmp) for f in result.files])


def _wanted_cells(request: RegionRequest) -> list[str]:
    """The cells given, then those covering the region, once each."""
    region_cells = default_grid().cells_in(request.region) if request.region is not None else []
    wanted = list(dict.fromkeys(list(request.cells) + region_cells))
    if not wanted:
        raise MajorTomGenError("no cells: give a region or cell ids")
    return wanted


def _store_with(store_dir: str | os.PathLike, wanted: list[str], source: str | None) -> LatentStore:
    """The store, after ingesting the wanted cells it lacks from ``source`` (when given)."""
    store = LatentStore.open(store_dir)
    missing = [c for c in wanted if c not in store.stored_cells()]
    if missing and source is not None:
        from pipelines.ingest import IngestOptions, ingest

        ingest(source, missing, store_dir, IngestOptions(codec=store.codec["name"]), modalities=tuple(store.modalities))
        store = LatentStore.open(store_dir)
    return store


def _condition_groups(store: LatentStore, wanted: list[str],
                      request: RegionRequest) -> tuple[dict[tuple[str, ...], list[str]], dict[str, str]]:
    """``({conditions: cells}, {skipped cell: why})``; an error when no cell can be generated."""
    have = store.lookup(cells=wanted)
    skipped = {c: "not in the store (ingest it, or pass --source)" for c in wanted if c not in set(have["grid_cell"])}
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for cell, rows in have.groupby("grid_cell", sort=False):
        available = [m for m in store.modalities if rows[f"has_{m}"].all()]
        if request.condition == "auto":
            groups[tuple(m for m in available if m not in request.generate)].append(cell)
            continue
        lacking = [m for m in request.condition if m not in available]
        if lacking:
            skipped[cell] = f"lacks the condition(s) {lacking}"
        else:
            groups[tuple(request.condition)].append(cell)
    if not groups:
        listing = Path(tempfile.gettempdir()) / f"majortom-gen-skipped-{os.getpid()}.tsv"
        raise MajorTomGenError("no cell of the region can be generated: " + summarise_cells(skipped, full_list=listing))
    return dict(groups), skipped


def sample_groups(model_dir: Path, store_dir: str | os.PathLike, groups: dict[tuple[str, ...], list[str]],
                   request: RegionRequest, options: SamplingOptions, folder: Path,
                   progress: Callable[[int, int], None] | None) -> tuple[list[Path], list[list[str]]]:
    """Sample every group of cells (same conditions) into ``folder``; returns the sample runs
    and the waves. With ``request.join_cells`` the cells go in the waves of
    :func:`pipelines.cell_join.cell_waves`, each cell given the pictures of its neighbours
    generated in earlier waves; else all cells at once, as one wave."""
    generate = list(request.generate)
    names = {cond: "+".join(cond) or "unconditional" for cond in groups}
    all_cells = [c for cells in groups.values() for c in cells]
    if not request.join_cells:
        return [sample_store(model_dir, store_dir, cells, cond, generate, folder / names[cond], options,
                             progress=progress).out for cond, cells in groups.items()], [all_cells]
    bound = ModelOnStore.open(model_dir, store_dir, device=options.device, codec_source=options.codec_source)
    joiner = NeighbourKnown(bound.require_codec(), cell_grids(bound.store, all_cells), options.n_samples)
    waves = cell_waves(all_cells)
    grids = joiner.grids
    # the cells that a later wave's cell overlaps: only these are decoded and remembered
    needed = {a for k, wave in enumerate(waves) for a in wave
              if any(grids[a].overlaps(grids[b]) for later in waves[k + 1:] for b in later)}
    if not needed:  # no two cells overlap: one wave, as independent generation
        waves = [all_cells]
    runs = []
    total = len(bound.store.lookup(cells=all_cells))  # fragments, for one progress bar over the waves
    offset = 0
    for k, wave in enumerate(waves):
        for cond, cells in groups.items():
            these = [c for c in cells if c in set(wave)]
            if these:
                def step(done: int, _: int, start: int = offset) -> None:
                    if progress:
                        progress(start + done, max(total, start + done))
                run = sample_store(model_dir, store_dir, these, cond, generate, folder / names[cond] / f"wave{k}", options,
                                   progress=step, known=lambda cs, fs: joiner.rows(cs, fs, generate)).out
                offset += len(bound.store.lookup(cells=these))
                runs.append(run)
                if needed & set(these):
                    _remember(joiner, bound, run, generate, options.seamless, needed)
    return runs, waves


def _remember(joiner: NeighbourKnown, bound: ModelOnStore, run: Path, generate: list[str], seamless: bool,
              needed: set[str]) -> None:
    """Decode a sample run's complete cells that are ``needed`` as they were generated and add
    them to ``joiner``."""
    with np.load(run / "samples.npz") as z:
        cells, frags, samples = z["grid_cell"], z["fragment_index"], z["sample"]
        latents = {m: z[f"latent_{m}"] for m in generate}
    for cell in [c for c in dict.fromkeys(cells.tolist()) if c in needed]:
        rows = np.flatnonzero(cells == cell)
        rows = rows[np.lexsort((samples[rows], frags[rows]))]  # (fragment, sample) order
        if frags[rows].tolist() != [f for f in range(FRAGMENTS_PER_CELL) for _ in range(joiner.n_samples)]:
            continue  # not a whole cell: it makes nothing known
        for m in generate:
            whole = {"cells": cells[rows].tolist(), "frags": frags[rows].tolist(), "samples": samples[rows].tolist()}
            pictures = bound.pictures(latents[m][rows], m, **(whole if seamless else {}))  # decoded as generated
            joiner.add(cell, m, pictures)


def _merge_samples(runs: list[Path], target: Path) -> Path:
    """Concatenate sample runs (same generated modalities) into one for export: every per-row
    array of their ``samples.npz`` (ids, georeferencing, latents; see :func:`_concat_rows`),
    the quick-looks, and ``samples.json`` with the union of the conditions."""
    tables, metas = [], []
    for run in runs:
        with np.load(run / "samples.npz") as z:
            tables.append({k: z[k] for k in z.files})
        metas.append(json.loads((run / "samples.json").read_text()))
    target.mkdir(parents=True, exist_ok=True)
    for run in runs:  # the quick-looks (one PNG per cell) travel with the merged run
        for png in run.glob("*.png"):
            shutil.copy2(png, target / png.name)
    np.savez_compressed(target / "samples.npz", **_concat_rows(tables, runs))
    conditions = sorted({c for m in metas for c in m["condition"]})
    (target / "samples.json").write_text(json.dumps({**metas[0], "condition": conditions,
                                                     "condition_per_group": {str(r.name): m["condition"] for r, m in zip(runs, metas)}},
                                                    indent=1))
    return target


def _concat_rows(tables: list[dict[str, np.ndarray]], runs: list[Path]) -> dict[str, np.ndarray]:
    """Concatenate per-row arrays (first axis: one row per fragment sample, as many as
    ``grid_cell``) of several runs, key by key. A float array that some runs lack (e.g. the
    latents of a modality one group conditions on and another generates) is NaN on their
    rows; any other missing key, or an array that is not per row, is an error."""
    merged = {}
    for key in dict.fromkeys(k for t in tables for k in t):
        like = next(t[key] for t in tables if key in t)
        parts = []
        for table, run in zip(tables, runs):
            n = len(table["grid_cell"])
            part = table.get(key)
            if part is None and np.issubdtype(like.dtype, np.floating):
                part = np.full((n, *like.shape[1:]), np.nan, like.dtype)
            if part is None or part.shape[:1] != (n,):
                raise MajorTomGenError(f"{run}/samples.npz: {key!r} is {'missing' if part is None else 'not one row per sample'}; "
                                       "the sample runs cannot be merged (re-run them with this version)")
            parts.append(part)
        merged[key] = np.concatenate(parts)
    return merged
