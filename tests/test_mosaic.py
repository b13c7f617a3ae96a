"""Mosaics: two UTM zones, blending, clipping to a polygon, VRTs, uncertainty rasters."""

from __future__ import annotations

import numpy as np
import rasterio
from affine import Affine
from rasterio.features import geometry_mask
from shapely.geometry import box
from shapely.ops import unary_union

from majortom_gen.fragments import fragment_windows
from majortom_gen.georef import default_grid, product_box
from majortom_gen.store import fragment_geometry
from pipelines.export import fragment_raster, write_fragment_cog
from pipelines.mosaic import vrts_per_zone, write_mosaic, write_uncertainty


def _fake_fragments(cells, folder, value_of):
    """Constant-valued fragment COGs, georeferenced exactly as the store says: (path, raster) pairs."""
    fragments = []
    windows = fragment_windows("grid")
    for cell in cells:
        geo = fragment_geometry(cell, windows)
        crs = product_box(cell).crs
        for (fr, fc, _, _), tr in zip(windows, geo["utm_transform"]):
            raster = fragment_raster(np.full((256, 256, 3), value_of(cell), np.uint8), "S2L2A", crs, Affine(*tr))
            fragments.append((write_fragment_cog(folder / cell / f"f{fr * 4 + fc:02d}.tif", raster, "S2L2A", {}), raster))
    return fragments


def _rasters(fragments):
    return [raster for _, raster in fragments]


def test_mosaic__two_utm_zones_clipped_and_blended(tmp_path):
    grid = default_grid()
    region = box(11.93, 45.01, 12.07, 45.07)  # straddles the 12 E boundary of UTM zones 32 and 33
    cells = grid.cells_in(region)
    zones = {grid.utm_epsg(c) for c in cells}
    assert zones == {32632, 32633}
    values = {c: 60 + 40 * i for i, c in enumerate(cells)}
    frags = _fake_fragments(cells, tmp_path / "frags", values.get)
    vrts = vrts_per_zone(frags, tmp_path, "S2L2A")
    assert len(vrts) == 2
    with rasterio.open(vrts[0]) as ds:
        assert ds.crs.to_epsg() in zones and ds.read(1).max() > 0
    out = tmp_path / "S2L2A_mosaic.tif"
    mosaic = write_mosaic(_rasters(frags), out, dst_crs="EPSG:4326", region=region)
    with rasterio.open(out) as ds:
        assert ds.transform == mosaic.transform and np.array_equal(ds.read(), mosaic.data) and ds.nodata == 0
        data = ds.read(1)
        inside = geometry_mask([region], out_shape=data.shape, transform=ds.transform, invert=True)
        assert (data[inside] > 0).all()  # the mosaic covers the polygon
        assert (data[~inside] == 0).all()  # and nothing outside it
        cells_union = unary_union([grid.footprint(c) for c in cells])
        rows, cols = np.nonzero(data)
        xs, ys = rasterio.transform.xy(ds.transform, rows, cols)
        assert cells_union.buffer(1e-4).contains(box(min(xs), min(ys), max(xs), max(ys)))
        # overlaps between cells are blended: values between the cells' constants appear
        assert len(set(np.unique(data[inside]).tolist()) - set(values.values())) > 0
        assert ds.tags()["BLEND"].startswith("per-pixel mean")


def test_mosaic__uncertainty_from_samples(tmp_path):
    cells = default_grid().cells_in(box(7.65, 45.01, 7.70, 45.03))
    mosaics = []
    for s, v in enumerate((100, 200)):
        frags = _fake_fragments(cells, tmp_path / f"s{s}", lambda c, v=v: v)
        mosaics.append(write_mosaic(_rasters(frags), tmp_path / f"m{s}.tif", dst_crs="EPSG:32632"))
    mean, std = write_uncertainty(mosaics, tmp_path / "mean.tif", tmp_path / "std.tif")
    with rasterio.open(mean) as m, rasterio.open(std) as s:
        mv, sv = m.read(1), s.read(1)
        ok = ~np.isnan(mv)
        assert ok.mean() > 0.9
        assert np.allclose(mv[ok], 150, atol=1) and np.allclose(sv[ok], 50, atol=1)


def test_reflectance_export_inverts_the_thumbnail_below_saturation(tmp_path):
    """The optional reflectance COG recovers the bands the thumbnail was made from, to the
    8-bit quantisation, and marks saturated pixels as NaN, with the caveat in its tags."""
    import pytest

    from majortom_gen.errors import MajorTomGenError
    from majortom_gen.thumbnails import s2_thumbnail
    from pipelines.export import reflectance_raster, write_reflectance_cog

    rng = np.random.default_rng(0)
    refl = rng.uniform(0.01, 0.9, (3, 256, 256))  # B04, B03, B02
    thumb = s2_thumbnail(*(refl * 1e4))
    tr = Affine(10, 0, 399960, 0, -10, 5000040)
    raster = reflectance_raster(thumb, "S2L2A", "EPSG:32632", tr)
    path = write_reflectance_cog(tmp_path / "f00_s0_reflectance.tif", raster, "S2L2A", {"seed": 1})
    with rasterio.open(path) as ds:
        back = ds.read()
        assert ds.dtypes[0] == "float32" and ds.transform == tr and ds.crs.to_epsg() == 32632
        assert "below saturation" in ds.tags()["CAVEAT"] and ds.descriptions[0].startswith("B04: approximate surface")
    thumb_bands = np.moveaxis(thumb, -1, 0).astype(float)
    saturated = thumb_bands >= 255
    assert saturated.any() and np.isnan(back[saturated]).all() and not np.isnan(back[~saturated]).any()
    ok = ~saturated & (thumb_bands >= 10)
    # one 8-bit step v -> v+1 changes reflectance by a factor ((v+1)/v)**(1/0.6)
    rel = np.abs(back[ok] - refl[ok]) / refl[ok]
    assert (rel <= ((thumb_bands[ok] + 1) / thumb_bands[ok]) ** (1 / 0.6) - 1).all()
    with pytest.raises(MajorTomGenError, match="only be inverted from S2"):
        reflectance_raster(thumb, "DEM", "EPSG:32632", tr)


def test_outputs_open_with_gdalinfo(tmp_path):
    """GDAL's own tool reads the fragment COGs (COG layout, UTM CRS, exact transform, band
    descriptions), the VRTs (relative paths, after the folder is moved) and the mosaics."""
    import json
    import shutil
    import subprocess

    import pytest

    if shutil.which("gdalinfo") is None:
        pytest.skip("gdalinfo is not installed (Debian: apt-get install gdal-bin; .ci/run installs it)")
    cell = "501U_60R"
    frags = _fake_fragments([cell], tmp_path / "out" / "frags", lambda c: 120)
    vrt = vrts_per_zone(frags, tmp_path / "out" / "mosaic", "S2L2A")[0]
    write_mosaic(_rasters(frags), tmp_path / "out" / "mosaic" / "S2L2A.tif", dst_crs="EPSG:4326")
    shutil.move(tmp_path / "out", tmp_path / "moved")

    def info(path):
        return json.loads(subprocess.run(["gdalinfo", "-json", str(path)], check=True, capture_output=True, text=True).stdout)

    frag = info(tmp_path / "moved" / "frags" / cell / frags[0][0].name)
    assert frag["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    assert "UTM zone 32N" in frag["coordinateSystem"]["wkt"]
    with rasterio.open(tmp_path / "moved" / "frags" / cell / frags[0][0].name) as ds:
        assert frag["geoTransform"] == list(ds.transform.to_gdal())
    assert frag["bands"][0]["description"].startswith("red: S2 L2A true-colour thumbnail")
    moved_vrt = info(tmp_path / "moved" / "mosaic" / vrt.name)
    assert len(moved_vrt["files"]) == 17 and all((tmp_path / "moved").as_posix() in f or f.endswith(".vrt")
                                                  for f in moved_vrt["files"])
    mosaic = info(tmp_path / "moved" / "mosaic" / "S2L2A.tif")
    assert mosaic["coordinateSystem"]["wkt"].startswith("GEOGCRS[\"WGS 84\"")
