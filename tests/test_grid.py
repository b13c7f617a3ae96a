"""The grid against the reference rules (majortom-format.md §1), re-derived here point by
point, slowly, the way ESA's grid.py does it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from majortom_gen.errors import InvalidCellIdError, OutsideGridError, RegionError
from majortom_gen.grid import Grid, format_cell_id, parse_cell_id, utm_epsg_at

R = 6378.137


class ReferenceGrid:
    """A literal, per-point transcription of the reference's lattice and lookup."""

    def __init__(self, dist):
        self.dist = dist
        n = math.ceil(math.pi * R / dist)
        lats = np.sort(np.mod(np.linspace(-90, 90, n + 1)[:-1], 180) - 90)
        z = int(np.searchsorted(lats, 0))
        self.lats = lats
        self.rows = [f"{i - z}U" if i >= z else f"{z - i}D" for i in range(len(lats))]

    def row_lons(self, lat):
        n = math.ceil(2 * math.pi * (R * math.cos(lat * math.pi / 180)) / self.dist)
        lons = np.sort(np.mod(np.linspace(-180, 180, n + 1)[:-1], 360) - 180)
        z = int(np.where(lons == 0)[0][0])
        cols = [f"{i - z}R" if i >= z else f"{z - i}L" for i in range(len(lons))]
        return lons, cols

    def cell(self, lat, lon):
        r = int(np.searchsorted(self.lats, lat)) - 1
        lons, cols = self.row_lons(self.lats[r])
        c = int(np.searchsorted(lons, lon)) - 1
        return f"{self.rows[r]}_{cols[c]}"  # c == -1 wraps to the last column, as .iloc[-1]


@pytest.fixture(scope="module")
def grid():
    return Grid(10)


def test_grid__matches_reference_on_random_points(grid):
    ref = ReferenceGrid(10)
    rng = np.random.default_rng(0)
    lats = rng.uniform(-89.9, 89.9, 3000)
    lons = rng.uniform(-180, 180, 3000)
    assert grid.cells_at(lats, lons) == [ref.cell(a, o) for a, o in zip(lats, lons)]


@pytest.mark.parametrize("dist", [10, 25, 100, 3.3])
def test_grid__other_distances_match_reference(dist):
    ref, grid = ReferenceGrid(dist), Grid(dist)
    rng = np.random.default_rng(1)
    lats, lons = rng.uniform(-85, 85, 300), rng.uniform(-180, 180, 300)
    assert grid.cells_at(lats, lons) == [ref.cell(a, o) for a, o in zip(lats, lons)]


def test_grid__lattice_is_bit_identical_to_reference(grid):
    ref = ReferenceGrid(10)
    assert np.array_equal(grid.row_latitudes, ref.lats)
    assert grid.n_rows == 2004
    for row_u in (0, -1, 500, -990, 1001):
        lons, _ = ref.row_lons(ref.lats[ref.rows.index(format_cell_id(row_u, 0).split("_")[0])])
        assert np.array_equal(grid.row_longitudes(row_u), lons)


def test_grid__edge_cases(grid):
    ref = ReferenceGrid(10)
    pts = [
        (0.0, 0.0),  # on the equator and prime meridian lines: the cell south-west of them
        (1e-9, 1e-9), (-1e-9, -1e-9),  # just either side
        (0.05, 179.999), (0.05, -179.999), (0.05, 180.0), (0.05, -180.0),  # antimeridian
        (45.0, 7.6), (84.99, 12.0), (-84.99, -70.0), (-88.5, 100.0), (89.95, 0.5), (-89.95, 0.5),
    ]
    assert grid.cells_at(*zip(*pts)) == [ref.cell(a, o) for a, o in pts]
    assert grid.cells_at([0.0], [0.0]) == ["1D_1L"]
    assert grid.cells_at([1e-9], [1e-9]) == ["0U_0R"]


def test_grid__odd_row_wraps_west_of_first_corner(grid):
    # find a row with an odd column count: the easternmost cell straddles the antimeridian
    for row_u in range(1, 200):
        lons = grid.row_longitudes(row_u)
        if len(lons) % 2 == 1:
            break
    lat = grid.row_latitudes[row_u + 1002] + 0.01
    assert lons[0] > -180
    west_of_first = (lons[0] - 180) / 2  # between -180 and the first corner
    cell = grid.cells_at([lat], [-179.99999])[0]
    assert cell == grid.cells_at([lat], [179.99999])[0]
    assert grid.bounds(cell)[2] > 180
    assert west_of_first < lons[0]


def test_grid__covers_the_south_pole_region(grid):
    cell = grid.cells_at([-88.0], [37.0])[0]
    assert cell.endswith("R") and "D" in cell
    assert Grid(10, latitude_range=(-85, 85)).n_rows < grid.n_rows
    assert grid.cells_at([-90.0], [0.0]) == grid.cells_at([-89.99], [0.0])


@pytest.mark.parametrize("lat,lon", [(90.5, 0), (-90.01, 0), (0, 180.5), (0, -181), (float("nan"), 0), (0, float("inf"))])
def test_grid__rejects_points_outside(grid, lat, lon):
    with pytest.raises(OutsideGridError, match="outside the grid"):
        grid.cells_at([lat], [lon])


def test_grid__restricted_range_rejects_points_beyond_it():
    g = Grid(10, latitude_range=(-85, 85))
    with pytest.raises(OutsideGridError, match="point #1"):
        g.cells_at([10.0, 87.0], [0.0, 0.0])


def test_grid__footprint_contains_points_and_tiles(grid):
    rng = np.random.default_rng(2)
    lats, lons = rng.uniform(-80, 80, 200), rng.uniform(-179, 179, 200)
    for cell, lat, lon in zip(grid.cells_at(lats, lons), lats, lons):
        w, s, e, n = grid.bounds(cell)
        assert w < lon <= e and s < lat <= n
    # the next cell east starts where this one ends
    w, s, e, n = grid.bounds("433U_1047R")
    assert grid.bounds("433U_1048R")[0] == e
    assert grid.footprint("433U_1047R").equals(box(w, s, e, n))


def test_grid__utm_reference_vectors():
    # the reference's own asserts, plus the Norway/Svalbard exceptions
    assert utm_epsg_at(-1, -174.34) == 32701
    assert utm_epsg_at(48, -4) == 32630
    assert utm_epsg_at(78, 13) == 32633
    assert utm_epsg_at(-34, 19.7) == 32734
    assert utm_epsg_at(-36, 175.7) == 32760
    assert utm_epsg_at(60, 5) == 32632  # Norway: would be 31
    assert utm_epsg_at(75, 8) == 32631 and utm_epsg_at(75, 32) == 32635 and utm_epsg_at(75, 40) == 32637
    assert utm_epsg_at(0.0, 0.0) == 32631 and utm_epsg_at(-0.001, 0.0) == 32731


def test_grid__utm_epsg_uses_the_bottom_left_corner(grid):
    cell = grid.cells_at([45.05], [7.7])[0]
    lat, lon = grid.corner(cell)
    assert grid.utm_epsg(cell) == utm_epsg_at(lat, lon) == 32632


def test_cell_ids__parse_and_format():
    assert parse_cell_id("433U_1047R") == (433, 1047)
    assert parse_cell_id("990D_37L") == (-990, -37)
    assert format_cell_id(-990, -37) == "990D_37L"
    assert format_cell_id(0, 0) == "0U_0R"


@pytest.mark.parametrize("bad,msg", [
    ("12X_3R", "malformed"), ("", "malformed"), ("433U", "malformed"), ("0D_3R", "0D"), ("3U_0L", "0L"),
    ("433U_1047R_x", "malformed"), (None, "string"),
])
def test_cell_ids__malformed(bad, msg):
    with pytest.raises(InvalidCellIdError, match=msg):
        parse_cell_id(bad)


@pytest.mark.parametrize("bad,msg", [("1003U_0R", "row out of range"), ("1003D_0R", "row out of range"), ("0U_2004R", "column out of range"), ("1000U_50R", "column out of range")])
def test_cell_ids__out_of_range(grid, bad, msg):
    with pytest.raises(InvalidCellIdError, match=msg):
        grid.footprint(bad)


def test_cells_in__bbox_matches_point_sampling(grid):
    region = box(7.5, 44.9, 7.9, 45.2)
    cells = grid.cells_in(region)
    xs, ys = np.meshgrid(np.linspace(7.5001, 7.8999, 80), np.linspace(44.9001, 45.1999, 80))
    sampled = set(grid.cells_at(ys.ravel(), xs.ravel()))
    assert sampled == set(cells)
    for c in cells:
        assert grid.footprint(c).intersection(region).area > 0


def test_cells_in__polygon_and_tuple_bbox(grid):
    tri = Polygon([(7.5, 44.9), (7.9, 44.9), (7.5, 45.2)])
    assert set(grid.cells_in(tri)) < set(grid.cells_in((7.5, 44.9, 7.9, 45.2)))


def test_cells_in__antimeridian(grid):
    split = MultiPolygon([box(179.8, -0.3, 180, 0.3), box(-180, -0.3, -179.8, 0.3)])
    cells = grid.cells_in(split)
    assert cells == grid.cells_in((179.8, -0.3, -179.8, 0.3))
    xs = np.r_[np.linspace(179.8001, 179.9999, 30), np.linspace(-179.9999, -179.8001, 30)]
    xx, yy = np.meshgrid(xs, np.linspace(-0.2999, 0.2999, 30))
    assert set(grid.cells_at(yy.ravel(), xx.ravel())) == set(cells)


def test_cells_in__odd_row_straddling_cell(grid):
    for row_u in range(1, 200):
        if len(grid.row_longitudes(row_u)) % 2 == 1:
            break
    s = grid.row_latitudes[row_u + 1002]
    straddler = grid.cells_at([s + 0.01], [179.9999])[0]
    # a region only on the western side of ±180 must still find the cell that straddles it
    assert straddler in grid.cells_in(box(-180, s + 0.001, -179.99, s + 0.002))


@pytest.mark.parametrize("geom,msg", [
    (Polygon(), "empty"),
    (Polygon([(0, 0), (1, 1), (1, 0), (0, 1)]), "invalid"),
    (box(170, 0, 190, 1), "antimeridian"),
    ((1, 2, 3), "four numbers"),
    ((5, 10, 6, 5), "invalid"),
])
def test_cells_in__bad_regions(grid, geom, msg):
    with pytest.raises(RegionError, match=msg):
        grid.cells_in(geom)
