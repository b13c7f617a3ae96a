from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from majortom_gen.errors import DecodeError
from majortom_gen.formats import decode_geotiff, decode_thumbnail, encode_geotiff, encode_jpeg, encode_png, image_format


def test_geotiff__roundtrip_keeps_georeferencing():
    a = np.arange(178 * 178, dtype=np.uint16).reshape(178, 178)
    t = Affine(60, 0, 391031.7, 0, -60, 4994214.35)
    r = decode_geotiff(encode_geotiff(a, crs="EPSG:32632", transform=t, nodata=0), item="B01")
    assert np.array_equal(r.array, a) and r.crs == "EPSG:32632" and r.transform == t and r.nodata == 0
    assert r.bounds == pytest.approx((391031.7, 4994214.35 - 10680, 391031.7 + 10680, 4994214.35))


def test_geotiff__not_a_geotiff_names_the_item():
    with pytest.raises(DecodeError, match=r"part_00001.parquet row group 3, column B04: not a GeoTIFF"):
        decode_geotiff(encode_png(np.zeros((4, 4), np.uint8)), item="part_00001.parquet row group 3, column B04")
    with pytest.raises(DecodeError, match="empty"):
        decode_geotiff(b"", item="vv")


def test_geotiff__truncated():
    data = encode_geotiff(np.random.default_rng(0).random((300, 300)).astype(np.float32), crs="EPSG:32632",
                          transform=Affine(10, 0, 0, 0, -10, 0))
    with pytest.raises(DecodeError, match="vh"):
        decode_geotiff(data[: len(data) // 3], item="vh")


def test_thumbnail__png_jpeg_and_greyscale():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert np.array_equal(decode_thumbnail(encode_png(rgb)), rgb)
    grey = rgb[..., 0]
    assert decode_thumbnail(encode_png(grey)).shape == (32, 32)
    smooth = np.full((32, 32, 3), 120, np.uint8)
    assert np.abs(decode_thumbnail(encode_jpeg(smooth)).astype(int) - 120).max() <= 2
    assert image_format(encode_jpeg(smooth)) == "JPEG"


def test_thumbnail__truncated_png_is_a_clear_error():
    data = encode_png(np.random.default_rng(1).integers(0, 256, (200, 200, 3)).astype(np.uint8))
    with pytest.raises(DecodeError, match=r"cell 501U_60R thumbnail: corrupt or truncated PNG"):
        decode_thumbnail(data[: len(data) // 2], item="cell 501U_60R thumbnail")


def test_thumbnail__not_an_image():
    with pytest.raises(DecodeError, match="not a PNG or JPEG"):
        decode_thumbnail(b"hello world", item="thumbnail")
