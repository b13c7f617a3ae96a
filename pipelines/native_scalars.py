"""The native family's scalar tokens for stored patches: where (the patch centre) and when (the
date between the S1 and S2 acquisitions), as COP-GEN computes them.

- ``3d_cartesian_lat_lon``: the patch centre (the store's ``centre_lat``/``centre_lon``, WGS84,
  from the patch's UTM window) as a unit vector. The official cache places patches on the
  cell's latitude/longitude box instead; the two centres differ by metres to tens of metres,
  well inside a 1920 m patch.
- ``mean_timestamps``: the midpoint of the cell's S1RTC and S2L2A acquisition times (the
  official ``precompute_time_mean.py``), falling back to S2L1C for S2, or to the one that exists.

Returned as moments (value, then a log-variance of -30: a draw is the value) so that they
travel with the band groups' latents through training unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from majortom_gen.errors import MajorTomGenError
from majortom_gen.native import encode_date, encode_lat_lon, get_band_group
from majortom_gen.store import LatentStore

SCALAR_LOGVAR = -30.0  # the moments' log-variance of a scalar token: no spread


def _timestamp_columns(store: LatentStore, source: str) -> list[str]:
    return [f"{m}_timestamp" for m in store.modalities if get_band_group(m).source == source]


def cell_dates(store: LatentStore, cells: Sequence[str]) -> dict[str, pd.Timestamp]:
    """Each cell's date token time: the midpoint of its S1RTC and S2 (L2A, else L1C) products'
    times, or the one it has; a cell with neither is an error naming it."""
    columns = {src: _timestamp_columns(store, src) for src in ("S1RTC", "S2L2A", "S2L1C")}
    wanted = [c for cols in columns.values() for c in cols]
    table = store.table(["grid_cell", *wanted], cells=list(set(cells))).to_pandas()
    out = {}
    for cell, rows in table.groupby("grid_cell"):
        times = {src: rows[cols].stack().min() if cols and rows[cols].notna().any().any() else None
                 for src, cols in columns.items()}
        s2 = times["S2L2A"] if times["S2L2A"] is not None else times["S2L1C"]
        found = [t for t in (times["S1RTC"], s2) if t is not None]
        if not found:
            raise MajorTomGenError(f"{cell}: no S1RTC or S2 acquisition time in the store: no date token")
        out[cell] = found[0] + (found[1] - found[0]) / 2 if len(found) == 2 else found[0]
    return out


def scalar_moments(store: LatentStore, name: str, grid_cell: np.ndarray, fragment_index: np.ndarray) -> np.ndarray:
    """float32 ``(N, 2, 1, 3)`` moments of the scalar token ``name`` for the rows (cell, patch index)."""
    kind = get_band_group(name)
    if not kind.is_scalar:
        raise ValueError(f"{name} is not a scalar token")
    values = np.zeros((len(grid_cell), 1, 1, 3), np.float32)
    if kind.encoding == "cartesian_xyz":
        table = store.table(["grid_cell", "fragment_index", "centre_lat", "centre_lon"],
                            cells=sorted(set(grid_cell.tolist()))).to_pandas()
        centres = {(c, int(f)): (lat, lon) for c, f, lat, lon in table.itertuples(index=False)}
        for i, key in enumerate(zip(grid_cell.tolist(), fragment_index.tolist())):
            values[i] = encode_lat_lon(*centres[key])
    else:
        dates = cell_dates(store, grid_cell.tolist())
        encoded = {c: encode_date(t.to_pydatetime()) for c, t in dates.items()}
        for i, c in enumerate(grid_cell.tolist()):
            values[i] = encoded[c]
    return np.concatenate([values, np.full_like(values, SCALAR_LOGVAR)], axis=1)
