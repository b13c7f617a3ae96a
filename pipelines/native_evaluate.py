"""What conditioning buys in the native family, in physical units (#14).

For held-out cells of a native store, each target band group is generated (every patch,
assembled on the product grid) under several condition sets and compared with the real
product read from the Core source, in the units an analyst uses:

- DEM: mean absolute error in metres;
- S1: mean absolute error in dB (both polarisations);
- S2: mean absolute error in reflectance (DN / 10000).

Each condition set's error is reported beside the same cells' unconditional error (the
network's other modalities marginalised) as a relative change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from majortom_gen.errors import MajorTomGenError
from majortom_gen.native import get_band_group, raster_px
from majortom_gen.selection import select
from majortom_gen.sources import decode_band, read_product
from pipelines.native_sample import NativeSampling, sample_native


def real_product(source: str | os.PathLike, cell: str, group: str) -> np.ndarray:
    """The real ``(bands, S, S)`` physical values of ``group`` for ``cell`` (the product the
    default selection rule picks), cropped to the product grid."""
    g = get_band_group(group)
    selection = select(source, [cell], (g.source,))
    rows = selection.products[selection.products["grid_cell"] == cell]
    if rows.empty:
        raise MajorTomGenError(f"{cell}: no {g.source} product under {source}")
    row = rows.iloc[0]
    product = read_product(row["shard"], int(row["parquet_row"]), list(g.bands))
    side = raster_px(g)
    return np.stack([decode_band(product, b).array[:side, :side] for b in g.bands]).astype(np.float32)


def physical_error(group: str, generated: np.ndarray, real: np.ndarray) -> float:
    """Mean absolute error in the group's analysis unit (metres, dB, reflectance) over the
    pixels that are valid in both (finite; S1 and S2 > 0)."""
    g = get_band_group(group)
    gen, ref = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    valid = np.isfinite(gen) & np.isfinite(ref)
    if g.encoding == "log_db":
        valid &= (gen > 0) & (ref > 0)
        gen, ref = 10 * np.log10(np.where(valid, gen, 1)), 10 * np.log10(np.where(valid, ref, 1))
    elif g.encoding == "reflectance":
        valid &= ref > 0
        gen, ref = gen / 10000.0, ref / 10000.0
    if not valid.any():
        raise MajorTomGenError(f"{group}: no valid pixel to compare")
    return float(np.abs(gen - ref)[valid].mean())


UNITS = {"log1p": "m", "log_db": "dB", "reflectance": "reflectance"}


def evaluate_native(model_dir, store_dir, source, cells: Sequence[str], target: str,
                    condition_sets: Mapping[str, Sequence[str]], options: NativeSampling = NativeSampling(),
                    seeds: Sequence[int] = (0,)) -> dict[str, dict[str, float]]:
    """``{condition set name: {"error": mean over cells, samples and seeds, "change": relative
    to the unconditional row}}`` for ``target``; the unconditional row (``"none"``) is
    always measured. Errors in :data:`UNITS` of the target's encoding."""
    sets = {"none": [], **{k: list(v) for k, v in condition_sets.items()}}
    real = {c: real_product(source, c, target) for c in cells}
    out: dict[str, dict[str, float]] = {}
    for name, cond in sets.items():
        errors = []
        for seed in seeds:
            res = sample_native(model_dir, store_dir, cells, cond, [target], None, replace(options, seed=seed))
            errors += [physical_error(target, res.rasters[(c, target, s)][0], real[c])
                       for c in cells for s in range(options.n_samples)]
        out[name] = {"error": float(np.mean(errors))}
    base = out["none"]["error"]
    for row in out.values():
        row["change"] = row["error"] / base - 1.0 if base else float("nan")
    return out


TOKEN_ALIASES = {"location": "3d_cartesian_lat_lon", "date": "mean_timestamps"}


def parse_native_conditions(text: str, modalities: Sequence[str]) -> dict[str, list[str]]:
    """Condition sets from ``none,location+date,S2L2A+location+date``: a term is a band group,
    a Core modality (every band group of it the model takes), ``location`` or ``date``;
    ``none`` is the unconditional row. Returns {the set as written: its modalities}."""
    out: dict[str, list[str]] = {}
    for chunk in (c.strip() for c in text.split(",")):
        if not chunk or chunk.lower() == "none":
            continue
        names: list[str] = []
        for term in (t.strip() for t in chunk.split("+")):
            found = ([TOKEN_ALIASES[term.lower()]] if term.lower() in TOKEN_ALIASES
                     else [m for m in modalities if get_band_group(m).source == term]
                     or [get_band_group(term).name])
            names += [m for m in found if m not in names]
        unknown = [m for m in names if m not in modalities]
        if unknown:
            raise MajorTomGenError(f"condition {chunk!r}: the model does not take {unknown}")
        out[chunk] = names
    return out


def run_native_evaluate(model_dir, store_dir, out, *, conditions: str, generate: Sequence[str] | None,
                        real_source: str | None, split: str = "test", options: NativeSampling = NativeSampling(),
                        seeds: Sequence[int] = (0,), max_cells: int | None = None, overwrite: bool = False) -> dict:
    """``evaluate`` on a native store: for the held-out cells (``split='test'``: the store's
    cells the model was not trained on; ``all``), each generated group's error in physical
    units against the real product in ``real_source``, per condition set and against the
    unconditional row; ``metrics.json`` and ``table.md`` in ``out``."""
    import json
    from pathlib import Path

    from majortom_gen.staging import staged_folder
    from majortom_gen.store import LatentStore
    from model.uvit import MultiModalUViT

    if not real_source:
        raise MajorTomGenError("evaluate on a native store compares with the real products: give --real-source "
                               "(the Major TOM folder or URL the store was ingested from)")
    modalities = MultiModalUViT.load_config(model_dir)["modalities"]
    sets = parse_native_conditions(conditions, modalities)
    targets = list(generate) if generate else [m for m in modalities if get_band_group(m).source in ("DEM", "S1RTC")]
    store = LatentStore.open(store_dir)
    cells = sorted(store.stored_cells())
    if split == "test":
        record = Path(model_dir) / "training_data.json"
        trained = set(json.loads(record.read_text()).get("train_cells") or []) if record.is_file() else set()
        cells = [c for c in cells if c not in trained]
    elif split != "all":
        raise MajorTomGenError(f"--split for a native store: test or all, got {split!r}")
    if not cells:
        raise MajorTomGenError(f"{store_dir}: no cell to evaluate (every cell was seen in training; --split all?)")
    cells = cells[:max_cells] if max_cells else cells
    results = {}
    for target in targets:
        usable = {k: kept for k, v in sets.items() if (kept := [m for m in v if m != target])}
        results[target] = evaluate_native(model_dir, store_dir, real_source, cells, target, usable, options, seeds)
    lines = [f"# Native evaluation: {len(cells)} cells, {options.steps} steps, guidance {options.guidance}, "
             f"{len(seeds)} seed(s) x {options.n_samples} sample(s)", "",
             "| generated | conditions | mean absolute error | unit | change vs unconditional |", "|---|---|---|---|---|"]
    for target, rows in results.items():
        unit = UNITS.get(get_band_group(target).encoding, "")
        for name, row in rows.items():
            lines.append(f"| {target} | {name} | {row['error']:.3f} | {unit} | {row['change'] * 100:+.1f}% |")
    with staged_folder(out, overwrite=overwrite, inputs=(store_dir, model_dir), kind="evaluate") as tmp:
        (tmp / "metrics.json").write_text(json.dumps({"cells": cells, "results": results}, indent=1))
        (tmp / "table.md").write_text("\n".join(lines) + "\n")
    return {"cells": cells, "results": results, "table": "\n".join(lines)}
