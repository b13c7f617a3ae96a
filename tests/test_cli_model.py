"""train / sample / convert-weights from the command line, on a store made by ingest."""

from __future__ import annotations

import json

from dataclasses import replace

import numpy as np
import torch
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.ingest import IngestOptions, ingest

from conftest import WORLD_CELLS
from test_model import official_state_dict

runner = CliRunner()


def test_train_resume_and_sample(store, world, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--max-steps", "4"])
    assert r.exit_code == 0, r.output
    assert (run / "model" / "config.json").exists() and (run / "loss.png").stat().st_size > 1000
    grids = sorted((run / "samples").glob("step-*.png"))  # a sample grid per checkpoint
    assert [g.name for g in grids] == ["step-000004.png"]
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--max-steps", "4"])
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--max-steps", "6", "--resume",
                            "--mixed-precision", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.output and "bf16" in r.output
    # resumed in bf16 (CPU autocast): the run records the change
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--max-steps", "6", "--resume",
                            "--mixed-precision", "bf16"])
    assert r.exit_code == 0, r.output
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 6
    assert json.loads((run / "model" / "run_config.json").read_text())["train"]["mixed_precision"] == "bf16"
    out = tmp_path / "samples"
    r = runner.invoke(app, ["sample", "--model", str(run / "model"), "--store", str(store), "--cells", WORLD_CELLS[0],
                            "--condition", "S2L2A,S2L1C", "--generate", "DEM,S1RTC", "--n-samples", "2", "--steps", "3",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    z = np.load(out / "samples.npz")
    assert z["latent_DEM"].shape == (32, 4, 32, 32) and set(z["grid_cell"]) == {WORLD_CELLS[0]}
    assert (out / f"{WORLD_CELLS[0]}.png").exists()
    # re-running one cell regenerates the same latents (per-fragment seeds)
    r = runner.invoke(app, ["sample", "--model", str(run / "model"), "--store", str(store), "--cells", WORLD_CELLS[0],
                            "--condition", "S2L2A,S2L1C", "--generate", "DEM,S1RTC", "--n-samples", "2", "--steps", "3",
                            "--out", str(tmp_path / "again")])
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npz")["latent_DEM"], z["latent_DEM"])
    _check_export(store, world, out, tmp_path / "tifs")
    _check_export_uses_the_runs_georef(store, out, tmp_path)
    _check_generate_region(store, run / "model", tmp_path / "region")
    _check_ingest_on_the_fly(world, store, run / "model", tmp_path)
    r = runner.invoke(app, ["sample", "--model", str(run / "model"), "--store", str(store), "--cells", WORLD_CELLS[0],
                            "--generate", "LANDSAT", "--out", str(out)])
    assert r.exit_code == 2 and "unknown modality" in r.output


def _check_export(store, world, samples, tifs):
    """Exported COGs sit exactly on the source product's 10 m band grid, labelled honestly."""
    import rasterio
    from rasterio.windows import Window, transform as window_transform

    from majortom_gen.sources import decode_band, read_metadata, read_product_of

    r = runner.invoke(app, ["export", "--samples", str(samples), "--store", str(store), "--out", str(tifs)])
    assert r.exit_code == 0, r.output
    files = sorted(p for p in tifs.rglob("*.tif") if p.parent.name != "mosaic")
    assert len(files) == 16 * 2 * 2  # fragments x samples x generated modalities
    index = (tifs / "index.md").read_text()
    assert "DEM_s0_EPSG4326.tif" in index and f"{WORLD_CELLS[0]}.png" in index and "not reflectance" in index
    mosaic = tifs / "mosaic"
    assert (mosaic / "DEM_s0_EPSG4326.tif").exists() and (mosaic / "DEM_std_EPSG4326.tif").exists()
    assert (mosaic / "S1RTC_s1_EPSG32632.vrt").exists()
    with rasterio.open(mosaic / "S1RTC_s1_EPSG32632.vrt") as ds:
        assert ds.count == 3 and ds.read(1).max() > 0
    md = read_metadata(world / "Core-S2L2A", "S2L2A")
    row = md[(md.grid_cell == WORLD_CELLS[0]) & (md.nodata < 1)].iloc[0]
    band = decode_band(read_product_of(row, ["B04"]), "B04")
    with rasterio.open(tifs / WORLD_CELLS[0] / "DEM" / "f06_s1.tif") as ds:
        assert ds.count == 1 and "hillshade" in ds.descriptions[0] and "not elevation" in ds.tags()["CONTENT"]
        assert ds.crs.to_string() == band.crs and ds.tags()["CONDITION"] == "S2L1C,S2L2A"
        expected = window_transform(Window(22 + 512, 22 + 256, 256, 256), band.transform)  # fragment 6 = row 1, col 2
        for got, want in zip(ds.transform[:6], expected[:6]):
            assert abs(got - want) < 0.1 * 10  # a tenth of a 10 m pixel
        assert ds.profile["blockxsize"] == 256
    with rasterio.open(tifs / WORLD_CELLS[0] / "S1RTC" / "f00_s0.tif") as ds:
        assert ds.count == 3 and all("not backscatter" in d for d in ds.descriptions)


def _check_export_uses_the_runs_georef(store, samples, tmp_path):
    """Export places each fragment by the sample run's own georeferencing, not the store's:
    a row's transform shifted in samples.npz moves its COG; a run without georeferencing (an
    older version's) is refused with a message saying to re-run sample."""
    import shutil

    import pytest
    import rasterio
    from affine import Affine

    from majortom_gen.errors import MajorTomGenError
    from majortom_gen.store import LatentStore
    from pipelines.export import export_samples

    edited = tmp_path / "samples-edited"
    shutil.copytree(samples, edited)
    with np.load(samples / "samples.npz") as z:
        arrays = {k: z[k] for k in z.files}
    row = 5
    cell, frag, s = arrays["grid_cell"][row], int(arrays["fragment_index"][row]), int(arrays["sample"][row])
    original = Affine(*arrays["utm_transform"][row])
    arrays["utm_transform"][row, 2] += 2560.0  # one fragment width east
    np.savez_compressed(edited / "samples.npz", **arrays)
    result = export_samples(edited, store, tmp_path / "tifs-edited", mosaic=False)
    assert len(result.files) == 16 * 2 * 2 + 1
    with rasterio.open(tmp_path / "tifs-edited" / cell / "DEM" / f"f{frag:02d}_s{s}.tif") as ds:
        assert ds.transform == original @ Affine.translation(256, 0)
        assert ds.crs.to_string() == arrays["utm_crs"][row]
        assert json.loads(ds.tags()["SOURCE_PRODUCT_IDS"]) == json.loads(arrays["source_product_ids"][row])
    stored = LatentStore.open(store).lookup(cells=[cell]).set_index("fragment_index").loc[frag, "utm_transform"]
    assert Affine(*list(stored)[:6]) == original  # the store is unchanged
    np.savez_compressed(edited / "samples.npz", **{k: v for k, v in arrays.items() if not k.startswith(("utm_", "source_"))})
    with pytest.raises(MajorTomGenError, match="older version.*re-run `majortom-gen sample`"):
        export_samples(edited, store, tmp_path / "tifs-old", mosaic=False)


def _check_generate_region(store, model, out):
    import rasterio
    from rasterio.features import geometry_mask

    from majortom_gen.georef import default_grid

    grid = default_grid()
    inner = grid.footprint(WORLD_CELLS[1]).buffer(-0.02)  # inside one stored cell
    beyond = grid.footprint("600U_5R").buffer(-0.02)  # a cell the store lacks
    region = inner.union(beyond)
    r = runner.invoke(app, ["generate", "--store", str(store), "--model", str(model), "--out", str(out),
                            "--region", region.wkt, "--generate", "DEM", "--steps", "3"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "region.json").read_text())
    assert summary["groups"] == {"S1RTC+S2L1C+S2L2A": [WORLD_CELLS[1]]} and "600U_5R" in summary["skipped"]
    with rasterio.open(out / "geotiff" / "mosaic" / "DEM_s0_EPSG4326.tif") as ds:
        data = ds.read(1)
        inside = geometry_mask([inner], out_shape=data.shape, transform=ds.transform, invert=True)
        assert (data[inside] > 0).all() and (data[~inside] == 0).all()
    r = runner.invoke(app, ["generate", "--store", str(store), "--model", str(model), "--out", str(out),
                            "--region", "POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))", "--generate", "DEM"])
    assert r.exit_code == 2 and "invalid geometry" in r.output
    assert (out / "geotiff" / "mosaic" / "DEM_s0_EPSG4326.tif").exists()  # a failed re-run leaves the output intact
    s2 = out.with_name("region-s2")
    r = runner.invoke(app, ["generate", "--store", str(store), "--model", str(model), "--out", str(s2), "--cells",
                            WORLD_CELLS[1], "--generate", "S2L2A", "--condition", "S1RTC", "--steps", "2", "--reflectance"])
    assert r.exit_code == 0, r.output
    refl = sorted((s2 / "geotiff" / WORLD_CELLS[1] / "S2L2A").glob("*_reflectance.tif"))
    assert len(refl) == 16
    with rasterio.open(refl[0]) as ds:
        assert ds.count == 3 and ds.dtypes[0] == "float32" and "CAVEAT" in ds.tags()
    assert not [p for p in (s2 / "geotiff" / "mosaic").iterdir() if "reflectance" in p.name]


def _check_ingest_on_the_fly(world, store, model, tmp_path):
    from majortom_gen.store import LatentStore

    partial = tmp_path / "partial-store"
    # a store for the model must be encoded with the model's codec (here: the training store's patch-pca)
    ingest(world, list(WORLD_CELLS[:2]), partial, IngestOptions(scheduler="synchronous", codec="patch-pca",
                                                                codec_source=str(store / "codec")))
    r = runner.invoke(app, ["generate", "--store", str(partial), "--model", str(model), "--out", str(tmp_path / "fly"),
                            "--cells", WORLD_CELLS[2], "--generate", "S1RTC", "--steps", "2", "--source", str(world),
                            "--crs", "EPSG:32632"])
    assert r.exit_code == 0, r.output
    assert WORLD_CELLS[2] in LatentStore.open(partial).stored_cells()
    assert (tmp_path / "fly" / "geotiff" / "mosaic" / "S1RTC_s0_EPSG32632.tif").exists()


def test_convert_weights(tmp_path):
    cfg = dict(embed_dim=32, depth=2, num_heads=4, patch_size=2, img_size=8, in_chans=4, qkv_bias=False)
    torch.save(official_state_dict(4, **cfg), tmp_path / "nnet_ema.pth")
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({"nnet": {**cfg, "mlp_time_embed": False}}))
    r = runner.invoke(app, ["convert-weights", "--checkpoint", str(tmp_path / "nnet_ema.pth"), "--config",
                            str(tmp_path / "small.yaml"), "--out", str(tmp_path / "converted")])
    assert r.exit_code == 0, r.output
    from model.uvit import MultiModalUViT

    net = MultiModalUViT.from_pretrained(tmp_path / "converted")
    assert net.modalities == ["DEM", "S1RTC", "S2L1C", "S2L2A"] and net.config.embed_dim == 32
    (tmp_path / "big.yaml").write_text(yaml.safe_dump({"nnet": {**cfg, "embed_dim": 64}}))
    r = runner.invoke(app, ["convert-weights", "--checkpoint", str(tmp_path / "nnet_ema.pth"), "--config",
                            str(tmp_path / "big.yaml"), "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "does not match" in r.output


def test_sampling_is_per_fragment_whatever_the_batch_and_workers(store, tmp_path):
    """Condition draws, starting noise and the noise of marginalised modalities are per
    fragment: a cell sampled alone, in a bigger selection, in other chunks or on two Dask
    workers gives the same latents."""
    from pipelines.sample import SamplingOptions, sample_store

    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--max-steps", "2"])
    assert r.exit_code == 0, r.output
    kwargs = dict(condition=("S2L1C",), generate_modalities=("DEM",))  # S1RTC, S2L2A free
    options = SamplingOptions(steps=2, n_samples=2, seed=5)
    alone = sample_store(run / "model", store, [WORLD_CELLS[0]], out=tmp_path / "alone", options=options, **kwargs)
    both = sample_store(run / "model", store, list(WORLD_CELLS[:2]), out=tmp_path / "both",
                        options=replace(options, batch_size=5), **kwargs)
    dask = sample_store(run / "model", store, list(WORLD_CELLS[:2]), out=tmp_path / "dask",
                        options=replace(options, batch_size=8, workers=2), **kwargs)
    a, b, d = (np.load(x.out / "samples.npz") for x in (alone, both, dask))
    first = b["grid_cell"] == WORLD_CELLS[0]
    assert first.sum() == 32 and np.array_equal(b["latent_DEM"][first], a["latent_DEM"])
    assert np.array_equal(b["latent_S2L1C"][first], a["latent_S2L1C"])  # sampled conditions too
    assert np.array_equal(d["latent_DEM"], b["latent_DEM"])
    assert not np.array_equal(a["latent_DEM"][0], a["latent_DEM"][1])  # two samples differ


def test_chain_cli(store, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--max-steps", "2"]).exit_code == 0
    out = tmp_path / "chain"
    r = runner.invoke(app, ["chain", "--model", str(run / "model"), "--store", str(store), "--cells", WORLD_CELLS[0],
                            "--a", "S1RTC", "--b", "S2L2A,DEM", "--n", "3", "--steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    z = np.load(out / "chain.npz")
    assert json.loads((out / "chain.json").read_text())["outputs"] == [
        "latent_DEM_1", "latent_S2L2A_1", "latent_S1RTC_2", "latent_DEM_3", "latent_S2L2A_3"]
    assert z["latent_S1RTC_2"].shape == (16, 4, 32, 32) and z["real_S1RTC"].shape == (16, 4, 32, 32)
    assert not np.array_equal(z["latent_S2L2A_1"], z["latent_S2L2A_3"])
    assert (out / f"{WORLD_CELLS[0]}.png").exists()
    r = runner.invoke(app, ["chain", "--model", str(run / "model"), "--store", str(store), "--cells", WORLD_CELLS[0],
                            "--a", "S1RTC", "--b", "S1RTC", "--out", str(out)])
    assert r.exit_code == 2 and "disjoint" in r.output


def test_sd_vae_store_exports_with_the_same_vae(world, tmp_path):
    """A store made with an sd-vae records where the VAE came from, so sample and export decode
    without being given it again; another VAE is refused; a store that does not record it
    (made by an older version) says to pass --codec-source."""
    import json

    import rasterio
    from diffusers import AutoencoderKL

    from majortom_gen.store import LatentStore
    from test_codecs import TINY_VAE

    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    torch.manual_seed(1)
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "other-vae")
    store = tmp_path / "store"
    ingest(world, [WORLD_CELLS[0]], store, IngestOptions(scheduler="synchronous", codec="sd-vae",
                                                         codec_source=str(tmp_path / "vae")))
    assert LatentStore.open(store).codec_source == str((tmp_path / "vae").resolve())
    more = ingest(world, [WORLD_CELLS[1]], store, IngestOptions(scheduler="synchronous", codec="sd-vae"))
    assert more.cells_written == 1  # the recorded VAE, not given again
    run = tmp_path / "run"
    assert runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--max-steps", "2",
                               "--test-fraction", "0"]).exit_code == 0
    samples = tmp_path / "samples"
    r = runner.invoke(app, ["sample", "--model", str(run / "model"), "--store", str(store), "--cells", WORLD_CELLS[0],
                            "--condition", "S2L2A", "--generate", "DEM", "--steps", "2", "--out", str(samples)])
    assert r.exit_code == 0, r.output
    assert [p.name for p in samples.glob("*.png")] == [f"{WORLD_CELLS[0]}.png"]  # decoded with the recorded VAE
    r = runner.invoke(app, ["export", "--samples", str(samples), "--store", str(store), "--out", str(tmp_path / "t1"),
                            "--codec-source", str(tmp_path / "other-vae")])
    assert r.exit_code == 2 and "is not the one that made the store's latents" in r.output
    r = runner.invoke(app, ["export", "--samples", str(samples), "--store", str(store), "--out", str(tmp_path / "t2"),
                            "--no-mosaic"])
    assert r.exit_code == 0, r.output
    tifs = sorted((tmp_path / "t2" / WORLD_CELLS[0] / "DEM").glob("*.tif"))
    assert len(tifs) == 16
    with rasterio.open(tifs[0]) as ds:
        assert ds.crs.to_epsg() == 32632 and ds.tags()["CODEC"] == "sd-vae"
    manifest = json.loads((store / "manifest.json").read_text())
    del manifest["codec"]["source"]  # as an older version wrote it
    (store / "manifest.json").write_text(json.dumps(manifest))
    r = runner.invoke(app, ["export", "--samples", str(samples), "--store", str(store), "--out", str(tmp_path / "t0")])
    assert r.exit_code == 2 and "pass --codec-source" in r.output
    r = runner.invoke(app, ["export", "--samples", str(samples), "--store", str(store), "--out", str(tmp_path / "t3"),
                            "--codec-source", str(tmp_path / "vae"), "--no-mosaic"])
    assert r.exit_code == 0, r.output
