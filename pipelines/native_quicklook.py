"""Quick-look PNGs of native generations: one per cell, labelled panels on fixed scales, so a
generated raster and the stored one compare by eye (not per-image stretched like Core
thumbnails, which would hide a wrong level).

- DEM: terrain colours over one elevation range per row (the stored raster's 1st-99th
  percentiles, at least 10 m; without one, the samples'), labelled with the mean in metres;
- S1: VV in dB, grey from -25 to 0 dB;
- S2 groups with B04, B03, B02: true colour by the Core thumbnail formula; other S2 groups:
  their first band, grey over reflectance 0-0.5;
- classes: their colour table.

Rows: the conditions (decoded from the store), then per generated group the stored raster
(when the store has the group for the cell: its codec's reconstruction), each sample, and
with several samples their mean and per-pixel spread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from majortom_gen.native import BandGroup
from majortom_gen.native_export import CLOUD_COLOURS, LULC_COLOURS
from majortom_gen.thumbnails import s2_thumbnail
from pipelines.quicklook import write_quicklook

S1_DB_RANGE = (-25.0, 0.0)


def _grey(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    v = np.clip((np.nan_to_num(x, nan=lo) - lo) / max(hi - lo, 1e-9), 0, 1)
    return np.repeat((v * 255).astype(np.uint8)[..., None], 3, axis=-1)


def view(group: BandGroup, values: np.ndarray, elevation: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 ``(H, W, 3)`` of physical ``values`` ``(bands, H, W)`` on the group's fixed scale."""
    from matplotlib import colormaps

    if group.encoding == "log1p":
        lo, hi = elevation or (float(np.nanmin(values)), float(np.nanmax(values)))
        v = np.clip((np.nan_to_num(values[0], nan=lo) - lo) / max(hi - lo, 1e-9), 0, 1)
        return (colormaps["terrain"](0.25 + 0.75 * v)[..., :3] * 255).astype(np.uint8)
    if group.encoding == "log_db":
        return _grey(10 * np.log10(np.maximum(values[0], group.min_positive)), *S1_DB_RANGE)
    if group.encoding == "reflectance":
        if {"B04", "B03", "B02"} <= set(group.bands):
            b = {name: np.nan_to_num(values[i]) for i, name in enumerate(group.bands)}
            return s2_thumbnail(b["B04"], b["B03"], b["B02"])
        return _grey(values[0] / 10000.0, 0.0, 0.5)
    if group.encoding == "one_hot":
        table = LULC_COLOURS if group.source == "LULC" else CLOUD_COLOURS
        lut = np.zeros((256, 3), np.uint8)
        for value, rgba in table.items():
            lut[value] = rgba[:3]
        return lut[values[0].astype(np.uint8)]
    raise ValueError(f"{group.name}: no quick-look for {group.encoding!r}")


def _label(group: BandGroup, what: str, values: np.ndarray) -> str:
    if group.encoding == "log1p":
        return f"{group.name} {what}: {np.nanmean(values):.0f} m mean"
    if group.encoding == "log_db":
        return f"{group.name} {what}: VV {np.nanmean(10 * np.log10(np.maximum(values[0], group.min_positive))):.1f} dB"
    return f"{group.name} {what}"


def write_native_quicklook(path: Path, cell: str, conditions: Mapping[str, tuple[BandGroup, np.ndarray]],
                           generated: Mapping[str, tuple[BandGroup, Sequence[np.ndarray], np.ndarray | None]]) -> Path:
    """The PNG of one cell: ``conditions`` {name: (group, values)}; ``generated`` {name: (group,
    samples, stored values or None)}; all physical ``(bands, H, W)`` rasters of the product grid."""
    rows = [[(_label(g, "condition", v), view(g, v)) for g, v in conditions.values()]]
    for group, samples, stored in generated.values():
        elevation = None
        if group.encoding == "log1p":  # the stored DEM's range (the reference), else the samples'
            pool = stored.ravel() if stored is not None else np.concatenate([s.ravel() for s in samples])
            lo, hi = (float(q) for q in np.nanpercentile(pool, [1, 99]))
            elevation = (lo, max(hi, lo + 10.0))
        row = [(_label(group, "stored", stored), view(group, stored, elevation))] if stored is not None else []
        row += [(_label(group, f"sample {k}", s), view(group, s, elevation)) for k, s in enumerate(samples)]
        if len(samples) > 1 and group.encoding != "one_hot":
            mean = np.mean(samples, axis=0)
            row.append((_label(group, "mean", mean), view(group, mean, elevation)))
        rows.append(row)
    return write_quicklook(path, f"{cell}: native generation (fixed scales: DEM terrain colours per row, S1 VV "
                                 f"{S1_DB_RANGE[0]:.0f}..{S1_DB_RANGE[1]:.0f} dB, S2 true colour)", rows)
