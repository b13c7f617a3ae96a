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


def test_merge_samples__carries_every_per_row_array(tmp_path):
    """Merged sample runs keep every per-row array (georeferencing included); latents one run
    lacks (a modality it conditioned on) are NaN on its rows."""
    import json

    import numpy as np

    from majortom_gen.errors import MajorTomGenError
    from pipelines.region import _merge_samples

    def run(name, cells, latents):
        folder = tmp_path / name
        folder.mkdir()
        n = len(cells)
        np.savez_compressed(folder / "samples.npz", grid_cell=np.asarray(cells), fragment_index=np.arange(n),
                            sample=np.zeros(n, int), utm_crs=np.asarray(["EPSG:32632"] * n),
                            utm_transform=np.tile([10.0, 0, 399960, 0, -10, 5000040], (n, 1)),
                            source_product_ids=np.asarray(['{"S2L2A": "p"}'] * n),
                            **{f"latent_{m}": np.ones((n, 4, 2, 2), np.float16) for m in latents})
        (folder / "samples.json").write_text(json.dumps({"condition": [m for m in latents if m != "DEM"],
                                                         "generate": ["DEM"]}))
        return folder

    a = run("a", ["1U_1R", "1U_1R"], ["DEM", "S1RTC"])
    b = run("b", ["2U_2R"], ["DEM"])
    with np.load(_merge_samples([a, b], tmp_path / "all") / "samples.npz") as z:
        assert set(z.files) == {"grid_cell", "fragment_index", "sample", "utm_crs", "utm_transform",
                                "source_product_ids", "latent_DEM", "latent_S1RTC"}
        assert z["grid_cell"].tolist() == ["1U_1R", "1U_1R", "2U_2R"] and z["utm_transform"].shape == (3, 6)
        assert z["utm_crs"].tolist() == ["EPSG:32632"] * 3 and not np.isnan(z["latent_DEM"]).any()
        assert np.isnan(z["latent_S1RTC"][2]).all() and not np.isnan(z["latent_S1RTC"][:2]).any()
    assert json.loads((tmp_path / "all" / "samples.json").read_text())["condition"] == ["S1RTC"]
    with np.load(a / "samples.npz") as z:
        np.savez_compressed(a / "samples.npz", **{k: z[k] for k in z.files if k != "utm_crs"})  # an older run
    with pytest.raises(MajorTomGenError, match="'utm_crs' is missing"):
        _merge_samples([a, b], tmp_path / "all2")
