"""Grid lookups: ``Grid.cells_at`` points/s and ``Grid.cells_in`` for a 100 km x 100 km
polygon, each against a naive per-item baseline measured in the same run.

    python benchmarks/bench_grid.py [--points 20000] [--repeat 5] [--quick]

Figures are printed as ratios to the baseline (these machines are noisy; absolute times
are printed for reference only). ``--quick`` (CI): 1,000 points, one repeat.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import shapely
from pyproj import Geod

from majortom_gen.grid import Grid, format_cell_id


def naive_cells_at(grid: Grid, lats, lons) -> list[str]:
    """Per point: find the row, then the column, with Python-level work per point (the
    shape of the reference's per-point lookup, minus its pandas filtering)."""
    out = []
    row_lats = grid.row_latitudes
    for lat, lon in zip(lats, lons):
        pos = max(int(np.searchsorted(row_lats, lat)) - 1, 0)
        row_u = pos - int(np.searchsorted(row_lats, 0))
        row_lons = grid.row_longitudes(row_u)
        c = int(np.searchsorted(row_lons, lon)) - 1
        zeroth = int(np.flatnonzero(row_lons == 0)[0])
        out.append(format_cell_id(row_u, (c if c >= 0 else len(row_lons) - 1) - zeroth))
    return out


def naive_cells_in(grid: Grid, polygon) -> list[str]:
    """Every cell of every row in the polygon's latitude band, one footprint at a time."""
    w, s, e, n = polygon.bounds
    out = []
    lats = grid.row_latitudes
    z = int(np.searchsorted(lats, 0))
    for pos in range(max(int(np.searchsorted(lats, s)) - 1, 0), int(np.searchsorted(lats, n))):
        row_u = pos - z
        lons = grid.row_longitudes(row_u)
        zc = int(np.flatnonzero(lons == 0)[0])
        for c in range(len(lons)):
            if not (w - 1 <= lons[c] <= e + 1):
                continue
            cell = format_cell_id(row_u, c - zc)
            fp = grid.footprint(cell)
            if fp.intersects(polygon) and not fp.touches(polygon):
                out.append(cell)
    return sorted(out)


def square_polygon(lat: float, lon: float, side_km: float):
    geod = Geod(ellps="WGS84")
    h = side_km * 1000 / 2 * math.sqrt(2)
    corners = [geod.fwd(lon, lat, az, h)[:2] for az in (45, 135, 225, 315)]
    return shapely.Polygon(corners)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1,000 points, one repeat (CI)")
    args = ap.parse_args()
    if args.quick:
        args.points, args.repeat = 1_000, 1
    grid = Grid(10)
    rng = np.random.default_rng(0)
    # a continental-scale scatter (Europe), as an ingest selection would be
    lats, lons = rng.uniform(35, 70, args.points), rng.uniform(-10, 40, args.points)
    grid.cells_at(lats, lons)  # warm the row cache for both methods alike
    assert grid.cells_at(lats[:500], lons[:500]) == naive_cells_at(grid, lats[:500], lons[:500])

    t_vec = best_of(lambda: grid.cells_at(lats, lons), args.repeat)
    n_naive = min(args.points, 5_000)
    t_naive = best_of(lambda: naive_cells_at(grid, lats[:n_naive], lons[:n_naive]), max(1, args.repeat // 2))
    rate_vec, rate_naive = args.points / t_vec, n_naive / t_naive
    print(f"cells_at: {rate_vec:,.0f} points/s vs naive per-point {rate_naive:,.0f} points/s "
          f"-> {rate_vec / rate_naive:.1f}x the baseline ({args.points} points in {t_vec * 1e3:.1f} ms)")

    poly = square_polygon(45.07, 7.69, 100.0)
    assert grid.cells_in(poly) == naive_cells_in(grid, poly)
    t_in = best_of(lambda: grid.cells_in(poly), args.repeat)
    t_in_naive = best_of(lambda: naive_cells_in(grid, poly), max(1, args.repeat // 2))
    n_cells = len(grid.cells_in(poly))
    print(f"cells_in 100x100 km polygon ({n_cells} cells): {t_in * 1e3:.1f} ms vs naive {t_in_naive * 1e3:.1f} ms "
          f"-> {t_in_naive / t_in:.1f}x faster than the baseline")


if __name__ == "__main__":
    main()
