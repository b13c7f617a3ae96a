"""The Core thumbnail formulas, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from majortom_gen.thumbnails import dem_thumbnail, s1_thumbnail, s2_reflectance_from_thumbnail, s2_thumbnail


def test_s2_thumbnail__gain_gamma_and_truncation():
    dn = np.array([[0, 100, 1000, 2000, 3000, 10000, 65535]], dtype=np.uint16)
    out = s2_thumbnail(dn, dn, dn)
    expected = [int(min(1.0, 1.3 * (v / 10000) ** 0.6) * 255) for v in dn[0]]  # int() truncates
    assert out.dtype == np.uint8 and out.shape == (1, 7, 3)
    assert out[0, :, 0].tolist() == expected
    assert out[0, 5].tolist() == [255, 255, 255]  # saturated above ~6450 DN


def test_s2_thumbnail__channel_order_is_red_green_blue():
    r, g, b = (np.full((2, 2), v, np.uint16) for v in (3000, 1000, 100))
    px = s2_thumbnail(r, g, b)[0, 0]
    assert px[0] > px[1] > px[2]


def test_s2_reflectance_inverts_below_saturation():
    dn = np.linspace(50, 5000, 200).astype(np.uint16)
    thumb = s2_thumbnail(dn, dn, dn)[..., 0]
    back = s2_reflectance_from_thumbnail(thumb)
    step = (np.clip(thumb.astype(float) + 1, 0, 255) / 255 / 1.3) ** (1 / 0.6) - (thumb / 255 / 1.3) ** (1 / 0.6)
    assert np.all(np.abs(back - dn / 10000) <= step + 1e-9)


def _s1_reference(vv, vh, nd=-32768.0):
    """The published steps, in order, on copies."""
    vv, vh = vv.copy(), vh.copy()
    mvv, mvh = vv != nd, vh != nd
    vv[vv < 0] = vv[vv >= 0].min()
    vh[vh < 0] = vh[vh >= 0].min()
    a, b = 10 * np.log10(vv), 10 * np.log10(vh)
    a = (a - a[mvv].min()) / (a[mvv].max() - a[mvv].min()) * 255
    b = (b - b[mvh].min()) / (b[mvh].max() - b[mvh].min()) * 255
    a[~mvv] = 0
    b[~mvh] = 0
    return np.stack([a, 255 * (a + b) / np.max(a + b), b], -1).astype(np.uint8)


def test_s1_thumbnail__matches_published_steps_with_nodata():
    rng = np.random.default_rng(0)
    vv = rng.gamma(4, 0.05 / 4, (64, 64)).astype(np.float32)
    vh = rng.gamma(4, 0.01 / 4, (64, 64)).astype(np.float32)
    vv[:5] = -32768.0
    vh[:, :3] = -32768.0
    vv_in, vh_in = vv.copy(), vh.copy()
    out = s1_thumbnail(vv, vh)
    assert np.array_equal(out, _s1_reference(vv, vh))
    assert np.array_equal(vv, vv_in) and np.array_equal(vh, vh_in)  # inputs untouched
    assert (out[:5, :, 0] == 0).all() and (out[:, :3, 2] == 0).all()
    assert out[5:, 3:, 0].max() == 255 and out[5:, 3:, 0].min() == 0


def test_dem_thumbnail__is_a_hillshade():
    """Against a from-scratch hillshade: normals of the gradient, dotted with the light
    from azimuth 315 / altitude 45, min-max stretched."""
    y, x = np.mgrid[0:64, 0:64].astype(float)
    dem = 50 * np.sin(x / 9) + 30 * np.cos(y / 7) + 0.5 * x
    gy, gx = np.gradient(dem, -1, 1)
    n = np.dstack([-gx, -gy, np.ones_like(dem)])
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    az, alt = np.radians(90 - 315), np.radians(45)
    light = np.array([np.cos(az) * np.cos(alt), np.sin(az) * np.cos(alt), np.sin(alt)])
    i = n @ light
    expected = np.uint8(255 * np.clip((i - i.min()) / (i.max() - i.min()), 0, 1))
    out = dem_thumbnail(dem)
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_dem_thumbnail__flat_terrain_is_uniform():
    assert np.unique(dem_thumbnail(np.full((8, 8), 120.0))).size == 1


@pytest.mark.parametrize("fn,args", [(s2_thumbnail, 3), (s1_thumbnail, 2)])
def test_thumbnails__keep_shape(fn, args):
    a = np.full((5, 7), 500, np.float32) if fn is s1_thumbnail else np.full((5, 7), 500, np.uint16)
    if fn is s1_thumbnail:
        a = a * np.linspace(0.001, 1, 35, dtype=np.float32).reshape(5, 7)
    assert fn(*([a] * args)).shape == (5, 7, 3)
