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
