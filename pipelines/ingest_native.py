"""Ingest for the native family: Core band GeoTIFFs -> COP-GEN band-group latents in the store.

The same plan as the thumbnail ingest (:mod:`pipelines.ingest`): one product per (cell, Core
modality) chosen by :func:`majortom_gen.selection.select`; batches of ``cells_per_shard``
cells, one store shard each; one *decode* task per (Core modality, shard file) that opens the
file once, reads one row group per product and only the band columns of the requested groups,
decodes the GeoTIFFs, checks them (UTM zone of the cell, raster size) and cuts each group into
its 6 x 6 patches in the official normalisation (:mod:`majortom_gen.native`); one *encode*
task per batch that encodes each group with its own codec and writes the shard. The same
guarantees: bad products are quarantined with the reason (``ingest-errors.jsonl``), what is
stored is skipped per (cell, band group) so a killed run ends as an uninterrupted one, and
the run holds the store's write lock.

Codecs, one per band group (a *codec set*, recorded in the manifest as ``codec-set`` with
each member's identity):

- ``patch-pca`` (offline, seconds): a linear 8x8-block codec per group with 8 latent channels
  (the latent shape of COP-GEN's VAEs: 192 px -> 8 x 24 x 24), fitted on 9 patches of each of
  at least :data:`FIT_CELLS` cells spread over the selection (a whitened linear codec fitted on
  a few neighbouring cells gives other places latents of a far larger spread: DEM channels of
  std 5-23 when fitted on 4 neighbouring cells) and saved in ``STORE/codec/<group>``;
- ``cop-gen-vae``: the published band-group VAEs, ``codec_source`` a folder holding one codec
  folder per group (``majortom-gen convert-weights --family copgen --vaes ...`` writes
  ``OUT/codecs``), recorded by path;
- ``small-vae``: learned offline codecs, one per group (``majortom-gen codec train --family
  native --group G --out DIR``), ``codec_source`` their folder, recorded by path.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from majortom_gen.errors import MajorTomGenError, ShardError
from majortom_gen.georef import product_box
from majortom_gen.native import PATCHES_PER_SIDE, cut_patches, get_band_group, patch_offsets, to_model
from majortom_gen.selection import Filters, select
from majortom_gen.staging import swap_in
from majortom_gen.store import (CODEC_DIR, NATIVE_MODE, CellLatents, CodecInfo, LatentStore, cells_table, store_lock,
                                write_shard_file)
from pipelines.ingest import (IngestOptions, IngestReport, _decode_items, _device, _on_dask_worker, _products_of,
                              _start_report, _write_errors, plan_batches, run_batches)

PATCH_PX_10M = 192  # a patch's side in the 10 m grid (1920 m)
DEFAULT_GROUPS = ("DEM_DEM", "S1RTC_vh_vv", "S2L2A_B02_B03_B04_B08", "S2L2A_B05_B06_B07_B11_B12_B8A", "S2L2A_B01_B09")
NATIVE_CODECS = ("patch-pca", "cop-gen-vae", "small-vae")
FIT_CELLS = 16  # patch-pca: at least this many cells, spread over the selection, fit each group's codec
FIT_PATCH_STEP = 4  # ... and every 4th of their 36 patches (9 per cell)


def native_windows() -> list[tuple[int, int, int, int]]:
    """``(patch_row, patch_col, row_off, col_off)`` of the 6 x 6 patches in the 1068 px 10 m grid."""
    offsets = patch_offsets(1068, PATCH_PX_10M)
    return [(r, c, r0, c0) for r, r0 in enumerate(offsets) for c, c0 in enumerate(offsets)]


def moment_shapes(groups: Sequence[str]) -> dict[str, list[int]]:
    """The store's moment shape per band group: (2 x latent channels, H, W)."""
    return {g: [2 * get_band_group(g).latent[0], *get_band_group(g).latent[1:]] for g in groups}


def _check_groups(groups: Sequence[str]) -> list[str]:
    names = [get_band_group(g).name for g in groups]
    scalars = [g for g in names if get_band_group(g).is_scalar]
    if scalars:
        raise MajorTomGenError(f"{scalars} are scalar modalities: they are computed from each patch's place and "
                               "date when training, not ingested")
    if not names or len(set(names)) != len(names):
        raise MajorTomGenError(f"give distinct band groups, got {list(groups)}")
    return names


# ----------------------------------------------------------------------------- decode
def product_patches(modality: str, groups: Sequence[str], cell: str, product: dict[str, Any],
                    item: str) -> dict[str, np.ndarray]:
    """One product's band groups as model inputs: ``{group: float32 (36, C, p, p)}`` in [-1, 1]
    (the official normalisation), after checking each band's CRS against the cell's UTM zone."""
    from majortom_gen.sources import decode_band

    box = product_box(cell)
    out = {}
    for name in groups:
        g = get_band_group(name)
        rasters = [decode_band(product, b, item=item) for b in g.bands]
        for b, r in zip(g.bands, rasters):
            if r.crs != box.crs:
                raise ShardError(f"{item}, band {b}: CRS {r.crs} differs from the cell's UTM zone {box.crs}")
        shapes = {r.array.shape for r in rasters}
        if len(shapes) != 1:
            raise ShardError(f"{item}: the bands of {name} differ in size: {sorted(shapes)}")
        stack = np.stack([r.array for r in rasters])
        if np.issubdtype(stack.dtype, np.floating) and not np.isfinite(stack).all():
            stack = np.where(np.isfinite(stack), stack, 0)  # NaN nodata: floored like the official nodata
        try:
            patches = cut_patches(stack, g, rasters[0].transform, box.crs)
        except ValueError as exc:
            raise ShardError(f"{item}: {exc}") from None
        if g.encoding in ("reflectance", "log_db") and not (stack > 0).any():  # (a DEM of 0 m is sea, not nodata)
            raise ShardError(f"{item}: {name} is entirely nodata")
        out[name] = np.stack([to_model(g, a) for _, a in patches])
    return out


def decode_native_task(modality: str, groups: Sequence[str], shard: str, items: list[tuple[str, int, str]]
                       ) -> dict[str, dict[str, np.ndarray] | str]:
    """Read the products ``items`` = [(cell, row_group, crs)] of one shard file of ``modality``
    (opened once; only ``grid_cell`` and the groups' band columns) and cut them. Returns
    {cell: {group: patches} | error text}."""
    from majortom_gen.sources import read_row_groups

    columns = ["grid_cell"] + sorted({b for g in groups for b in get_band_group(g).bands})
    by_rg = defaultdict(list)
    for cell, rg, crs in items:
        by_rg[rg].append(cell)
    out: dict[str, dict[str, np.ndarray] | str] = {}
    for rg, result in read_row_groups(shard, sorted(by_rg), columns):
        for cell in by_rg[rg]:
            item = f"{modality} {cell} ({Path(str(shard)).name} row group {rg})"
            if isinstance(result, ShardError):
                out[cell] = f"{modality}: {result}"
            elif result["grid_cell"] != cell:
                out[cell] = f"{item}: the row group holds cell {result['grid_cell']}, not {cell}"
            else:
                try:
                    out[cell] = product_patches(modality, groups, cell, result, item)
                except MajorTomGenError as exc:
                    out[cell] = str(exc)
    return out


# ----------------------------------------------------------------------------- codecs
@dataclass(frozen=True)
class CodecSetSpec:
    """How an encode task opens the store's codecs: kind, the folder holding one codec folder
    per group, device, precision and torch threads per worker."""

    name: str
    folder: str
    device: str
    precision: str
    threads: int


_CODEC_SETS: dict[tuple, dict] = {}


def load_codec_set(folder: str | Path, groups: Sequence[str], *, device: str = "cpu", precision: str = "fp32") -> dict:
    """``{group: Codec}`` from ``folder/<group>`` codec folders; a missing one is named."""
    import torch

    from model.codecs import load_codec

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    missing = [g for g in groups if not (Path(folder) / g).is_dir()]
    if missing:
        raise MajorTomGenError(f"{folder}: no codec folder for {missing} (expected {folder}/<group>/)")
    return {g: load_codec(source=Path(folder) / g, device=device, dtype=dtype) for g in groups}


def store_codec_set(store: LatentStore, groups: Sequence[str], *, device: str = "cpu") -> dict:
    """The codecs of a native store's ``groups``: its own folder (``STORE/codec``, patch-pca) or
    the one it records (cop-gen-vae); each checked against the identity the store recorded."""
    record = store.codec
    if record.get("name") != "codec-set":
        raise MajorTomGenError(f"{store.root}: not a native store (codec {record.get('name')})")
    folder = Path(record["source"]) if record.get("source") else store.codec_dir
    codecs = load_codec_set(folder, groups, device=device)
    members = record["config"]["members"]
    wrong = [g for g in groups if g not in members or codecs[g].info()["config_hash"] != members[g]["config_hash"]]
    if wrong:
        raise MajorTomGenError(f"{folder}: the codecs of {wrong} are not those that made the store's latents")
    return codecs


def codec_set_info(name: str, codecs: dict, source: str | None = None) -> CodecInfo:
    """The store's record of a codec set: each member's identity, and one hash over them."""
    members = {g: c.info() for g, c in sorted(codecs.items())}
    digest = hashlib.sha256(json.dumps({g: (i["name"], i["config_hash"]) for g, i in members.items()},
                                       sort_keys=True).encode()).hexdigest()
    return CodecInfo("codec-set", digest, {"kind": name, "members": members}, source=source)


def _worker_codecs(spec: CodecSetSpec, groups: Sequence[str]) -> dict:
    import torch

    if _on_dask_worker():
        torch.set_num_threads(max(spec.threads, 1))
    key = (spec.folder, spec.device, spec.precision, tuple(groups))
    if key not in _CODEC_SETS:
        _CODEC_SETS[key] = load_codec_set(spec.folder, groups, device=spec.device, precision=spec.precision)
    return _CODEC_SETS[key]


def _fit_patch_pca(store_root: Path, selection, batches: list[list[str]], groups: Sequence[str], by_source: dict,
                   options: IngestOptions) -> Path:
    """Fit one patch-pca codec per group on cells spread over the selection (see the module
    docstring) and save them in ``STORE/codec/<group>`` (kept when the store already has them)."""
    import torch

    from model.codecs import fit_latent_norms, fit_patch_pca

    folder = store_root / CODEC_DIR
    if all((folder / g).is_dir() for g in groups):
        return folder
    pool = [c for b in batches for c in b]
    count = max(options.fit_cells, FIT_CELLS)
    first = pool[::max(len(pool) // count, 1)][:count]  # spread over the selection: neighbours look alike
    samples: dict[str, list[np.ndarray]] = defaultdict(list)
    for (modality, shard), items in _decode_items(selection, first).items():
        for value in decode_native_task(modality, by_source.get(modality, []), shard, items).values():
            if not isinstance(value, str):
                for g, patches in value.items():
                    samples[g].append(patches[::FIT_PATCH_STEP])
    absent = [g for g in groups if not samples.get(g)]
    if absent:
        raise MajorTomGenError(f"cannot fit patch-pca for {absent}: none of the first {len(first)} cells has a "
                               "readable product of them")
    tmp = folder.with_name(f".{CODEC_DIR}.partial")
    for g in groups:
        images = torch.from_numpy(np.concatenate(samples[g]).astype(np.float32))
        codec, _ = fit_patch_pca(images, in_channels=images.shape[1], latent_channels=8)
        codec.norms = fit_latent_norms(codec, {g: images})
        codec.provenance = {"fitted_on": first, "patches": int(len(images))}
        codec.save(tmp / g)
    swap_in(tmp, folder)
    return folder


# ----------------------------------------------------------------------------- encode
@dataclass(frozen=True)
class NativeEncodeSettings:
    store_root: str
    codecs: CodecSetSpec
    groups: tuple[str, ...]
    encode_batch: int


def encode_native_task(settings: NativeEncodeSettings, batch: list[str], products: dict[str, dict[str, tuple]],
                       decoded: list[dict[str, dict[str, np.ndarray] | str]]) -> dict[str, Any]:
    """Encode a batch of cells (each group with its codec) and write one store shard."""
    import torch

    patches: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    quarantined: dict[str, str] = {}
    for result in decoded:
        for cell, value in result.items():
            if isinstance(value, str):
                quarantined.setdefault(cell, value)
            else:
                patches[cell].update(value)
    good = [c for c in batch if c not in quarantined and patches.get(c)]
    codecs = _worker_codecs(settings.codecs, settings.groups)
    windows = native_windows()
    moments: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for g in settings.groups:
        cells = [c for c in good if g in patches[c]]
        if not cells:
            continue
        stack = np.concatenate([patches[c][g] for c in cells])
        parts = [codecs[g].encode_moments(torch.from_numpy(stack[i:i + settings.encode_batch].astype(np.float32)))
                 .numpy().astype(np.float16) for i in range(0, len(stack), settings.encode_batch)]
        enc = np.concatenate(parts)
        for c, e in zip(cells, enc.reshape(len(cells), len(windows), *enc.shape[1:])):
            moments[c][g] = e
    source = {g: get_band_group(g).source for g in settings.groups}
    latents = [CellLatents(c, windows, moments[c], {g: products[c][source[g]] for g in moments[c]},
                           fragment_px=PATCH_PX_10M, grid_side=PATCHES_PER_SIDE) for c in good]
    table = cells_table(latents, settings.groups, moment_shapes(settings.groups)) if latents else None
    name = write_shard_file(settings.store_root, table) if latents else None
    return {"shard": name, "cells": good, "fragments": len(good) * len(windows), "quarantined": quarantined}


# ----------------------------------------------------------------------------- the run
def ingest_native(source, cells: list[str], store_root, options: IngestOptions = IngestOptions(codec="patch-pca"), *,
                  groups: Sequence[str] = DEFAULT_GROUPS, filters: Filters = Filters(), rule: str = "least-cloudy",
                  progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Ingest the band ``groups`` of ``cells`` under ``source`` into the native store at
    ``store_root`` (created if absent), holding its write lock; ``options.codec``:
    ``patch-pca``, ``cop-gen-vae`` or ``small-vae`` (``options.codec_source``: the folder of
    the per-group codec folders). ``progress(cells_done, cells_total)`` as batches finish."""
    start = time.perf_counter()
    groups = _check_groups(groups)
    if options.codec not in NATIVE_CODECS:
        raise MajorTomGenError(f"--codec {options.codec!r} is a thumbnail codec; the native family takes "
                               f"{' or '.join(NATIVE_CODECS)}")
    if options.codec != "patch-pca" and not options.codec_source:
        raise MajorTomGenError(f"--codec {options.codec} needs --codec-source: the folder of the band groups' codec "
                               "folders (convert-weights --family copgen --vaes ... writes OUT/codecs; codec train "
                               "--family native writes OUT/<group>)")
    by_source: dict[str, list[str]] = defaultdict(list)
    for g in groups:
        by_source[get_band_group(g).source].append(g)
    unsupported = [m for m in by_source if m not in ("DEM", "S1RTC", "S2L1C", "S2L2A")]
    if unsupported:
        raise MajorTomGenError(f"no Core dataset for {unsupported} (land cover needs its own source)")
    store_root = Path(store_root)
    selection = select(source, cells, tuple(by_source), filters, rule)
    new_folder = not store_root.exists()
    store_root.mkdir(parents=True, exist_ok=True)
    try:
        with store_lock(store_root, "ingest"):
            report = _ingest_locked(source, selection, cells, store_root, options, groups, dict(by_source), progress)
    finally:
        if new_folder and store_root.is_dir() and not any(store_root.iterdir()):
            store_root.rmdir()
    report.seconds = time.perf_counter() - start
    return report


def _ingest_locked(source, selection, cells, store_root: Path, options: IngestOptions, groups: list[str],
                   by_source: dict[str, list[str]], progress) -> IngestReport:
    existing = LatentStore.open(store_root) if (store_root / "manifest.json").exists() else None
    if existing is not None and not existing.native:
        raise MajorTomGenError(f"{store_root} is a thumbnail store ({existing.manifest['fragment_mode']} fragments); "
                               "ingest the native family into another --store")
    stored = existing.cell_modalities() if existing else {}
    todo: dict[str, set[str]] = defaultdict(set)  # cell -> Core modalities with a group still to store
    for cell, modality in zip(selection.products["grid_cell"], selection.products["modality"]):
        if any(g not in stored.get(cell, ()) for g in by_source.get(modality, ())):
            todo[cell].add(modality)
    batches = plan_batches(todo, options.cells_per_shard)
    report = _start_report(source, selection, cells, store_root, stored, todo)
    if existing is None and not batches:
        raise MajorTomGenError("nothing to ingest: none of the selected cells has a product")
    device = _device(options.device)
    if options.codec == "patch-pca":
        folder = _fit_patch_pca(store_root, selection, batches, groups, by_source, options) if batches or existing is None \
            else store_root / CODEC_DIR
        recorded = None
    else:
        folder, recorded = Path(options.codec_source).resolve(), str(Path(options.codec_source).resolve())
    codecs = load_codec_set(folder, groups, device=device, precision=options.precision)
    info = codec_set_info(options.codec, codecs, recorded)
    store = LatentStore.create(store_root, info, NATIVE_MODE, groups, moment_shapes=moment_shapes(groups))
    report.codec = info.as_dict()
    spec = CodecSetSpec(options.codec, str(folder), device, options.precision, options.threads)
    settings = NativeEncodeSettings(str(store_root), spec, tuple(groups), options.encode_batch)
    total = sum(len(b) for b in batches)
    if progress:
        progress(0, total)
    products = _products_of(selection)
    tasks = []
    for batch in batches:
        items = _decode_items(selection, batch, todo)
        tasks.append((batch, {c: products[c] for c in batch},
                      [(m, by_source[m], shard, its) for (m, shard), its in items.items()]))
    for result in _run(tasks, settings, options):
        if result["shard"] and store.add_shard(result["shard"]):
            report.shards_written += 1
        report.cells_written += len(result["cells"])
        report.fragments_written += result["fragments"]
        report.quarantined.update(result["quarantined"])
        if progress:
            progress(report.cells_written + len(result["quarantined"]), total)
    _write_errors(store_root, report.quarantined, report.failed_modalities)
    return report


def _run(tasks, settings: NativeEncodeSettings, options: IngestOptions):
    """Decode and encode every batch, in this process or on Dask (:func:`pipelines.ingest.run_batches`)."""
    jobs = [((settings, batch, products), list(decodes)) for batch, products, decodes in tasks]
    yield from run_batches(jobs, options, encode_native_task, decode_native_task)
