"""Region input as users give it: a vector file (GeoJSON, GeoPackage, shapefile, ... read
by geopandas and reprojected to EPSG:4326), a WKT string, or a bbox ``west,south,east,north``.

Everything returns a valid shapely geometry in EPSG:4326 lon/lat. A bbox whose west is
greater than its east crosses the antimeridian and is split into a MultiPolygon.
"""

from __future__ import annotations

import os
from pathlib import Path

import geopandas as gpd
import shapely
import shapely.validation
from shapely import wkt as shapely_wkt
from shapely.geometry import MultiPolygon, box
from shapely.geometry.base import BaseGeometry

from majortom_gen.errors import RegionError


def bbox_geometry(west: float, south: float, east: float, north: float) -> BaseGeometry:
    """A bbox in degrees -> Polygon, or a MultiPolygon split at ±180 when ``west > east``."""
    if not (-90 <= south < north <= 90) or not (-180 <= west <= 180 and -180 <= east <= 180) or west == east:
        raise RegionError(
            f"bbox ({west:g}, {south:g}, {east:g}, {north:g}) is invalid: need -180 <= west, east <= 180, "
            "west != east and -90 <= south < north <= 90"
        )
    if west > east:
        return MultiPolygon([box(west, south, 180.0, north), box(-180.0, south, east, north)])
    return box(west, south, east, north)


def parse_bbox(text: str) -> BaseGeometry:
    """``'west,south,east,north'`` (degrees) -> see :func:`bbox_geometry`."""
    try:
        w, s, e, n = (float(v) for v in text.replace(" ", "").split(","))
    except ValueError as exc:
        raise RegionError(f"bbox {text!r}: expected four numbers 'west,south,east,north'") from exc
    return bbox_geometry(w, s, e, n)


def check_region(geom: BaseGeometry, *, item: str = "region") -> BaseGeometry:
    """Reject empty, invalid, area-less or out-of-range geometries with a clear message."""
    if geom is None or geom.is_empty:
        raise RegionError(f"{item}: the geometry is empty")
    if not geom.is_valid:
        raise RegionError(f"{item}: invalid geometry ({shapely.validation.explain_validity(geom)}); "
                          "fix it, e.g. with shapely.make_valid or QGIS 'Fix geometries'")
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise RegionError(f"{item}: a region must be a Polygon or MultiPolygon, got {geom.geom_type}")
    if geom.area == 0:
        raise RegionError(f"{item}: the polygon has no area")
    w, s, e, n = geom.bounds
    if w < -180 or e > 180 or s < -90 or n > 90:
        raise RegionError(f"{item}: bounds ({w:g}, {s:g}, {e:g}, {n:g}) leave lon [-180, 180] / lat [-90, 90]; "
                          "give EPSG:4326 coordinates, split at the antimeridian")
    return geom


def read_region(spec: str | os.PathLike) -> BaseGeometry:
    """Parse a region given as a vector file path, a WKT string or a bbox string."""
    text = str(spec).strip()
    if not text:
        raise RegionError("empty region: give a vector file, a WKT polygon or 'west,south,east,north'")
    upper = text.upper()
    if upper.startswith(("POLYGON", "MULTIPOLYGON", "POINT", "LINESTRING", "MULTI", "GEOMETRYCOLLECTION")):
        try:
            geom = shapely_wkt.loads(text)
        except shapely.errors.ShapelyError as exc:
            raise RegionError(f"region WKT {text[:60]!r}: cannot parse ({exc})") from exc
        return check_region(geom, item=f"region WKT {text[:60]!r}")
    if text.count(",") == 3 and not Path(text).exists():
        return check_region(parse_bbox(text), item=f"bbox {text!r}")
    path = Path(text)
    if not path.exists():
        raise RegionError(f"region {text!r}: no such file, and not a WKT polygon or a 'west,south,east,north' bbox")
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several unrelated exception types
        raise RegionError(f"region file {path}: cannot read it as a vector file ({exc})") from exc
    if gdf.empty:
        raise RegionError(f"region file {path}: holds no features")
    if gdf.crs is None:
        raise RegionError(f"region file {path}: has no CRS; set one (EPSG:4326 lon/lat) and try again")
    gdf = gdf.to_crs(4326)
    geom = shapely.union_all(gdf.geometry.values)
    return check_region(geom, item=f"region file {path}")
