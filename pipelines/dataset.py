"""Training sets by grid id: a self-contained, split subset of a latent store, and its
export to a Hugging Face ``datasets`` DatasetDict.

The split is by grid cell and spatially blocked: cells are grouped into blocks of
``block x block`` neighbouring Major TOM cells (by the row and column numbers of their ids,
about ``10 * block`` km on a side) and whole blocks are drawn, in a seeded order, into the
test split until it holds ``test_fraction`` of the cells. No cell is in both splits, and
neighbouring cells (which share terrain, land cover and often a product) mostly stay on one
side, so test scores are not inflated by spatial leakage. ``block=1`` gives a per-cell split.

The subset folder is itself a latent store (manifest, GeoParquet shards with an added
``split`` column, the codec), so ``train``, ``sample``, ``generate`` and ``evaluate`` accept
it; ``hf/`` holds the ``datasets`` export (``load_from_disk``, then ``push_to_hub``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from majortom_gen.errors import MajorTomGenError
from majortom_gen.splits import split_cells
from majortom_gen.staging import check_output, staged_folder
from majortom_gen.store import MOMENT_SHAPE, LatentStore, complete_rows, store_schema

SPLITS = ("train", "test")


@dataclass
class DatasetResult:
    out: Path
    cells: dict[str, list[str]]  # split -> cells
    fragments: dict[str, int]  # split -> fragments
    files: list[Path] = field(default_factory=list)


def build_dataset(store_dir: str | os.PathLike, out: str | os.PathLike, *, cells: Sequence[str] | None = None,
                  modalities: Sequence[str] | None = None, split: str = "spatial", test_fraction: float = 0.05,
                  seed: int = 0, block: int = 4, hf: bool = True, overwrite: bool = False) -> DatasetResult:
    """Write the subset of ``store_dir`` (the given cells, fragments having all of
    ``modalities``) with a ``split`` column to ``out``, and its ``datasets`` export to
    ``out/hf`` when ``hf``."""
    check_output(out, overwrite=overwrite, inputs=(store_dir,))
    store = LatentStore.open(store_dir)
    mods = list(modalities or store.modalities)
    unknown = [m for m in mods if m not in store.modalities]
    if unknown:
        raise MajorTomGenError(f"the store has no {unknown} (it has {store.modalities})")
    if split not in ("spatial", "random"):
        raise MajorTomGenError(f"--split must be spatial or random, got {split!r}")
    columns = [f.name for f in store_schema(mods)]
    table = store.table(columns, cells=cells)
    if cells is not None:
        absent = sorted(set(cells) - set(table.column("grid_cell").to_pylist()))
        if len(absent) == len(set(cells)):
            raise MajorTomGenError(f"none of the {len(set(cells))} selected cells is in the store {store_dir}")
    table = complete_rows(table, mods, "the selection")
    chosen = sorted(set(table.column("grid_cell").to_pylist()))
    train, test = split_cells(chosen, test_fraction, seed, block if split == "spatial" else 1)
    assignment = {**{c: "train" for c in train}, **{c: "test" for c in test}}
    table = table.append_column("split", pa.array([assignment[c] for c in table.column("grid_cell").to_pylist()],
                                                  pa.string()))
    by_split = {s: sorted(c for c, v in assignment.items() if v == s) for s in SPLITS}
    counts = {s: int(pc.sum(pc.equal(table.column("split"), s)).as_py() or 0) for s in SPLITS}
    final = Path(out)
    with staged_folder(final, overwrite=overwrite, inputs=(store_dir,), kind="dataset build") as tmp:
        subset = LatentStore.create(tmp, _codec_info(store), store.manifest["fragment_mode"], modalities=mods,
                                    moment_shapes=store.manifest.get("moment_shapes"))
        if store.codec_dir.is_dir():
            shutil.copytree(store.codec_dir, subset.codec_dir)
        subset.write_shard(table)
        subset.manifest["dataset"] = {"source_store": str(Path(store_dir).resolve()), "split": split,
                                      "test_fraction": test_fraction, "seed": seed,
                                      "block": block if split == "spatial" else 1, "cells": by_split, "fragments": counts}
        subset._write_manifest()
        files = [tmp / "manifest.json", *subset.shard_paths()]
        if hf:
            files.append(export_hf(table, tmp / "hf", mods, subset.manifest))
        (tmp / "README.md").write_text(_card(subset.manifest, mods))
        files.append(tmp / "README.md")
    return DatasetResult(final, by_split, counts, [final / f.relative_to(tmp) for f in files])


def _codec_info(store: LatentStore):
    from majortom_gen.store import CodecInfo

    c = store.codec
    return CodecInfo(c["name"], c["config_hash"], c["config"], source=c.get("source"))


def export_hf(table: pa.Table, folder: Path, modalities: Sequence[str], manifest: dict) -> Path:
    """A ``datasets.DatasetDict`` (train / test) saved with ``save_to_disk``. Latent moments
    are ``Array3D((8, 32, 32), float16)`` (mean: channels 0-3, log-variance: 4-7; a native
    store: each band group's moment shape, means first); the
    footprint is WKB in EPSG:4326 and the fragment's UTM transform is kept."""
    import datasets

    keep = ["grid_cell", "fragment_index", "centre_lat", "centre_lon", "utm_crs", "utm_transform", "geometry"]
    features = {"grid_cell": datasets.Value("string"), "fragment_index": datasets.Value("int8"),
                "centre_lat": datasets.Value("float64"), "centre_lon": datasets.Value("float64"),
                "utm_crs": datasets.Value("string"), "utm_transform": datasets.Sequence(datasets.Value("float64"), length=6),
                "geometry": datasets.Value("binary")}
    shapes = {m: tuple((manifest.get("moment_shapes") or {}).get(m, MOMENT_SHAPE)) for m in modalities}
    for m in modalities:
        keep += [f"{m}_product_id", m]
        features[f"{m}_product_id"] = datasets.Value("string")
        features[m] = datasets.Array3D(shape=shapes[m], dtype="float16")
    info = datasets.DatasetInfo(description=f"Major TOM latent moments ({manifest['codec']['name']} codec), "
                                "split by grid cell (spatially blocked) with majortom-gen",
                                features=datasets.Features(features))
    parts = {}
    datasets.disable_progress_bars()
    for s in SPLITS:
        rows = table.filter(pc.equal(table.column("split"), s)).select(keep)
        data = {k: rows.column(k).to_pylist() for k in keep if k not in modalities}
        for m in modalities:
            flat = rows.column(m).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            data[m] = np.asarray(flat, np.float16).reshape((-1,) + shapes[m])
        parts[s] = datasets.Dataset.from_dict(data, features=info.features, info=info, split=s)
    dd = datasets.DatasetDict(parts)
    dd.save_to_disk(str(folder))
    return folder


def _card(manifest: dict, modalities: Sequence[str]) -> str:
    d = manifest["dataset"]
    return "\n".join([
        "# Major TOM latent training set", "",
        f"Built by `majortom-gen dataset build` from `{d['source_store']}`: codec `{manifest['codec']['name']}` "
        f"({manifest['codec']['config_hash'][:12]}), modalities {', '.join(modalities)}.", "",
        f"Split `{d['split']}` by grid cell (blocks of {d['block']}x{d['block']} cells, seed {d['seed']}, test fraction "
        f"{d['test_fraction']}): train {len(d['cells']['train'])} cells / {d['fragments']['train']} fragments, "
        f"test {len(d['cells']['test'])} cells / {d['fragments']['test']} fragments. No cell is in both.", "",
        "- this folder is a latent store: `majortom-gen train --store .`, `evaluate`, `sample` accept it;",
        "- `shards/*.parquet` are GeoParquet (geometry = fragment footprint, EPSG:4326) with a `split` column;",
        "- `hf/` is a `datasets.DatasetDict`: `datasets.load_from_disk('hf')`, then `.push_to_hub(repo_id)`.", "",
        "Test cells: " + ", ".join(d["cells"]["test"]), ""])
