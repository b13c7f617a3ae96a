"""The synthetic world is format-true: real schema, real georeferencing, thumbnails from
the bands with the official formulas, physically linked modalities, deterministic."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from majortom_gen.formats import decode_geotiff, decode_thumbnail, image_format
from majortom_gen.fragments import cut_fragments
from majortom_gen.georef import product_box
from majortom_gen.modalities import MODALITIES
from majortom_gen.sources import decode_band, read_metadata, read_product_of
from majortom_gen.synth import SynthOptions, write_world
from majortom_gen.synth.world import make_cell_products
from majortom_gen.thumbnails import dem_thumbnail, s1_thumbnail, s2_thumbnail

from conftest import WORLD_CELLS

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-fragments"


@pytest.mark.parametrize("name", list(MODALITIES))
def test_world__shards_have_the_core_schema(world, name):
    m = MODALITIES[name]
    folder = world / m.hub_repo.split("/")[-1]
    shards = sorted((folder / "images").glob("part_*.parquet"))
    assert [s.name for s in shards][:2] == ["part_00001.parquet", "part_00002.parquet"]
    for shard in shards:
        pf = pq.ParquetFile(shard)
        assert pf.schema_arrow.names == list(m.shard_columns)
        for f in pf.schema_arrow:
            assert f.type == (pa.string() if f.name in ("product_id", "grid_cell", "product_datetime") else pa.binary())
        assert all(pf.metadata.row_group(i).num_rows == 1 for i in range(pf.metadata.num_row_groups))
        assert pf.metadata.num_row_groups <= 2  # products_per_shard=2
    meta = pq.read_table(folder / "metadata.parquet")
    assert meta.column_names == list(m.metadata_columns)
    assert meta.schema.field("grid_row_u").type == pa.int64() and meta.schema.field("centre_lat").type == pa.float64()


@pytest.mark.parametrize("name", list(MODALITIES))
def test_world__bands_are_georeferenced_on_the_product_box(world, name):
    m = MODALITIES[name]
    md = read_metadata(world / m.hub_repo.split("/")[-1], name)
    for _, row in md.iterrows():
        box = product_box(row["grid_cell"])
        assert row["crs"] == box.crs == "EPSG:32632"
        assert row["centre_lat"] == pytest.approx(box.centre_lat) and row["centre_lon"] == pytest.approx(box.centre_lon)
        product = read_product_of(row, ["grid_cell"] + list(m.band_names))
        assert product["grid_cell"] == row["grid_cell"]
        for band in m.bands:
            r = decode_band(product, band.name, item=row["grid_cell"])
            assert r.crs == box.crs
            assert r.array.dtype == np.dtype(band.dtype)
            assert r.transform.a == band.resolution_m and r.transform.e == -band.resolution_m
            assert r.transform.c == pytest.approx(box.west) and r.transform.f == pytest.approx(box.north)
            if not (name == "S1RTC" and r.array.shape[0] == 1069):
                assert r.array.shape == (band.size_px, band.size_px)
                assert r.bounds == pytest.approx((box.west, box.south, box.east, box.north))


def test_world__thumbnails_are_the_official_formulas(world):
    for name in MODALITIES:
        m = MODALITIES[name]
        md = read_metadata(world / m.hub_repo.split("/")[-1], name)
        row = md[md["nodata"] < 1].iloc[0]
        p = read_product_of(row)
        assert image_format(p["thumbnail"]) == m.thumbnail_format
        thumb = decode_thumbnail(p["thumbnail"])
        if name.startswith("S2"):
            expected = s2_thumbnail(*(decode_geotiff(p[b]).array for b in ("B04", "B03", "B02")))
            assert np.abs(thumb.astype(int) - expected.astype(int)).mean() < 2.0  # JPEG, as the Core S2 thumbnails
        elif name == "S1RTC":
            assert np.array_equal(thumb, s1_thumbnail(decode_geotiff(p["vv"]).array, decode_geotiff(p["vh"]).array))
        else:
            dem = decode_geotiff(p["DEM"]).array
            assert thumb.shape == (356, 356) and np.array_equal(thumb, dem_thumbnail(dem))
            compressed = np.asarray(Image.open(io.BytesIO(p["compressed"])))  # 16-bit greyscale PNG
            assert np.abs(compressed.astype(float) - np.clip(np.rint(dem), 0, None)).max() == 0
            assert row["min_val"] == pytest.approx(dem.min()) and row["max_val"] == pytest.approx(dem.max())


def test_world__quirks(world):
    s1 = read_metadata(world / "Core-S1RTC", "S1RTC")
    shapes = {decode_band(read_product_of(r, ["vv"]), "vv").array.shape for _, r in s1.iterrows()}
    assert (1069, 1069) in shapes and (1068, 1068) in shapes
    l2a = read_metadata(world / "Core-S2L2A", "S2L2A")
    dup = l2a[l2a["grid_cell"].duplicated(keep=False)]
    assert len(dup) == 2 and sorted(dup["nodata"])[1] == 1.0
    empty = dup[dup["nodata"] == 1.0].iloc[0]
    assert decode_band(read_product_of(empty, ["B04"]), "B04").array.max() == 0


def test_world__metadata_values_are_consistent(world):
    l2a = read_metadata(world / "Core-S2L2A", "S2L2A")
    l1c = read_metadata(world / "Core-S2L1C", "S2L1C")
    assert list(l2a["grid_cell"].drop_duplicates()) == list(WORLD_CELLS)  # south->north, west->east
    for (_, a), (_, c) in zip(l2a.iterrows(), l1c.iterrows()):
        assert a["timestamp"] == c["timestamp"] and a["cloud_cover"] == c["cloud_cover"]
        assert "_MSIL2A_" in a["product_id"] and "_MSIL1C_" in c["product_id"] and "_T32T" in a["product_id"]
        mask = decode_band(read_product_of(a, ["cloud_mask"]), "cloud_mask").array
        valid = decode_band(read_product_of(a, ["B02"]), "B02").array > 0
        if a["nodata"] < 1:
            assert a["cloud_cover"] == pytest.approx(100 * np.isin(mask[valid], (1, 2)).mean())
            assert a["nodata"] == pytest.approx(1 - valid.mean(), abs=1e-9)
    s1 = read_metadata(world / "Core-S1RTC", "S1RTC")
    assert set(s1["orbit_state"]) <= {"ASCENDING", "DESCENDING"}


def test_world__modalities_are_physically_linked():
    """Sea in the DEM is dark in NIR and in VV; L1C is hazier than L2A in the blue band."""
    cell = "445U_81R"  # a stretch of coast in the world of seed 3 (checked below)
    p = make_cell_products(cell, 3, ("DEM", "S1RTC", "S2L1C", "S2L2A"))
    dem = decode_geotiff(p.products["DEM"][0][1]["DEM"]).array
    sea30 = dem <= 0
    assert 0.05 < sea30.mean() < 0.95, "pick a coastal cell for this test"
    sea10 = np.kron(sea30, np.ones((3, 3), bool))
    nir = decode_geotiff(p.products["S2L2A"][0][1]["B08"]).array.astype(float)
    vv = decode_geotiff(p.products["S1RTC"][0][1]["vv"]).array.astype(float)
    mask = decode_geotiff(p.products["S2L2A"][0][1]["cloud_mask"]).array == 0
    ok = mask & (nir > 0) & (vv > 0)
    assert np.median(nir[sea10 & ok]) < 0.3 * np.median(nir[~sea10 & ok])
    assert np.median(vv[sea10 & ok]) < 0.2 * np.median(vv[~sea10 & ok])
    b02_l2a = decode_geotiff(p.products["S2L2A"][0][1]["B02"]).array.astype(float)
    b02_l1c = decode_geotiff(p.products["S2L1C"][0][1]["B02"]).array.astype(float)
    assert np.median(b02_l1c[ok]) > np.median(b02_l2a[ok]) + 300


def test_world__deterministic_and_independent_of_workers_and_neighbours(tmp_path):
    a = write_world(["501U_60R", "502U_60R"], tmp_path / "a", SynthOptions(seed=5, modalities=("DEM", "S1RTC"), workers=1))
    b = write_world(["502U_60R", "501U_60R"], tmp_path / "b", SynthOptions(seed=5, modalities=("DEM", "S1RTC"), workers=2))
    for name in ("DEM", "S1RTC"):
        assert (a[name] / "images/part_00001.parquet").read_bytes() == (b[name] / "images/part_00001.parquet").read_bytes()
    alone = make_cell_products("502U_60R", 5, ("DEM",)).products["DEM"][0][1]["DEM"]
    md = read_metadata(a["DEM"], "DEM")
    assert read_product_of(md.iloc[1], ["DEM"])["DEM"] == alone
    other_seed = make_cell_products("502U_60R", 6, ("DEM",)).products["DEM"][0][1]["DEM"]
    assert other_seed != alone


def test_world__overlapping_boxes_agree():
    """Adjacent cells' 10.68 km boxes overlap by 680 m; the terrain there is the same."""
    west = decode_geotiff(make_cell_products("501U_59R", 1, ("DEM",)).products["DEM"][0][1]["DEM"])
    east = decode_geotiff(make_cell_products("501U_60R", 1, ("DEM",)).products["DEM"][0][1]["DEM"])
    ox = east.transform.c  # east box's west edge, inside the west box
    col = int(round((ox - west.transform.c) / 30.0))
    row = int(round((west.transform.f - east.transform.f) / 30.0))
    assert 0 < col < 356
    # compare where the 30 m pixels nearly coincide (boxes are not snapped: allow a sub-pixel shift)
    a = west.array[max(row, 0):max(row, 0) + 200, col:col + 10]
    b = east.array[max(-row, 0):max(-row, 0) + 200, 0:10]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_world__rejects_bad_cells_and_options(tmp_path):
    from majortom_gen.errors import InvalidCellIdError, MajorTomGenError

    with pytest.raises(InvalidCellIdError, match="12X_3R"):
        write_world(["12X_3R"], tmp_path)
    with pytest.raises(MajorTomGenError, match="no grid cells"):
        write_world([], tmp_path)
    with pytest.raises(MajorTomGenError, match="unknown quirk"):
        write_world(["501U_60R"], tmp_path, SynthOptions(quirks=("bogus",)))
    assert not any(p.name.startswith("Core-") for p in tmp_path.iterdir())


@pytest.mark.skipif(not REAL.exists(), reason="../shared/data/real-fragments not beside the checkout")
def test_world__fragments_look_like_real_ones(world):
    """Synthetic fragments sit in the value range of the real COP-GEN-Beta fragments."""
    for name, fname in [("S2L2A", "s2l2a"), ("S2L1C", "s2l1c"), ("S1RTC", "s1rtc"), ("DEM", "dem")]:
        real = np.asarray(Image.open(REAL / f"{fname}.webp").convert("RGB")).astype(float)
        m = MODALITIES[name]
        md = read_metadata(world / m.hub_repo.split("/")[-1], name)
        row = md[md["nodata"] < 0.5].iloc[0]
        p = read_product_of(row, ["thumbnail"])
        box = product_box(row["grid_cell"])
        frags = cut_fragments(decode_thumbnail(p["thumbnail"]), box.transform(10.0), box.crs)
        syn = np.stack([f.pixels for f in frags]).astype(float)
        assert real.shape == syn.shape[1:] == (256, 256, 3)
        assert 0.3 < syn.mean() / real.mean() < 3.0, name
        assert syn.std() > 5 and real.std() > 5
