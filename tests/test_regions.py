from __future__ import annotations

import geopandas as gpd
import pytest
from shapely.geometry import MultiPolygon, box

from majortom_gen.errors import RegionError
from majortom_gen.regions import read_region


def test_read_region__bbox_wkt_and_file(tmp_path):
    assert read_region("7.5,44.9,7.9,45.2").equals(box(7.5, 44.9, 7.9, 45.2))
    assert read_region("POLYGON ((7.5 44.9, 7.9 44.9, 7.9 45.2, 7.5 44.9))").area > 0
    across = read_region("179.5,-1,-179.5,1")
    assert isinstance(across, MultiPolygon) and across.bounds == (-180, -1, 180, 1)
    gdf = gpd.GeoDataFrame(geometry=[box(391000, 4983000, 402000, 4994000)], crs="EPSG:32632")
    gdf.to_file(tmp_path / "aoi.geojson")
    geom = read_region(tmp_path / "aoi.geojson")
    w, s, e, n = geom.bounds
    assert 7.5 < w < e < 7.8 and 44.9 < s < n < 45.2  # reprojected to lon/lat


@pytest.mark.parametrize("spec,msg", [
    ("", "empty region"),
    ("POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))", "invalid geometry"),
    ("POLYGON ((0 0, 1 1", "cannot parse"),
    ("POLYGON EMPTY", "empty"),
    ("POINT (1 2)", "Polygon or MultiPolygon"),
    ("POLYGON ((0 0, 1 0, 2 0, 0 0))", "invalid|no area"),
    ("POLYGON ((170 0, 190 0, 190 1, 170 1, 170 0))", "antimeridian"),
    ("1,2,3", "no such file"),
    ("10,50,5,40", "invalid"),
    ("no/such/file.geojson", "no such file"),
])
def test_read_region__bad_input(spec, msg):
    with pytest.raises(RegionError, match=msg):
        read_region(spec)


def test_read_region__file_problems(tmp_path):
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(RegionError, match="bad.geojson: cannot read"):
        read_region(tmp_path / "bad.geojson")
    gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)]).to_file(tmp_path / "nocrs.gpkg")
    with pytest.raises(RegionError, match="no CRS"):
        read_region(tmp_path / "nocrs.gpkg")
