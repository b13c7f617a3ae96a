"""Ingest: Major TOM shards -> grid-indexed latent store, on Dask.

Plan: the selected products are grouped into batches of ``cells_per_shard`` cells (one
store shard each). For a batch, one *decode* task per (modality, shard file) opens that
file once and reads one row group per product (thumbnail column only; partial reads for
remote files), decodes and validates the thumbnails and cuts them into fragments. One
*encode* task per batch gathers them, encodes the fragments with the latent codec and
writes the store shard atomically. The client lists finished shards in the manifest.

Bad input never stops the run: a cell whose product cannot be read or decoded (corrupt or
truncated PNG, missing columns, wrong thumbnail size, all nodata, a missing file or row
group) is quarantined with the reason, listed in ``STORE/ingest-errors.jsonl`` and in the
report; every other cell is stored. A modality whose metadata cannot be read (its dataset
folder is there) *failed*: it is reported like quarantined cells, and the next run adds it.

What is already stored is skipped per (cell, modality): a cell is done for the modalities
it has, so a killed run started again ends with exactly the rows of an uninterrupted one, and
a run after a failed modality adds only that modality. The run holds the store's write lock
(``STORE/write.lock``) from planning to the last shard, so a second ingest of the same store
is refused instead of storing cells twice.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from majortom_gen.errors import DecodeError, MajorTomGenError, ShardError
from majortom_gen.formats import decode_thumbnail
from majortom_gen.fragments import cut_fragments, to_unit_range
from majortom_gen.georef import normalise_crs, product_box
from majortom_gen.grid import parse_cell_id
from majortom_gen.modalities import MODALITY_NAMES, get_modality
from majortom_gen.selection import Filters, Selection, select
from majortom_gen.staging import swap_in, write_text_atomic
from majortom_gen.store import CODEC_DIR, CellLatents, CodecInfo, LatentStore, cells_table, store_lock, write_shard_file

ERRORS_FILE = "ingest-errors.jsonl"


@dataclass(frozen=True)
class IngestOptions:
    """How to ingest. ``codec``: 'small-vae' (default, offline: the shipped learned codec, or
    the folder of one trained with ``majortom-gen codec train`` as ``codec_source``),
    'patch-pca' (linear, fitted on the first ``fit_cells`` cells) or 'sd-vae'
    (``codec_source``: hub id, folder or .pth). ``scheduler``: None for an embedded
    local cluster, 'synchronous' for no cluster (debugging), or a scheduler address."""

    codec: str = "small-vae"
    codec_source: str | None = None
    fragment_mode: str = "grid"
    cells_per_shard: int = 8
    scheduler: str | None = None
    workers: int | None = None
    threads: int = 1
    device: str = "auto"
    precision: str = "fp32"
    encode_batch: int = 32
    fit_cells: int = 4


@dataclass
class IngestReport:
    store: str
    cells_selected: int
    cells_already_stored: int
    cells_written: int = 0
    fragments_written: int = 0
    shards_written: int = 0
    quarantined: dict[str, str] = field(default_factory=dict)
    coverage: dict[str, int] = field(default_factory=dict)
    missing_modalities: dict[str, str] = field(default_factory=dict)  # not in the source (no dataset folder)
    failed_modalities: dict[str, str] = field(default_factory=dict)  # in the source, metadata unreadable
    codec: dict[str, Any] = field(default_factory=dict)
    codec_psnr_db: float | None = None
    seconds: float = 0.0

    @property
    def completed_with_errors(self) -> bool:
        return bool(self.quarantined or self.failed_modalities)


# ----------------------------------------------------------------------------- tasks
def thumbnail_fragments(modality: str, cell: str, crs: str, data: bytes, mode: str, item: str) -> np.ndarray:
    """Decode, validate and cut one product's thumbnail: uint8 ``(n, 256, 256, 3)``."""
    m = get_modality(modality)
    thumb = decode_thumbnail(data, item=item)
    side = thumb.shape[0]
    if thumb.shape[:2] != (side, side) or side not in (m.thumbnail_px, m.thumbnail_px + 1):
        raise DecodeError(f"{item}: thumbnail of {thumb.shape[1]}x{thumb.shape[0]} px, expected {m.thumbnail_px} px")
    if (thumb.ndim == 3) != (m.thumbnail_mode == "RGB"):
        raise DecodeError(f"{item}: thumbnail has {'3 bands' if thumb.ndim == 3 else '1 band'}, expected {m.thumbnail_mode}")
    if thumb.max() == 0:
        raise DecodeError(f"{item}: the product is entirely nodata (black thumbnail)")
    box = product_box(cell)
    if normalise_crs(crs, item=item) != box.crs:
        raise DecodeError(f"{item}: metadata crs {crs} differs from the cell's UTM zone {box.crs}")
    frags = cut_fragments(thumb, box.transform(10.0), box.crs, mode)
    return np.stack([f.pixels for f in frags])


def decode_task(modality: str, shard: str, items: list[tuple[str, int, str]], mode: str) -> dict[str, np.ndarray | str]:
    """Read the products ``items`` = [(cell, row_group, crs)] of one shard file (opened once)
    and cut their thumbnails. Returns {cell: fragments uint8 (n,256,256,3) | error text}."""
    from majortom_gen.sources import read_row_groups

    by_rg = defaultdict(list)
    for cell, rg, crs in items:
        by_rg[rg].append((cell, crs))
    out: dict[str, np.ndarray | str] = {}
    for rg, result in read_row_groups(shard, sorted(by_rg), ["grid_cell", "thumbnail"]):
        for cell, crs in by_rg[rg]:
            item = f"{modality} {cell} ({Path(str(shard)).name} row group {rg})"
            if isinstance(result, ShardError):
                out[cell] = f"{modality}: {result}"
                continue
            if result["grid_cell"] != cell:
                out[cell] = f"{item}: the row group holds cell {result['grid_cell']}, not {cell}"
                continue
            try:
                out[cell] = thumbnail_fragments(modality, cell, crs, result["thumbnail"], mode, item)
            except MajorTomGenError as exc:
                out[cell] = str(exc)
    return out


_CODECS: dict[tuple, Any] = {}


def _on_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class CodecSpec:
    """How an encode task opens the store's codec: ``name``, ``source`` (a codec folder, or an
    sd-vae's hub id, folder or weights file), ``device``, ``precision`` (fp32, fp16, bf16) and
    torch ``threads`` per Dask worker."""

    name: str
    source: str | None
    device: str
    precision: str
    threads: int


@dataclass(frozen=True)
class EncodeSettings:
    """What every encode task of one ingest shares: the store, the codec, the fragment mode,
    the images per codec call and the modalities of the store."""

    store_root: str
    codec: CodecSpec
    fragment_mode: str
    encode_batch: int
    modalities: tuple[str, ...]


def _worker_codec(spec: CodecSpec):
    """The codec, loaded once per worker process."""
    import torch

    from model.codecs import load_codec

    if _on_dask_worker():  # workers share the cores; in-process (synchronous) runs keep the caller's setting
        torch.set_num_threads(max(spec.threads, 1))
    key = (spec.name, spec.source, spec.device, spec.precision)
    if key not in _CODECS:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
        _CODECS[key] = load_codec(spec.name, spec.source, device=spec.device, dtype=dtype)
    return _CODECS[key]


def encode_task(settings: EncodeSettings, batch: list[str], products: dict[str, dict[str, tuple]],
                decoded: list[tuple[str, dict]]) -> dict[str, Any]:
    """Encode a batch of cells and write one store shard. Returns the shard name (None if
    nothing to write), the cells written and the cells quarantined with reasons."""
    import torch

    from majortom_gen.fragments import fragment_windows

    frags: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    quarantined: dict[str, str] = {}
    for modality, result in decoded:
        for cell, value in result.items():
            if isinstance(value, str):
                quarantined.setdefault(cell, value)
            else:
                frags[cell][modality] = value
    good = [c for c in batch if c not in quarantined and frags.get(c)]
    codec = _worker_codec(settings.codec)
    windows = fragment_windows(settings.fragment_mode)
    moments: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for modality in settings.modalities:
        cells = [c for c in good if modality in frags[c]]
        if not cells:
            continue
        stack = np.concatenate([frags[c][modality] for c in cells])  # (n_cells * n_frag, 256, 256, 3)
        parts = []
        for i in range(0, len(stack), settings.encode_batch):
            x = torch.from_numpy(to_unit_range(stack[i:i + settings.encode_batch]))
            parts.append(codec.encode_moments(x).numpy().astype(np.float16))
        enc = np.concatenate(parts).reshape(len(cells), len(windows), 8, 32, 32)
        for c, e in zip(cells, enc):
            moments[c][modality] = e
    latents = [CellLatents(c, windows, moments[c], products[c]) for c in good]
    name = write_shard_file(settings.store_root, cells_table(latents, settings.modalities)) if latents else None
    return {"shard": name, "cells": good, "fragments": len(good) * len(windows), "quarantined": quarantined}


# ----------------------------------------------------------------------------- planning
def plan_modalities(selection: Selection, stored: dict[str, set[str]]) -> dict[str, set[str]]:
    """``{cell: modalities to ingest}``: the selected products' modalities not yet stored for
    the cell (cells with nothing to add are left out)."""
    todo: dict[str, set[str]] = defaultdict(set)
    for cell, modality in zip(selection.products["grid_cell"], selection.products["modality"]):
        if modality not in stored.get(cell, ()):
            todo[cell].add(modality)
    return dict(todo)


def plan_batches(cells: Iterable[str], cells_per_shard: int) -> list[list[str]]:
    """``cells`` in batches, ordered so neighbouring cells (hence the same shard files) share
    a batch."""
    todo = sorted(set(cells), key=parse_cell_id)
    return [todo[i:i + cells_per_shard] for i in range(0, len(todo), cells_per_shard)]


def _products_of(selection: Selection) -> dict[str, dict[str, tuple]]:
    out: dict[str, dict[str, tuple]] = defaultdict(dict)
    for r in selection.products.itertuples(index=False):
        ts = None if pd.isna(r.timestamp) else pd.Timestamp(r.timestamp)
        out[r.grid_cell][r.modality] = (r.product_id if isinstance(r.product_id, str) else None, ts)
    return out


def _decode_items(selection: Selection, batch: list[str], todo: dict[str, set[str]] | None = None
                  ) -> dict[tuple[str, str], list[tuple[str, int, str]]]:
    """The products to read for ``batch`` (only the modalities in ``todo[cell]`` when given),
    grouped by (modality, shard file)."""
    rows = selection.products[selection.products["grid_cell"].isin(batch)]
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for r in rows.itertuples(index=False):
        if todo is None or r.modality in todo.get(r.grid_cell, ()):
            groups[(r.modality, r.shard)].append((r.grid_cell, int(r.parquet_row), r.crs))
    return groups


def split_missing(source: str | os.PathLike, missing: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(failed, absent)`` of the modalities a selection could not read: a modality whose
    dataset folder is in the source but whose metadata is unreadable *failed* (a fault to report
    and retry); one the source does not have is *absent*."""
    from majortom_gen.sources import dataset_root

    failed, absent = {}, {}
    for modality, why in missing.items():
        try:
            dataset_root(modality, source)
        except MajorTomGenError:
            absent[modality] = why
            continue
        failed[modality] = why
    return failed, absent


# ----------------------------------------------------------------------------- codec
def read_fragments(selection: Selection, cells: list[str], mode: str = "grid") -> dict[str, dict[str, np.ndarray]]:
    """The thumbnail fragments of ``cells`` in this process: ``{modality: {cell: uint8
    (n, 256, 256, 3)}}``; products that cannot be read or decoded are left out."""
    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for (modality, shard), items in _decode_items(selection, cells).items():
        for cell, value in decode_task(modality, shard, items, mode).items():
            if not isinstance(value, str):
                out[modality][cell] = value
    return dict(out)


def _device(option: str) -> str:
    if option != "auto":
        return option
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_codec(store_root: Path, selection: Selection, batches: list[list[str]],
                  options: IngestOptions) -> tuple[CodecSpec, CodecInfo, float | None]:
    """The codec for a store: how workers open it, what the manifest records, and the
    reconstruction PSNR (dB) of the first cells when it was set up now (else None).

    small-vae and patch-pca are kept with the store (``STORE/codec``): small-vae copied from
    ``codec_source`` (default: the shipped one), patch-pca copied from ``codec_source`` or
    fitted on the first ``fit_cells`` cells. sd-vae is loaded from ``codec_source`` and recorded
    by its hash and its source (so later commands need not be given it again)."""
    from model.codecs import CODEC_NAMES, CODEC_RECORD, load_codec

    if options.codec not in CODEC_NAMES:
        raise MajorTomGenError(f"unknown codec {options.codec!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    device = _device(options.device)
    if options.codec == "sd-vae":
        given = options.codec_source or _existing_source(store_root)
        if given is None:
            raise MajorTomGenError("--codec sd-vae needs --codec-source (hub id, folder, or autoencoder_kl.pth,"
                                   "autoencoder_kl_ema.pth)")
        source = _recorded_source(given)
        info = load_codec("sd-vae", source).info()
        return (CodecSpec("sd-vae", source, device, options.precision, options.threads),
                CodecInfo(info["name"], info["config_hash"], info["config"], source=source), None)
    folder = store_root / CODEC_DIR
    psnr = None
    if not (folder / CODEC_RECORD).exists():
        first = [c for b in batches for c in b][: max(options.fit_cells, 1)]
        psnr = _set_up_store_codec(folder, read_fragments(selection, first, options.fragment_mode), options)
    info = load_codec(options.codec, str(folder)).info()
    on = device if options.codec == "small-vae" else "cpu"
    return (CodecSpec(options.codec, str(folder), on, options.precision, options.threads),
            CodecInfo(info["name"], info["config_hash"], info["config"]), psnr)


def _existing_source(store_root: Path) -> str | None:
    """The codec source an existing store recorded (None for a new store or none recorded)."""
    return LatentStore.open(store_root).codec.get("source") if (store_root / "manifest.json").exists() else None


def _recorded_source(source: str) -> str:
    """An sd-vae source as the manifest records it: local paths made absolute (each of
    ``ENCODE,DECODE``), hub ids as given."""
    parts = [part.strip() for part in source.split(",")]
    return ",".join(str(Path(part).resolve()) if Path(part).exists() else part for part in parts)


def _set_up_store_codec(folder: Path, fragments: dict[str, dict[str, np.ndarray]], options: IngestOptions) -> float:
    """Write the store's copy of a small-vae or patch-pca codec to ``folder`` (whole or not at
    all); returns its reconstruction PSNR (dB) on the fragments of the first cells."""
    import shutil

    import torch

    from model.codecs import SHIPPED_CODEC, fit_patch_pca, load_codec, reconstruction_psnr

    images = {m: torch.from_numpy(to_unit_range(np.concatenate(list(frags.values())))) for m, frags in fragments.items()}
    if not images:
        raise MajorTomGenError(f"cannot set up the {options.codec} codec: no readable product among the first cells")
    for stale in folder.parent.glob(".codec-*.tmp"):  # left by a killed run (the caller holds the write lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".codec-{uuid.uuid4().hex}.tmp"
    if options.codec == "patch-pca" and options.codec_source is None:
        codec, psnr = fit_patch_pca(images)
        codec.save(tmp)
        swap_in(tmp, folder)
        return psnr
    # small-vae (default: the shipped one) or an existing patch-pca fit (e.g. a training store's)
    source = Path(options.codec_source) if options.codec_source else SHIPPED_CODEC
    codec = load_codec(options.codec, source)  # checks that it is one
    shutil.copytree(source, tmp)
    swap_in(tmp, folder)
    return reconstruction_psnr(codec, torch.cat([x[:8] for x in images.values()]))


def _client(options: IngestOptions):
    from dask.distributed import Client

    from pipelines.local_cluster import local_cluster

    if options.scheduler and options.scheduler != "synchronous":
        return Client(options.scheduler), None
    cluster = local_cluster(options.workers or max(os.cpu_count() or 1, 1), options.threads)
    return Client(cluster), cluster


def ingest(
    source: str | os.PathLike,
    cells: list[str],
    store_root: str | os.PathLike,
    options: IngestOptions = IngestOptions(),
    *,
    modalities: tuple[str, ...] = MODALITY_NAMES,
    filters: Filters = Filters(),
    rule: str = "least-cloudy",
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Ingest ``cells`` of the Major TOM data under ``source`` into the store at ``store_root``,
    holding the store's write lock (:class:`~majortom_gen.store.StoreLockedError` if another
    writer holds it).

    ``progress(cells_done, cells_total)`` is called as batches finish."""
    start = time.perf_counter()
    store_root = Path(store_root)
    selection = select(source, cells, modalities, filters, rule)
    new_folder = not store_root.exists()
    store_root.mkdir(parents=True, exist_ok=True)
    try:
        with store_lock(store_root, "ingest"):
            report = _ingest_locked(source, selection, cells, store_root, options, modalities, progress)
    finally:
        if new_folder and store_root.is_dir() and not any(store_root.iterdir()):
            store_root.rmdir()  # nothing was stored: leave no empty folder behind
    report.seconds = time.perf_counter() - start
    return report


def _ingest_locked(source, selection: Selection, cells: list[str], store_root: Path, options: IngestOptions,
                   modalities: tuple[str, ...], progress: Callable[[int, int], None] | None) -> IngestReport:
    """The body of :func:`ingest`, run under the store's write lock: plan, set up the codec and
    the store, encode the batches, record what failed."""
    existing = LatentStore.open(store_root) if (store_root / "manifest.json").exists() else None
    stored = existing.cell_modalities() if existing else {}
    todo = plan_modalities(selection, stored)
    batches = plan_batches(todo, options.cells_per_shard)
    report = _start_report(source, selection, cells, store_root, stored, todo)
    if existing is None and not batches:
        raise MajorTomGenError("nothing to ingest: none of the selected cells has a product")
    codec_spec, codec_info, psnr = prepare_codec(store_root, selection, batches, options)
    store = LatentStore.create(store_root, codec_info, options.fragment_mode, modalities)
    report.codec, report.codec_psnr_db = codec_info.as_dict(), psnr
    settings = EncodeSettings(str(store_root), codec_spec, options.fragment_mode, options.encode_batch, tuple(modalities))
    total = sum(len(b) for b in batches)
    if progress:
        progress(0, total)

    def finish(result: dict) -> None:
        if result["shard"] and store.add_shard(result["shard"]):
            report.shards_written += 1
        report.cells_written += len(result["cells"])
        report.fragments_written += result["fragments"]
        report.quarantined.update(result["quarantined"])
        if progress:
            progress(report.cells_written + len(result["quarantined"]), total)

    products = _products_of(selection)
    tasks = [(batch, {c: {m: p for m, p in products[c].items() if m in todo[c]} for c in batch},
              _decode_items(selection, batch, todo)) for batch in batches]
    for result in _run_encode_tasks(tasks, settings, options):
        finish(result)
    _write_errors(store_root, report.quarantined, report.failed_modalities)
    return report


def _start_report(source, selection: Selection, cells: list[str], store_root: Path, stored: dict[str, set[str]],
                  todo: dict[str, set[str]]) -> IngestReport:
    """The report before any encoding: cells already stored, modalities missing or failed at
    the source, cells without any product (quarantined)."""
    failed, absent = split_missing(source, selection.missing)
    already = [c for c in dict.fromkeys(cells) if c in stored and c not in todo]
    report = IngestReport(str(store_root), len(cells), len(already), coverage=selection.coverage(),
                          missing_modalities=absent, failed_modalities=failed)
    with_products = set(selection.products["grid_cell"])
    for c in cells:
        if c not in with_products:
            report.quarantined[c] = "no product of any modality matches this cell and the filters"
    return report


def _run_encode_tasks(tasks: list[tuple[list[str], dict, dict]], settings: EncodeSettings, options: IngestOptions):
    """Decode and encode every batch (``(cells, their products to store, {(modality, shard):
    items} to decode)``): see :func:`run_batches`."""
    mode = settings.fragment_mode
    jobs = [((settings, batch, wanted), [(m, shard, its, mode) for (m, shard), its in items.items()])
            for batch, wanted, items in tasks]
    yield from run_batches(jobs, options, encode_task, _tagged_decode)


def run_batches(jobs: list[tuple[tuple, list[tuple]]], options: IngestOptions, encode: Callable, decode: Callable):
    """For each job ``(encode_args, [decode_args, ...])``: ``encode(*encode_args, [decode(*a)
    for a in decode_args])``, in this process (``scheduler='synchronous'``) or on Dask (the
    decodes feeding the encode task of their batch); yields each result as it finishes."""
    if options.scheduler == "synchronous":
        for encode_args, decodes in jobs:
            yield encode(*encode_args, [decode(*args) for args in decodes])
        return
    if not jobs:
        return
    from dask.distributed import as_completed

    client, cluster = _client(options)
    try:
        futures = [client.submit(encode, *encode_args, [client.submit(decode, *args, pure=False) for args in decodes],
                                 pure=False)
                   for encode_args, decodes in jobs]
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _tagged_decode(modality: str, shard: str, items: list, mode: str) -> tuple[str, dict]:
    return modality, decode_task(modality, shard, items, mode)


def _write_errors(store_root: Path, quarantined: dict[str, str], failed: dict[str, str]) -> None:
    """``ingest-errors.jsonl``: one line per failed modality (``{"modality", "reason"}``), then
    one per quarantined cell (``{"grid_cell", "reason"}``)."""
    lines = [json.dumps({"modality": m, "reason": r}) for m, r in sorted(failed.items())]
    lines += [json.dumps({"grid_cell": c, "reason": r}) for c, r in sorted(quarantined.items())]
    write_text_atomic(store_root / ERRORS_FILE, "".join(line + "\n" for line in lines))
