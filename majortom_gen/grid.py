"""The Major TOM grid (Francis & Czerkawski 2024), exact to ESA's reference ``grid.py``.

Rows are lines of constant latitude every ``180/N`` degrees with ``N = ceil(pi*R/dist)``;
each row is cut into ``n = ceil(2*pi*R*cos(lat)/dist)`` columns every ``360/n`` degrees.
A cell is named by its south-west grid point: ``"{row}{U|D}_{col}{R|L}"``, e.g.
``433U_1047R``. Latitudes and longitudes are built with the reference's numpy operations
so that they are bit-identical to it.

Differences to the reference, on purpose:

- the default latitude range is the whole lattice, [-90, 90) (Core-DEM has cells south
  of -85); the reference keeps [-85, 85];
- points outside the lattice raise :class:`OutsideGridError` (the reference silently
  maps them to the top row); a point exactly on the lowest row line belongs to the lowest
  row since there is no cell south of it;
- the footprint of a single-column row (the pole row) spans 360 degrees.

All coordinates are WGS84 degrees (EPSG:4326).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from majortom_gen.errors import InvalidCellIdError, OutsideGridError, RegionError
from majortom_gen.regions import bbox_geometry, check_region

RADIUS_EQUATOR_KM = 6378.137
_CELL_ID = re.compile(r"^(\d+)([UD])_(\d+)([RL])$")

__all__ = [
    "Grid",
    "RADIUS_EQUATOR_KM",
    "format_cell_id",
    "parse_cell_id",
    "utm_epsg_at",
]


def parse_cell_id(cell_id: str) -> tuple[int, int]:
    """Split ``'433U_1047R'`` into signed ``(grid_row_u, grid_col_r)`` = ``(433, 1047)``.

    ``D`` rows and ``L`` columns are negative. Checks the syntax only; use
    :meth:`Grid.check_cell` to check that the row and column exist.
    """
    if not isinstance(cell_id, str):
        raise InvalidCellIdError(f"grid cell id must be a string like '433U_1047R', got {cell_id!r}")
    m = _CELL_ID.match(cell_id.strip())
    if m is None:
        raise InvalidCellIdError(
            f"malformed grid cell id {cell_id!r}: expected '<row>U|D_<col>R|L', e.g. '433U_1047R'"
        )
    row, ud, col, rl = int(m[1]), m[2], int(m[3]), m[4]
    if ud == "D" and row == 0:
        raise InvalidCellIdError(f"malformed grid cell id {cell_id!r}: row '0D' does not exist (the equator row is '0U')")
    if rl == "L" and col == 0:
        raise InvalidCellIdError(f"malformed grid cell id {cell_id!r}: column '0L' does not exist (the Greenwich column is '0R')")
    return (row if ud == "U" else -row), (col if rl == "R" else -col)


def format_cell_id(grid_row_u: int, grid_col_r: int) -> str:
    """``(433, -12)`` -> ``'433U_12L'``."""
    row = f"{grid_row_u}U" if grid_row_u >= 0 else f"{-grid_row_u}D"
    col = f"{grid_col_r}R" if grid_col_r >= 0 else f"{-grid_col_r}L"
    return f"{row}_{col}"


def utm_epsg_at(lat: float, lon: float) -> int:
    """UTM EPSG code (326zz north, 327zz south) at a point, with the Norway and Svalbard
    exceptions, as the reference's ``get_utm_zone_from_latlng``."""
    zone = (math.floor((lon + 180) / 6)) % 60 + 1
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        zone = 32
    elif 72.0 <= lat < 84.0:
        if 0.0 <= lon < 9.0:
            zone = 31
        elif 9.0 <= lon < 21.0:
            zone = 33
        elif 21.0 <= lon < 33.0:
            zone = 35
        elif 33.0 <= lon < 42.0:
            zone = 37
    return (32700 if lat < 0 else 32600) + zone


class Grid:
    """The Major TOM grid for a cell size ``dist_km`` (10 km for the Core datasets).

    ``latitude_range`` keeps the rows whose southern line lies in [lo, hi] (inclusive, as
    the reference); filtering never renames rows.
    """

    def __init__(self, dist_km: float = 10.0, latitude_range: tuple[float, float] = (-90.0, 90.0)) -> None:
        if not (isinstance(dist_km, (int, float)) and math.isfinite(dist_km) and dist_km > 0):
            raise ValueError(f"dist_km must be a positive number of kilometres, got {dist_km!r}")
        lo, hi = latitude_range
        if not (-90.0 <= lo < hi <= 90.0):
            raise ValueError(f"latitude_range must satisfy -90 <= lo < hi <= 90, got {latitude_range!r}")
        self.dist_km = float(dist_km)
        self.latitude_range = (float(lo), float(hi))

        # Rows, exactly as the reference builds them (numpy ops matter for bit-identity).
        n_lines = math.ceil(math.pi * RADIUS_EQUATOR_KM / dist_km)
        lats = np.linspace(-90, 90, n_lines + 1)[:-1]
        lats = np.sort(np.mod(lats, 180) - 90)
        zeroth = int(np.searchsorted(lats, 0))
        row_u = np.arange(len(lats)) - zeroth
        keep = (lats >= lo) & (lats <= hi)
        if not keep.any():
            raise ValueError(f"latitude_range {latitude_range!r} keeps no row of the {dist_km} km grid")
        self._lats: np.ndarray = lats[keep]  # southern line of each kept row, ascending
        self._row_u: np.ndarray = row_u[keep]  # signed row number of each kept row
        self._first_row_u = int(self._row_u[0])
        spacing = self._lats[-1] - self._lats[-2] if len(self._lats) > 1 else 180.0 / n_lines
        self._top_edge = float(self._lats[-1] + spacing)
        self._cols = lru_cache(maxsize=None)(self._build_row)

    # ------------------------------------------------------------------ rows and columns
    @property
    def row_latitudes(self) -> np.ndarray:
        """Southern line (degrees) of every row, south to north (read-only copy)."""
        return self._lats.copy()

    @property
    def n_rows(self) -> int:
        return len(self._lats)

    def _build_row(self, pos: int) -> tuple[np.ndarray, int]:
        """Column corner longitudes of the row at position ``pos`` and the index of ``0R``."""
        lat = self._lats[pos]
        radius_at_lat = RADIUS_EQUATOR_KM * math.cos(lat * math.pi / 180)
        circumference = 2 * math.pi * radius_at_lat
        n = math.ceil(circumference / self.dist_km)
        lons = np.linspace(-180, 180, n + 1)[:-1]
        lons = np.sort(np.mod(lons, 360) - 180)
        lons.setflags(write=False)
        zeroth = int(np.flatnonzero(lons == 0)[0])
        return lons, zeroth

    def row_longitudes(self, grid_row_u: int) -> np.ndarray:
        """West corner longitude of every column of a row, west to east."""
        return self._cols(self._row_position(grid_row_u))[0]

    def _row_position(self, grid_row_u: int, cell_id: str | None = None) -> int:
        pos = int(grid_row_u) - self._first_row_u
        if not 0 <= pos < len(self._lats):
            label = cell_id if cell_id is not None else format_cell_id(int(grid_row_u), 0).split("_")[0]
            lo, hi = format_cell_id(int(self._row_u[0]), 0), format_cell_id(int(self._row_u[-1]), 0)
            raise InvalidCellIdError(
                f"grid cell {label!r}: row out of range for the {self.dist_km:g} km grid "
                f"(rows run from {lo.split('_')[0]} to {hi.split('_')[0]})"
            )
        return pos

    def _cell_position(self, cell_id: str) -> tuple[int, int]:
        """(row position, column index) of a cell id, validated."""
        row_u, col_r = parse_cell_id(cell_id)
        pos = self._row_position(row_u, cell_id)
        lons, zeroth = self._cols(pos)
        idx = zeroth + col_r
        if not 0 <= idx < len(lons):
            west, east = zeroth, len(lons) - 1 - zeroth
            raise InvalidCellIdError(
                f"grid cell {cell_id!r}: column out of range (row {cell_id.split('_')[0]} has "
                f"columns {west}L..{east}R)"
            )
        return pos, idx

    def check_cell(self, cell_id: str) -> str:
        """Return the cell id normalised (stripped) if it exists, else raise InvalidCellIdError."""
        self._cell_position(cell_id)
        return cell_id.strip()

    # ------------------------------------------------------------------ point -> cell
    def locate(self, lats: Iterable[float] | float, lons: Iterable[float] | float) -> tuple[np.ndarray, np.ndarray]:
        """Signed ``(grid_row_u, grid_col_r)`` int arrays of the cells holding the points.

        A point on a row/column line belongs to the cell south/west of it; a longitude west of
        an odd row's westernmost corner wraps to its easternmost column (which straddles the
        antimeridian). Raises :class:`OutsideGridError` for non-finite values, latitudes
        outside the lattice, or longitudes outside [-180, 180].
        """
        lat = np.atleast_1d(np.asarray(lats, dtype=np.float64)).ravel()
        lon = np.atleast_1d(np.asarray(lons, dtype=np.float64)).ravel()
        if lat.shape != lon.shape:
            raise ValueError(f"lats and lons differ in length: {lat.size} vs {lon.size}")
        lat_hi = 90.0 if self.latitude_range[1] >= 90.0 else self._top_edge
        bad = ~np.isfinite(lat) | ~np.isfinite(lon) | (lat < self._lats[0]) | (lat > lat_hi) | (lon < -180) | (lon > 180)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise OutsideGridError(
                f"point #{i} (lat={float(lat[i])!r}, lon={float(lon[i])!r}) is outside the grid: latitudes must lie in "
                f"[{self._lats[0]:g}, {lat_hi:g}] and longitudes in [-180, 180]"
                + (f" ({int(bad.sum())} such points)" if bad.sum() > 1 else "")
            )
        pos = np.searchsorted(self._lats, lat) - 1
        pos[pos < 0] = 0  # on the lowest line: no cell south of it
        col = np.empty(lat.shape, dtype=np.int64)
        for p in np.unique(pos):
            sel = pos == p
            row_lons, zeroth = self._cols(int(p))
            idx = np.searchsorted(row_lons, lon[sel]) - 1
            idx[idx < 0] = len(row_lons) - 1  # west of the first corner: the wrapping column
            col[sel] = idx - zeroth
        return self._row_u[pos].astype(np.int64), col

    def cells_at(self, lats: Iterable[float] | float, lons: Iterable[float] | float) -> list[str]:
        """Cell ids (``'433U_1047R'``) of the cells holding each point; see :meth:`locate`."""
        rows, cols = self.locate(lats, lons)
        return [format_cell_id(r, c) for r, c in zip(rows.tolist(), cols.tolist())]

    # ------------------------------------------------------------------ cell geometry
    def corner(self, cell_id: str) -> tuple[float, float]:
        """(lat, lon) of the cell's south-west grid point."""
        pos, idx = self._cell_position(cell_id)
        return float(self._lats[pos]), float(self._cols(pos)[0][idx])

    def bounds(self, cell_id: str) -> tuple[float, float, float, float]:
        """(west, south, east, north) of the cell in degrees, bounded by the next row/column.

        The top row and the eastmost column reuse the previous spacing, so the east edge of an
        eastmost column can exceed 180 (it straddles the antimeridian)."""
        pos, idx = self._cell_position(cell_id)
        edges = _column_edges(self._cols(pos)[0])
        south, west, east = float(self._lats[pos]), float(edges[idx]), float(edges[idx + 1])
        north = float(self._lats[pos + 1]) if pos + 1 < len(self._lats) else self._top_edge
        return west, south, east, north

    def footprint(self, cell_id: str) -> Polygon:
        """The cell's lattice footprint as a shapely Polygon in EPSG:4326 (lon, lat)."""
        return box(*self.bounds(cell_id))

    def utm_epsg(self, cell_id: str) -> int:
        """UTM EPSG code of the cell, evaluated at its south-west corner (bottom-left rule)."""
        lat, lon = self.corner(cell_id)
        return utm_epsg_at(lat, lon)

    # ------------------------------------------------------------------ region -> cells
    def cells_in(self, geometry: BaseGeometry | Sequence[float]) -> list[str]:
        """All cells whose footprint shares area with ``geometry``, ordered south to north, west to east.

        ``geometry`` is a shapely (Multi)Polygon in EPSG:4326 or a bbox
        ``(west, south, east, north)``; a bbox with ``west > east`` crosses the antimeridian.
        Regions crossing the antimeridian are given as a MultiPolygon split at ±180.
        """
        geom = _as_geometry(geometry)
        parts = list(geom.geoms) if hasattr(geom, "geoms") else [geom]
        found: set[tuple[int, int]] = set()
        for part in parts:
            if part.is_empty:
                continue
            found.update(self._cells_in_part(part))
        return [format_cell_id(r, c) for r, c in sorted(found)]

    def _cells_in_part(self, part: BaseGeometry) -> set[tuple[int, int]]:
        west, south, east, north = part.bounds
        if south > self._top_edge or north < self._lats[0]:
            return set()
        p0 = max(int(np.searchsorted(self._lats, south)) - 2, 0)
        p1 = min(int(np.searchsorted(self._lats, north)), len(self._lats) - 1)
        shifted = shapely.affinity.translate(part, xoff=360.0)
        shapely.prepare(part)
        shapely.prepare(shifted)
        found: set[tuple[int, int]] = set()
        for pos in range(p0, p1 + 1):
            lons, zeroth = self._cols(pos)
            c0 = max(int(np.searchsorted(lons, west)) - 2, 0)
            c1 = min(int(np.searchsorted(lons, east)), len(lons) - 1)
            cand = np.unique(np.r_[np.arange(c0, c1 + 1), len(lons) - 1])  # + the wrapping column
            edges = _column_edges(lons)
            wests, easts = edges[cand], edges[cand + 1]
            south_r = self._lats[pos]
            north_r = self._lats[pos + 1] if pos + 1 < len(self._lats) else self._top_edge
            boxes = shapely.box(wests, south_r, easts, north_r)
            hit = _shares_interior(boxes, part) | (_shares_interior(boxes, shifted) & (easts > 180.0))
            row_u = int(self._row_u[pos])
            found.update((row_u, int(c) - zeroth) for c in cand[hit])
        return found


def _column_edges(lons: np.ndarray) -> np.ndarray:
    """Column edges of a row: the n corner longitudes plus the east edge of the last column
    (previous spacing, as the reference; 360 degrees wide for a single-column row)."""
    last = lons[-1] + (lons[-1] - lons[-2]) if len(lons) > 1 else lons[-1] + 360.0
    return np.r_[lons, last]


def _shares_interior(boxes: np.ndarray, geom: BaseGeometry) -> np.ndarray:
    return shapely.intersects(boxes, geom) & ~shapely.touches(boxes, geom)


def _as_geometry(geometry: BaseGeometry | Sequence[float]) -> BaseGeometry:
    if isinstance(geometry, BaseGeometry):
        return check_region(geometry)
    try:
        west, south, east, north = (float(v) for v in geometry)
    except (TypeError, ValueError) as exc:
        raise RegionError(f"a bbox must be four numbers (west, south, east, north), got {geometry!r}") from exc
    return bbox_geometry(west, south, east, north)
