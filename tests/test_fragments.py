from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from majortom_gen.fragments import (
    cut_fragments, fragment_transform, fragment_windows, from_unit_range, to_product_grid, to_unit_range,
)


def test_windows__4x4_grid_of_the_1024_centre_crop():
    wins = fragment_windows("grid")
    assert len(wins) == 16
    assert wins[0] == (0, 0, 22, 22)
    assert wins[5] == (1, 1, 278, 278)  # index = row*4 + col
    assert wins[-1] == (3, 3, 22 + 768, 22 + 768)
    assert fragment_windows("centre") == [(-1, -1, 406, 406)]
    with pytest.raises(ValueError, match="valid modes"):
        fragment_windows("random")


def test_cut_fragments__pixels_and_georeferencing():
    img = np.zeros((1068, 1068, 3), np.uint8)
    img[..., 0] = np.arange(1068)[:, None] % 256  # row index in red
    img[..., 1] = np.arange(1068)[None, :] % 256  # col index in green
    t = Affine(10, 0, 391031.7, 0, -10, 4994214.35)
    frags = cut_fragments(img, t, "EPSG:32632")
    f = frags[6]  # row 1, col 2
    assert (f.fragment_row, f.fragment_col, f.index) == (1, 2, 6)
    assert f.pixels.shape == (256, 256, 3)
    assert f.pixels[0, 0, 0] == (22 + 256) % 256 and f.pixels[0, 0, 1] == (22 + 512) % 256
    assert f.transform.c == pytest.approx(391031.7 + 10 * (22 + 512))
    assert f.transform.f == pytest.approx(4994214.35 - 10 * (22 + 256))
    assert f.crs == "EPSG:32632"
    assert fragment_transform(t, 0, 0) == t


def test_to_product_grid__dem_resize_and_greyscale():
    dem = np.tile(np.linspace(0, 255, 356, dtype=np.uint8), (356, 1))
    out = to_product_grid(dem)
    assert out.shape == (1068, 1068, 3)
    assert np.array_equal(out[..., 0], out[..., 2])
    assert abs(int(out[500, 534, 0]) - 128) <= 2  # bilinear keeps the ramp


def test_to_product_grid__crops_1069():
    img = np.zeros((1069, 1069, 3), np.uint8)
    assert to_product_grid(img).shape == (1068, 1068, 3)
    with pytest.raises(ValueError, match="smaller"):
        to_product_grid(np.zeros((500, 500, 3), np.uint8))


def test_unit_range__roundtrip():
    px = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3)).astype(np.uint8)
    x = to_unit_range(px)
    assert x.shape == (2, 3, 256, 256) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(from_unit_range(x), px)
