"""The one COG writer: what it writes opens with rasterio exactly as described, atomically."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp

from majortom_gen.rasters import GeoRaster, write_cog


def test_write_cog__crs_transform_descriptions_tags_and_no_temporary(tmp_path):
    tr = Affine(10, 0, 399960, 0, -10, 5000040)
    data = np.arange(3 * 256 * 256, dtype=np.uint32).reshape(3, 256, 256).astype(np.uint8)
    raster = GeoRaster(data, "EPSG:32632", tr, ("red", "green", "blue"))
    assert raster.bounds == (399960, 5000040 - 2560, 399960 + 2560, 5000040)
    path = write_cog(tmp_path / "sub" / "x.tif", raster, {"seed": 3, "Model": "m"}, rgb=True)
    assert path == tmp_path / "sub" / "x.tif"
    assert [p.name for p in path.parent.iterdir()] == ["x.tif"]  # no temporary file left
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 32632 and ds.transform == tr and ds.descriptions == ("red", "green", "blue")
        assert ds.tags()["SEED"] == "3" and ds.tags()["MODEL"] == "m"
        assert ds.colorinterp == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        assert ds.profile["blockxsize"] == 256 and ds.compression.name == "deflate" and ds.nodata is None
        assert np.array_equal(ds.read(), data) and ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"


def test_write_cog__float_nodata_nan_and_a_failed_write_leaves_the_old_file(tmp_path):
    tr = Affine(0.001, 0, 7.5, 0, -0.001, 45.2)
    data = np.full((1, 300, 200), 0.5, np.float32)
    data[0, :10] = np.nan
    path = write_cog(tmp_path / "f.tif", GeoRaster(data, "EPSG:4326", tr, nodata=np.nan), {})
    with rasterio.open(path) as ds:
        assert ds.width == 200 and ds.height == 300 and np.isnan(ds.nodata) and ds.dtypes[0] == "float32"
        assert np.isnan(ds.read(1)[:10]).all() and (ds.read(1)[10:] == 0.5).all()
    before = path.read_bytes()
    with pytest.raises(ValueError, match="3 bands"):
        write_cog(path, GeoRaster(data, "EPSG:4326", tr), rgb=True)
    with pytest.raises(Exception):
        write_cog(path, GeoRaster(data, "EPSG:no-such-crs", tr))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["f.tif"]
    with pytest.raises(ValueError, match="bands, H, W"):
        GeoRaster(data[0], "EPSG:4326", tr)
