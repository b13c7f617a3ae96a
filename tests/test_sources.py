from __future__ import annotations

import shutil

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from majortom_gen.errors import MetadataError, ShardError
from majortom_gen.sources import (
    decode_band, read_metadata, read_product, read_product_of, resolve_parquet_url, to_fsspec_url,
)


def test_to_fsspec_url__maps_hub_resolve_urls():
    url = "https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/part_00001.parquet?download=true"
    assert to_fsspec_url(url) == "hf://datasets/Major-TOM/Core-S2L2A/images/part_00001.parquet"
    assert to_fsspec_url(url.replace("/main/", "/abc123/")).startswith("hf://datasets/Major-TOM/Core-S2L2A@abc123/")
    assert to_fsspec_url("hf://datasets/Major-TOM/Core-DEM/metadata.parquet") == "hf://datasets/Major-TOM/Core-DEM/metadata.parquet"


def test_hf_protocol_is_served_by_huggingface_hub():
    from huggingface_hub import HfFileSystem

    assert isinstance(fsspec.filesystem("hf"), HfFileSystem)


def test_resolve_parquet_url__relative_and_local_mirror(tmp_path):
    assert resolve_parquet_url("images/part_00002.parquet", tmp_path) == str(tmp_path / "images/part_00002.parquet")
    hub = "https://huggingface.co/datasets/Major-TOM/Core-DEM/resolve/main/images/part_00007.parquet"
    assert resolve_parquet_url(hub, tmp_path).startswith("hf://")
    (tmp_path / "images").mkdir()
    (tmp_path / "images/part_00007.parquet").write_bytes(b"x")
    assert resolve_parquet_url(hub, tmp_path) == str(tmp_path / "images/part_00007.parquet")


def test_read_metadata__normalises_quirks(world):
    md = read_metadata(world / "Core-S2L2A", "S2L2A")
    assert md.crs.to_epsg() == 4326  # centre points, not labelled with a UTM zone
    assert set(md["crs"]) == {"EPSG:32632"}  # the EPSG:EPSG: quirk is gone
    raw = pq.read_table(world / "Core-S2L2A/metadata.parquet").column("crs").to_pylist()
    assert any(v.startswith("EPSG:EPSG:") for v in raw)
    assert str(md["timestamp"].dtype).startswith("datetime64") and md["timestamp"].dt.tz is not None
    assert md["grid_cell"].duplicated().sum() == 1  # the duplicate-cell quirk
    assert (md.geometry.x == md["centre_lon"]).all()


def test_read_metadata__missing_columns(tmp_path, world):
    t = pq.read_table(world / "Core-S1RTC/metadata.parquet").drop_columns(["parquet_row", "orbit_state"])
    pq.write_table(t, tmp_path / "metadata.parquet")
    with pytest.raises(MetadataError, match=r"missing metadata columns \['parquet_row', 'orbit_state'\]"):
        read_metadata(tmp_path, "S1RTC")


def test_read_metadata__bad_values(tmp_path, world):
    t = pq.read_table(world / "Core-S1RTC/metadata.parquet")
    ts = t.column("timestamp").to_pylist()
    ts[1] = "yesterday"
    pq.write_table(t.set_column(t.schema.get_field_index("timestamp"), "timestamp", pa.array(ts)), tmp_path / "metadata.parquet")
    with pytest.raises(MetadataError, match="row 1 timestamp 'yesterday'"):
        read_metadata(tmp_path)
    crs = t.column("crs").to_pylist()
    crs[0] = "EPSG:nonsense"
    pq.write_table(t.set_column(t.schema.get_field_index("crs"), "crs", pa.array(crs)), tmp_path / "metadata.parquet")
    with pytest.raises(Exception, match="row 0 crs"):
        read_metadata(tmp_path)


def test_read_metadata__not_found_or_not_parquet(tmp_path):
    with pytest.raises(MetadataError, match="not found"):
        read_metadata(tmp_path / "nowhere")
    (tmp_path / "metadata.parquet").write_text("not parquet")
    with pytest.raises(MetadataError, match="not a readable parquet"):
        read_metadata(tmp_path)


def test_read_product__one_row_group(world):
    md = read_metadata(world / "Core-S2L2A", "S2L2A")
    row = md.iloc[2]
    product = read_product_of(row, ["grid_cell", "B04", "thumbnail"])
    assert product["grid_cell"] == row["grid_cell"]
    raster = decode_band(product, "B04", item=row["grid_cell"])
    assert raster.array.shape == (1068, 1068) and raster.crs == "EPSG:32632"


def test_read_product__errors_name_file_and_row(world):
    shard = world / "Core-DEM/images/part_00001.parquet"
    with pytest.raises(ShardError, match=r"part_00001.parquet row group 9: out of range"):
        read_product(shard, 9)
    with pytest.raises(ShardError, match=r"no column\(s\) \['B04'\]"):
        read_product(shard, 0, ["B04"])
    with pytest.raises(ShardError, match="not found"):
        read_product(shard.with_name("part_09999.parquet"), 0)


def test_read_product__remote_partial_read(world):
    """The fsspec path (as for hf:// and https URLs), on fsspec's in-memory file system."""
    fs = fsspec.filesystem("memory")
    with open(world / "Core-S1RTC/images/part_00001.parquet", "rb") as src, fs.open("/mt/part_00001.parquet", "wb") as dst:
        shutil.copyfileobj(src, dst)
    local = read_product(world / "Core-S1RTC/images/part_00001.parquet", 1, ["grid_cell", "vv"])
    remote = read_product("memory://mt/part_00001.parquet", 1, ["grid_cell", "vv"])
    assert remote == local
    with pytest.raises(ShardError, match="row group 5: out of range"):
        read_product("memory://mt/part_00001.parquet", 5, ["vv"])


def test_read_product__multi_row_group_is_rejected(tmp_path):
    pq.write_table(pa.table({"grid_cell": ["1U_1R", "1U_2R"]}), tmp_path / "x.parquet")
    with pytest.raises(ShardError, match="holds 2 rows"):
        read_product(tmp_path / "x.parquet", 0)


def test_corrupt_band_in_a_shard_names_file_row_and_column(tmp_path, world):
    from majortom_gen.errors import DecodeError

    src = pq.ParquetFile(world / "Core-S2L2A/images/part_00001.parquet").read_row_group(0)
    bad = src.set_column(src.schema.get_field_index("B04"), "B04", pa.array([b"garbage bytes"], pa.binary()))
    path = tmp_path / "part_00001.parquet"
    pq.write_table(bad, path)
    product = read_product(path, 0, ["B04", "thumbnail"])
    with pytest.raises(DecodeError, match=r"part_00001.parquet row group 0, column B04: not a GeoTIFF"):
        decode_band(product, "B04", item=f"{path} row group 0")
