"""Where a Core product's pixels lie: the 10,680 m product box of a grid cell in its UTM
CRS, and the affine transforms of bands and fragments (majortom-format.md §2).

The box is ``[E-340, N-340, E-340+10680, N-340+10680]`` metres, where (E, N) is the
cell's south-west grid point projected to the cell's UTM zone. It is not snapped to any
pixel lattice. Transforms follow rasterio's convention (``Affine(res, 0, west, 0, -res, north)``,
pixel (col, row) -> (x, y) of the pixel's upper-left corner).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from affine import Affine
from pyproj import CRS, Transformer

from majortom_gen.errors import MajorTomGenError
from majortom_gen.grid import Grid
from majortom_gen.modalities import PRODUCT_BOX_M

BOX_MARGIN_M = 340.0  # the box starts this far south and west of the grid point


@dataclass(frozen=True)
class ProductBox:
    """A product's footprint in its UTM CRS (metres) and its centre in WGS84 degrees."""

    cell_id: str
    epsg: int
    west: float
    south: float
    east: float
    north: float
    centre_lat: float
    centre_lon: float

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    def transform(self, resolution_m: float) -> Affine:
        """Affine transform of a raster covering the box at ``resolution_m`` metres/pixel."""
        return Affine(resolution_m, 0.0, self.west, 0.0, -resolution_m, self.north)


@lru_cache(maxsize=128)
def _to_utm(epsg: int) -> Transformer:
    return Transformer.from_crs(4326, epsg, always_xy=True)


@lru_cache(maxsize=128)
def _from_utm(epsg: int) -> Transformer:
    return Transformer.from_crs(epsg, 4326, always_xy=True)


_DEFAULT_GRID: Grid | None = None


def default_grid() -> Grid:
    """The 10 km Core grid, built once per process."""
    global _DEFAULT_GRID
    if _DEFAULT_GRID is None:
        _DEFAULT_GRID = Grid(10)
    return _DEFAULT_GRID


def product_box(cell_id: str, grid: Grid | None = None) -> ProductBox:
    """The Core product box of a grid cell (UTM, metres) and its WGS84 centre."""
    grid = grid or default_grid()
    lat, lon = grid.corner(cell_id)
    epsg = grid.utm_epsg(cell_id)
    e, n = _to_utm(epsg).transform(lon, lat)
    west, south = e - BOX_MARGIN_M, n - BOX_MARGIN_M
    east, north = west + PRODUCT_BOX_M, south + PRODUCT_BOX_M
    c_lon, c_lat = _from_utm(epsg).transform((west + east) / 2, (south + north) / 2)
    return ProductBox(cell_id, epsg, west, south, east, north, float(c_lat), float(c_lon))


def normalise_crs(value: object, *, item: str = "crs") -> str:
    if isinstance(value, str):
        try:
            return _normalise_crs_text(value)
        except MajorTomGenError as exc:
            raise MajorTomGenError(f"{item}: {exc}") from None
    return _normalise_crs(value, item)


@lru_cache(maxsize=256)
def _normalise_crs_text(value: str) -> str:
    return _normalise_crs(value, None)


def _normalise_crs(value: object, item: str | None) -> str:
    """Normalise a CRS given as ``'EPSG:32633'``, ``'EPSG:EPSG:32633'`` (a Major TOM
    metadata quirk), ``32633`` or a rasterio/pyproj CRS to ``'EPSG:32633'``."""
    text = str(getattr(value, "to_string", lambda: value)()).strip()
    while text.upper().startswith("EPSG:EPSG:"):
        text = text[5:]
    if text.isdigit():
        text = f"EPSG:{text}"
    try:
        epsg = CRS.from_user_input(text).to_epsg()
    except Exception as exc:  # pyproj raises CRSError, a subclass of Exception only
        raise MajorTomGenError(_prefix(item, f"{value!r} is not a CRS pyproj understands ({exc})")) from exc
    if epsg is None:
        raise MajorTomGenError(_prefix(item, f"{value!r} has no EPSG code; Major TOM products use EPSG:326zz/327zz"))
    return f"EPSG:{epsg}"


def _prefix(item: str | None, text: str) -> str:
    return text if item is None else f"{item}: {text}"
