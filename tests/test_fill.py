"""Issue #15: gap filling. The known latents come back exactly and the gaps are generated; gap
masks from a product's cloud mask, its nodata or a user's raster/vector file land on the right
pixels; the composite keeps every known pixel bit for bit and joins the fill to them; the
``fill`` command end to end on the synthetic world."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from shapely.geometry import box, mapping
from typer.testing import CliRunner

from majortom_gen.errors import MajorTomGenError
from majortom_gen.gaps import cloud_gaps, file_gaps, latent_gaps, nodata_gaps
from model.sample import generate
from pipelines.cli import app
from pipelines.cell_canvas import cell_fragments, cell_mosaic
from pipelines.fill import composite, harmonise, prefill

from conftest import WORLD_CELLS

runner = CliRunner()


def _tiny_net(seed: int = 0):
    from model.uvit import MultiModalUViT

    torch.manual_seed(seed)
    return MultiModalUViT(modalities=("DEM", "S1RTC", "S2L1C", "S2L2A"), img_size=32, in_chans=4, patch_size=8,
                          embed_dim=32, depth=2, num_heads=4).eval()


# ----------------------------------------------------------------------------- sampling with known latents
@pytest.mark.parametrize("side,resample", [(32, 0), (64, 0), (64, 2)])  # one window, a canvas; RePaint's jumps
def test_generate_known__kept_latents_come_back_exactly_and_the_gaps_are_generated(side, resample):
    net = _tiny_net()
    g = torch.Generator().manual_seed(1)
    cond = {"S1RTC": torch.randn(2, 4, side, side, generator=g)}
    x0 = torch.randn(2, 4, side, side, generator=g)
    keep = torch.ones(2, 1, side, side)
    keep[:, :, side // 4:side // 2, side // 4:] = 0  # a gap
    noise = {"S2L2A": torch.randn(2, 4, side, side, generator=g)}
    out = generate(net, cond, ["S2L2A", "DEM"], steps=3, seed=0, initial_noise=noise, known={"S2L2A": (x0, keep)},
                   stride=24, resample=resample)
    kept = keep.expand_as(x0).bool()
    assert torch.allclose(out["S2L2A"][kept], x0[kept], atol=1e-5)
    assert (out["S2L2A"][~kept] - x0[~kept]).abs().mean() > 0.1  # generated, not copied
    free = generate(net, cond, ["S2L2A", "DEM"], steps=3, seed=0, initial_noise=noise, stride=24)
    assert not torch.allclose(free["S2L2A"][~kept], out["S2L2A"][~kept], atol=1e-3)  # the known part steers the gap
    everything = generate(net, cond, ["S2L2A"], steps=3, seed=0, known={"S2L2A": (x0, torch.ones(1, 1, side, side))},
                          stride=24, resample=resample)
    assert torch.allclose(everything["S2L2A"], x0, atol=1e-5)
    if resample:  # the jumps' noise is the caller's to fix, e.g. per fragment: then the result is too
        draws = {}

        def noise_of(i):
            return draws.setdefault(i, {m: torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(100 + i))
                                        for m in ("S2L2A", "DEM")})

        kwargs = dict(steps=4, seed=0, initial_noise=noise, known={"S2L2A": (x0, keep)}, stride=24, resample=resample)
        once = generate(net, cond, ["S2L2A", "DEM"], resample_noise=noise_of, **kwargs)
        again = generate(net, cond, ["S2L2A", "DEM"], resample_noise=noise_of, **kwargs)
        plain = generate(net, cond, ["S2L2A", "DEM"], **{**kwargs, "resample": 0})
        assert torch.equal(once["S2L2A"], again["S2L2A"]) and len(draws) > 4
        assert not torch.allclose(once["S2L2A"][~kept], plain["S2L2A"][~kept], atol=1e-3)


@pytest.mark.parametrize("resample", [0, 2])
def test_generate_strength__gaps_start_from_the_given_latents_and_the_skipped_steps_cost_nothing(resample):
    net = _tiny_net()
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(2)
    cond = {"S1RTC": torch.randn(1, 4, 32, 32, generator=g)}
    x0 = torch.randn(1, 4, 32, 32, generator=g)  # e.g. an interpolation encoded: given in the gap too
    keep = torch.ones(1, 1, 32, 32)
    keep[..., 8:24, 8:24] = 0
    gap = ~keep.expand_as(x0).bool()
    kwargs = dict(steps=10, seed=0, known={"S2L2A": (x0, keep)}, resample=resample)
    far = {}
    for strength in (1.0, 0.5, 0.2):
        calls.clear()
        out = generate(net, cond, ["S2L2A"], strength=strength, **kwargs)["S2L2A"]
        far[strength] = float((out[gap] - x0[gap]).abs().mean())
        assert torch.allclose(out[~gap], x0[~gap], atol=1e-5)
        if not resample:  # network calls: the steps taken, no more
            assert len(calls) == round(strength * 10), (strength, len(calls))
    assert far[0.2] < far[0.5] < far[1.0]  # the lower the strength, the more of the given latents remains
    mixed = generate(net, cond, ["S2L2A", "DEM"], strength=0.5, **kwargs)  # DEM unknown: every step is taken
    assert torch.allclose(mixed["S2L2A"][~gap], x0[~gap], atol=1e-5) and mixed["DEM"].abs().mean() > 0.1
    with pytest.raises(ValueError, match="strength"):
        generate(net, cond, ["S2L2A"], strength=0.0, **kwargs)


def test_generate_known__refuses_what_does_not_fit():
    net = _tiny_net()
    x0, keep = torch.zeros(1, 4, 32, 32), torch.ones(1, 1, 32, 32)
    with pytest.raises(ValueError, match="not generated"):
        generate(net, {"S1RTC": x0}, ["DEM"], steps=1, known={"S1RTC": (x0, keep)})
    with pytest.raises(ValueError, match="do not fit"):
        generate(net, {"S1RTC": x0}, ["DEM"], steps=1, known={"DEM": (x0, torch.ones(1, 4, 32, 32))})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        generate(net, {"S1RTC": x0}, ["DEM"], steps=1, known={"DEM": (x0, keep * 2)})


# ----------------------------------------------------------------------------- gap masks
def test_latent_gaps__any_gap_pixel_marks_its_latent_pixel_and_the_halo_grows_it():
    gaps = np.zeros((256, 256), bool)
    gaps[17, 100] = True  # latent pixel (2, 12)
    lat = latent_gaps(gaps, halo=0)
    assert lat.shape == (32, 32) and lat.sum() == 1 and lat[2, 12]
    grown = latent_gaps(gaps, halo=1)
    assert grown.sum() == 9 and grown[1:4, 11:14].all()
    assert latent_gaps(np.stack([gaps, ~gaps]), halo=2).shape == (2, 32, 32)


def test_cloud_and_nodata_gaps__land_on_the_fragment_pixels():
    band = np.zeros((1068, 1068), np.uint8)
    band[22 + 3, 22 + 256 + 7] = 1  # fragment 1 (row 0, col 1), its pixel (3, 7): thick cloud
    band[22 + 256 + 10, 22 + 20] = 3  # fragment 4, pixel (10, 20): shadow
    band[22 + 100, 22 + 100] = 0
    gaps = cloud_gaps(band)
    assert len(gaps) == 16 and gaps[1][3, 7] and gaps[4][10, 20] and sum(g.sum() for g in gaps) == 2
    pixels = np.full((2, 256, 256, 3), 40, np.uint8)
    pixels[1, 5, 6] = 0
    pixels[1, 7, 8] = (0, 0, 9)  # dark but not nodata
    assert nodata_gaps(pixels).sum() == 1 and nodata_gaps(pixels)[1, 5, 6]
    with pytest.raises(MajorTomGenError, match="1068"):
        cloud_gaps(np.zeros((356, 356), np.uint8))


def _fragment_place():
    from majortom_gen.fragments import fragment_transform
    from majortom_gen.georef import product_box

    b = product_box(WORLD_CELLS[0])
    return b.crs, fragment_transform(b.transform(10.0), 22, 22)


def test_file_gaps__a_vector_or_raster_in_another_crs_lands_on_the_fragment_grid(tmp_path):
    import geopandas as gpd

    crs, t = _fragment_place()
    # the fragment's left half, as a polygon in EPSG:4326
    left = gpd.GeoSeries([box(t.c, t.f + 256 * t.e, t.c + 128 * t.a, t.f)], crs=crs).to_crs("EPSG:4326")
    path = tmp_path / "clouds.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": mapping(left.iloc[0])}]}))
    gaps = file_gaps(path, crs, [t, t @ Affine.translation(256, 0)])
    assert gaps.shape == (2, 256, 256) and not gaps[1].any()
    assert gaps[0][:, :126].all() and not gaps[0][:, 131:].any()  # the half, give or take reprojection
    # a raster in UTM with 20 m pixels: non-zero = gap, nodata ignored
    raster = tmp_path / "gaps.tif"
    data = np.zeros((128, 128), np.uint8)
    data[:64, :] = 1  # the top half
    data[100, 100] = 255  # nodata
    with rasterio.open(raster, "w", driver="GTiff", width=128, height=128, count=1, dtype="uint8", crs=crs, nodata=255,
                       transform=Affine(20.0, 0, t.c, 0, -20.0, t.f)) as dst:
        dst.write(data, 1)
    gaps = file_gaps(raster, crs, [t])[0]
    assert gaps[:128].all() and not gaps[128:].any()


def test_file_gaps__unreadable_or_unplaced_files_are_named(tmp_path):
    crs, t = _fragment_place()
    with pytest.raises(MajorTomGenError, match="no such file"):
        file_gaps(tmp_path / "nope.tif", crs, [t])
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(MajorTomGenError, match="bad.tif: not a readable"):
        file_gaps(bad, crs, [t])
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
        dst.write(np.ones((8, 8), np.uint8), 1)
    with pytest.raises(MajorTomGenError, match="no CRS"):
        file_gaps(plain, crs, [t])


# ----------------------------------------------------------------------------- composite
def test_composite__keeps_known_pixels_bit_for_bit_and_carries_a_tone_offset_into_the_gap():
    yy, xx = np.mgrid[0:512, 0:512]
    observed = np.stack([60 + xx / 8, 90 + yy / 10, 120 + (xx + yy) / 20], axis=-1).astype(np.uint8)
    gaps = (yy - 250) ** 2 + (xx - 200) ** 2 < 90 ** 2
    fill = np.clip(observed.astype(int) + 25, 0, 255).astype(np.uint8)  # right content, wrong tone (a decoder's)
    out = composite(fill, observed, gaps)
    assert np.array_equal(out[~gaps], observed[~gaps])
    assert np.abs(out[gaps].astype(int) - observed[gaps]).mean() < 2  # the offset is gone ...
    assert np.abs(fill[gaps].astype(int) - observed[gaps]).mean() > 20  # ... which pasting would keep
    assert harmonise(fill, observed, np.zeros_like(gaps)).shape == fill.shape


def test_prefill__interpolates_the_gaps_from_their_surroundings_and_keeps_the_rest():
    yy, xx = np.mgrid[0:1024, 0:1024]
    truth = np.stack([40 + xx / 8, 60 + yy / 8, 200 - (xx + yy) / 16], axis=-1).astype(np.uint8)
    gaps = ((yy - 400) ** 2 + (xx - 600) ** 2 < 150 ** 2) | ((yy > 900) & (xx < 300))  # a cloud, a nodata corner
    observed = np.where(gaps[..., None], np.uint8(250), truth)  # white under the cloud
    filled = prefill(observed, gaps)
    assert np.array_equal(filled[~gaps], observed[~gaps])
    err = np.abs(filled[gaps].astype(int) - truth[gaps])
    assert err.mean() < 12 and np.abs(observed[gaps].astype(int) - truth[gaps]).mean() > 100  # no white left
    # the pyramid filter agrees with a full-size Gaussian (what it replaces): to a tenth of a grey
    # level on a smooth image, to a fraction of what is left of pixel noise after blurring
    from scipy import ndimage
    from pipelines.fill import _gaussian_pyramid_filter
    image = np.random.default_rng(0).random((512, 512, 2)).astype(np.float32) * 255
    image[..., 1] = ndimage.gaussian_filter(image[..., 1], 16)
    for sigma in (4.0, 8.0, 64.0):
        full = ndimage.gaussian_filter(image, sigma, axes=(0, 1))
        diff = np.abs(_gaussian_pyramid_filter(image, sigma) - full)[64:-64, 64:-64]
        assert diff[..., 1].max() < 0.1 and diff[..., 0].mean() < 0.15 * full[..., 0].std(), sigma


def test_cell_mosaic__fragment_index_row_col_and_back():
    frags = np.arange(16, dtype=np.uint8)[:, None, None].repeat(256, 1).repeat(256, 2)
    mosaic = cell_mosaic(frags)
    assert mosaic.shape == (1024, 1024) and mosaic[0, 300] == 1 and mosaic[300, 0] == 4 and mosaic[1023, 1023] == 15
    assert np.array_equal(cell_fragments(mosaic), frags)


# ----------------------------------------------------------------------------- the command
def test_fill_cli__known_pixels_unchanged_gaps_filled_cells_without_gaps_skipped(store, world, tmp_path):
    import geopandas as gpd

    from pipelines.codec import source_fragments

    model = tmp_path / "model"
    _tiny_net().save_pretrained(model)
    crs, t = _fragment_place()
    cloud = box(t.c + 300 * t.a, t.f + 700 * t.e, t.c + 600 * t.a, t.f + 300 * t.e)  # across fragments 5, 6, 9, 10
    mask = tmp_path / "clouds.gpkg"
    gpd.GeoDataFrame(geometry=[cloud], crs=crs).to_file(mask)
    out = tmp_path / "filled"
    args = ["fill", "--store", str(store), "--model", str(model), "--source", str(world), "--cells",
            f"{WORLD_CELLS[0]},{WORLD_CELLS[1]}", "--modality", "S2L2A", "--condition", "S1RTC", "--n-samples", "2",
            "--steps", "2", "--out", str(out)]
    r = runner.invoke(app, args + ["--mask", str(mask)])
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output and WORLD_CELLS[1] in r.output  # no gap there
    record = json.loads((out / "fill.json").read_text())
    assert list(record["cells"]) == [WORLD_CELLS[0]] and "no gap pixel" in record["skipped"][WORLD_CELLS[1]]
    observed = source_fragments(world, [WORLD_CELLS[0]], ("S2L2A",))["S2L2A"]
    folder = out / WORLD_CELLS[0] / "S2L2A"
    filled_pixels = 0
    for f in range(16):
        with rasterio.open(folder / f"f{f:02d}_gap.tif") as src:
            gap = src.read(1).astype(bool)
            assert src.crs.to_string() == crs and src.transform.almost_equals(
                t @ Affine.translation(256 * (f % 4), 256 * (f // 4)))
        assert gap.any() == (f in (5, 6, 9, 10))
        for name in ("s0", "s1", "mean"):
            with rasterio.open(folder / f"f{f:02d}_{name}.tif") as src:
                px = src.read().transpose(1, 2, 0)
            assert np.array_equal(px[~gap], observed[f][~gap])  # bit for bit
            filled_pixels += int((px[gap] != observed[f][gap]).any(axis=-1).sum())
    assert filled_pixels > 0.5 * 3 * 300 * 400  # the gaps were generated, not copied
    assert (out / "quicklook" / f"{WORLD_CELLS[0]}.png").stat().st_size > 10_000
    mosaics = sorted(p.name for p in (out / "mosaic").iterdir())
    assert "S2L2A_s0_EPSG4326.tif" in mosaics and "S2L2A_mean_EPSG4326.tif" in mosaics
    assert any(name.endswith(".vrt") for name in mosaics)
    # mistakes are named, and nothing is written
    r = runner.invoke(app, args[:-1] + [str(tmp_path / "x"), "--modality", "DEM", "--mask", "cloud_mask"])
    assert r.exit_code == 2 and "only S2 products have a cloud mask" in r.output
    r = runner.invoke(app, args[:-1] + [str(tmp_path / "y"), "--mask", str(tmp_path / "none.tif")])
    assert r.exit_code == 2 and "none.tif" in r.output and not (tmp_path / "y").exists()
    only_clear = [WORLD_CELLS[1] if a.startswith(WORLD_CELLS[0]) else a for a in args[:-1]]
    r = runner.invoke(app, only_clear + [str(tmp_path / "z"), "--mask", str(mask)])
    assert r.exit_code == 2 and "nothing to fill" in r.output
