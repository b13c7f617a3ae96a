"""Fault injection: what a careful user tries to break (issue #12). Each test failed before
its fix: outputs never destroy what the tool did not write, a model never runs on latents of
another codec, numeric options are checked before any work, messages name the user's item."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from majortom_gen.cli import app
from majortom_gen.errors import MajorTomGenError
from majortom_gen.staging import MARKER, check_output, remove_stale_partials, staged_folder

from conftest import WORLD_CELLS

runner = CliRunner()


# ----------------------------------------------------------------------------- outputs (items 11, 19)
def _write(tmp, name="a.txt", text="x"):
    (tmp / name).write_text(text)


def test_out_folder_with_user_files_is_never_replaced(tmp_path):
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "chapter1.tex").write_text("years of work")
    with pytest.raises(MajorTomGenError, match="did not write"):
        with staged_folder(user) as tmp:
            _write(tmp)
    assert (user / "chapter1.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["thesis"]  # no partial folder left


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(MajorTomGenError, match="is a file"):
        check_output(f)
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_out_equal_to_or_holding_an_input_is_refused(tmp_path):
    store = tmp_path / "work" / "store"
    store.mkdir(parents=True)
    (store / "manifest.json").write_text("{}")
    for out in (store, tmp_path / "work", store / "geotiff"):
        with pytest.raises(MajorTomGenError, match="input"):
            check_output(out, inputs=[store], overwrite=True)
    assert (store / "manifest.json").exists()


def test_working_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", tmp_path, tmp_path.parent):
        with pytest.raises(MajorTomGenError, match="working directory"):
            check_output(out)


def test_earlier_output_needs_overwrite_and_is_then_replaced(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out, kind="test") as tmp:
        _write(tmp, text="one")
    assert (out / MARKER).exists()
    with pytest.raises(MajorTomGenError, match="--overwrite"):
        with staged_folder(out) as tmp:
            _write(tmp, text="two")
    assert (out / "a.txt").read_text() == "one"
    with staged_folder(out, overwrite=True) as tmp:
        _write(tmp, text="two")
    assert (out / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with staged_folder(out) as tmp:
        _write(tmp)
    assert (out / "a.txt").exists()


def test_leftovers_of_killed_runs_are_removed_by_the_next_run_in_that_folder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".other.partial-{dead_pid}-0123abcd"  # another output's, from a killed run
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"0" * 1000)
    legacy = tmp_path / ".old.partial-89abcdef"  # a name without pid (older versions)
    legacy.mkdir()
    alive = tmp_path / f".busy.partial-{os.getpid()}-fedcba98"  # a run still going
    alive.mkdir()
    with staged_folder(tmp_path / "new") as tmp:
        _write(tmp)
    assert not stale.exists() and not legacy.exists() and alive.exists()
    assert remove_stale_partials(tmp_path) == []


def test_write_errors_name_the_users_path_not_the_hidden_one(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MajorTomGenError) as info:
        with staged_folder(out) as tmp:
            raise OSError(28, "No space left on device", str(tmp / "x.tif"))
    assert str(out) in str(info.value) and ".partial" not in str(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gdal_write_errors_become_a_message_naming_the_output(tmp_path):
    from rasterio._err import CPLE_AppDefinedError

    out = tmp_path / "tifs"
    with pytest.raises(MajorTomGenError, match="could not write .*tifs.*TIFFAppendToStrip"):
        with staged_folder(out):
            raise CPLE_AppDefinedError(1, 1, "TIFFAppendToStrip:Seek error")
    assert not out.exists()


def test_cli_refuses_a_user_folder_before_any_work(store, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["dataset", "build", "--store", str(store), "--out", str(user), "--no-hf"])
    assert r.exit_code == 2 and "did not write" in r.output
    assert [p.name for p in user.iterdir()] == ["keep.txt"]
    r = runner.invoke(app, ["dataset", "build", "--store", str(store), "--out", str(store), "--no-hf", "--overwrite"])
    assert r.exit_code == 2 and "input" in r.output
    assert (store / "manifest.json").exists()


# ----------------------------------------------------------------------------- model folders (items 1, 9, 17)
def _tiny_model(folder, codec_record=None):
    from model.uvit import MultiModalUViT

    net = MultiModalUViT(modalities=("DEM", "S1RTC", "S2L1C", "S2L2A"), img_size=32, patch_size=8, in_chans=4,
                         embed_dim=32, depth=2, num_heads=2)
    net.save_pretrained(folder)
    if codec_record is not None:
        (folder / "training_data.json").write_text(json.dumps({"codec": codec_record, "train_cells": None}))
    return folder


def test_run_folder_is_accepted_as_model_and_bad_paths_say_what_is_expected(tmp_path):
    from pipelines.model_folder import resolve_model_dir

    run = tmp_path / "run"
    _tiny_model(run / "model")
    assert resolve_model_dir(run) == run / "model"
    assert resolve_model_dir(run / "model") == run / "model"
    with pytest.raises(MajorTomGenError, match="does not exist"):
        resolve_model_dir(tmp_path / "nowhere")
    with pytest.raises(MajorTomGenError, match="expected config.json"):
        resolve_model_dir(tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(MajorTomGenError, match="AutoencoderKL"):
        resolve_model_dir(tmp_path / "vae")


def test_model_on_a_store_of_another_codec_is_refused(store, tmp_path):
    from majortom_gen.store import LatentStore
    from pipelines.model_folder import open_model_for_store, sd_vae_record

    have = LatentStore.open(store).codec
    other = _tiny_model(tmp_path / "other", {"name": "small-vae", "config_hash": "f" * 64})
    with pytest.raises(MajorTomGenError, match="Ingest"):
        open_model_for_store(other, store)
    converted = _tiny_model(tmp_path / "converted", sd_vae_record())
    with pytest.raises(MajorTomGenError, match="0.18215"):
        open_model_for_store(converted, store)
    same = _tiny_model(tmp_path / "same", {"name": have["name"], "config_hash": have["config_hash"]})
    assert open_model_for_store(same, store) == same
    for command in (["sample", "--generate", "DEM", "--condition", "S2L2A"],
                    ["generate", "--generate", "DEM"]):
        r = runner.invoke(app, command + ["--model", str(converted), "--store", str(store), "--cells", WORLD_CELLS[0],
                                          "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and "sd-vae" in r.output, r.output
        assert not (tmp_path / "o").exists()
    r = runner.invoke(app, ["evaluate", "--model", str(converted), "--store", str(store), "--out", str(tmp_path / "e"),
                            "--conditions", "none", "--generate", "DEM", "--split", "all"])
    assert r.exit_code == 2 and "sd-vae" in r.output, r.output


def test_model_without_codec_record_warns(store, tmp_path):
    from pipelines.model_folder import ModelCodecWarning, open_model_for_store

    bare = _tiny_model(tmp_path / "bare")
    with pytest.warns(ModelCodecWarning, match="does not record"):
        open_model_for_store(bare, store)


# ----------------------------------------------------------------------------- numeric options (item 14)
@pytest.mark.parametrize("option,value", [("--steps", "0"), ("--steps", "-4"), ("--n-samples", "0"),
                                          ("--n-samples", "-3"), ("--workers", "-1"), ("--seed", "-1")])
def test_numeric_options_are_checked_before_any_work(store, tmp_path, option, value):
    r = runner.invoke(app, ["sample", "--model", str(tmp_path / "m"), "--store", str(store), "--cells", WORLD_CELLS[0],
                            "--generate", "DEM", "--out", str(tmp_path / "o"), option, value])
    assert r.exit_code == 2 and option in r.output and "sampling" not in r.output, r.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- small ones (item 20)
def test_cells_file_may_hold_comments_and_names_bad_lines(tmp_path):
    from majortom_gen.selection import parse_cell_list

    f = tmp_path / "cells.txt"
    f.write_text("# my cells\n501U_60R  # Turin\n\n502U_60R,501U_59R\n")
    assert parse_cell_list([str(f)]) == ["501U_60R", "502U_60R", "501U_59R"]
    f.write_text("501U_60R\nTurin\n")
    with pytest.raises(MajorTomGenError, match="line 2"):
        parse_cell_list([str(f)])


def test_cells_from_official_split_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from majortom_gen.selection import parse_cell_list

    path = tmp_path / "test_metadata.parquet"
    pq.write_table(pa.table({"grid_cell": ["501U_60R"] * 16 + ["502U_60R"] * 16, "patch_num": list(range(16)) * 2}), path)
    assert parse_cell_list([str(path)]) == ["501U_60R", "502U_60R"]


# ----------------------------------------------------------------------------- the official split (item 2)
def test_official_split_follows_the_rule_and_depends_on_the_hash_seed():
    from majortom_gen.splits import official_split

    cells = [f"{r}U_{c}R" for r in range(100, 110) for c in range(50, 60)]
    a = official_split(cells, hash_seed=0)
    assert len(a["train"]) == 95 and len(a["test"]) == 5 and sorted(a["train"] + a["test"]) == sorted(cells)
    assert official_split(cells, hash_seed=0) == a  # reproducible for a fixed PYTHONHASHSEED
    tests = {tuple(sorted(official_split(cells, hash_seed=s)["test"])) for s in (1, 2, 3)}
    assert len(tests | {tuple(sorted(a["test"]))}) > 1  # ...and not without it: the release's is unknown


def test_converted_model_records_codec_and_split(tmp_path):
    import torch
    import yaml

    from pipelines.model_folder import expected_codec, model_record
    from test_model import official_state_dict

    cfg = dict(embed_dim=32, depth=2, num_heads=4, patch_size=2, img_size=8, in_chans=4, qkv_bias=False)
    torch.save(official_state_dict(4, **cfg), tmp_path / "nnet_ema.pth")
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({"nnet": {**cfg, "mlp_time_embed": False}}))
    cells = tmp_path / "train_cells.txt"
    cells.write_text("501U_60R\n502U_60R\n")
    r = runner.invoke(app, ["convert-weights", "--checkpoint", str(tmp_path / "nnet_ema.pth"), "--config",
                            str(tmp_path / "small.yaml"), "--out", str(tmp_path / "conv"), "--training-cells", str(cells)])
    assert r.exit_code == 0, r.output
    rec = model_record(tmp_path / "conv")
    assert expected_codec(tmp_path / "conv")["name"] == "sd-vae"
    assert np.isclose(rec["codec"]["latent_norm"]["scale"], 0.18215)
    assert rec["train_cells"] == ["501U_60R", "502U_60R"] and "PYTHONHASHSEED" in rec["split"]["rule"]
    r = runner.invoke(app, ["convert-weights", "--checkpoint", str(tmp_path / "nnet_ema.pth"), "--config",
                            str(tmp_path / "small.yaml"), "--out", str(tmp_path / "conv2")])
    assert r.exit_code == 0 and "training cells unknown" in r.output
    assert model_record(tmp_path / "conv2")["train_cells"] is None


# ----------------------------------------------------------------------------- encoder and decoder weights (item 5)
def test_sd_vae_source_may_name_encoder_and_decoder_weights(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from model.codecs import load_codec

    config = dict(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4)
    for name, seed in (("enc", 0), ("dec", 1)):
        torch.manual_seed(seed)
        AutoencoderKL(**config).save_pretrained(tmp_path / name)
    enc, dec = str(tmp_path / "enc"), str(tmp_path / "dec")
    both = load_codec("sd-vae", f"{enc},{dec}")
    alone = load_codec("sd-vae", enc)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(both.encode_moments(images), alone.encode_moments(images))  # latents from the encoder weights
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(both.decode(z), load_codec("sd-vae", dec).decode(z))  # pictures from the decoder weights
    assert not torch.allclose(both.decode(z), alone.decode(z))
    assert both.info()["config_hash"] == alone.info()["config_hash"]  # a store encoded with enc decodes with both
    with pytest.raises(ValueError, match="ENCODE,DECODE"):
        load_codec("sd-vae", f"{enc},{dec},{enc}")


# ----------------------------------------------------------------------------- evaluation like the paper (item 6)
def test_fid_resize_is_tensorflow1_bilinear():
    import torch
    from torch.nn import functional as F

    from model.features import resize_bilinear_tf1

    x = torch.tensor([[[[0.0, 3.0]]]])  # 1 x 2 -> 1 x 3: samples at 0, 2/3, 4/3 (clamped to the last pixel)
    assert torch.allclose(resize_bilinear_tf1(x, (1, 3)), torch.tensor([[[[0.0, 2.0, 3.0]]]]))
    images = torch.rand(2, 3, 256, 256)
    ours = resize_bilinear_tf1(images, (299, 299))
    assert ours.shape == (2, 3, 299, 299)
    assert torch.equal(ours[..., 0, 0], images[..., 0, 0])  # TF1: output pixel 0 is input pixel 0
    assert not torch.allclose(ours, F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False))


# ----------------------------------------------------------------------------- long errors (item 18)
def test_region_outside_the_store_gives_a_short_summary(store, tmp_path):
    from majortom_gen.store import LatentStore

    have = LatentStore.open(store).codec
    model = _tiny_model(tmp_path / "m", {"name": have["name"], "config_hash": have["config_hash"]})
    r = runner.invoke(app, ["generate", "--model", str(model), "--store", str(store), "--region", "-30,-10,-20,0",
                            "--generate", "DEM", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert len(r.output) < 1500 and "12,502 cells not in the store" in r.output and "more" in r.output, r.output
    listing = r.output.split("full list in ")[1].split(")")[0].replace("\n", "")
    assert len(open(listing).read().splitlines()) == 12502


# ----------------------------------------------------------------------------- small ones (item 20)
def test_grid_locate_error_prints_plain_numbers():
    r = runner.invoke(app, ["grid", "locate", "--lat", "95", "--lon", "0"])
    assert r.exit_code == 2 and "lat=95.0" in r.output and "np.float64" not in r.output, r.output


def test_preview_sheet_survives_one_bad_thumbnail(world, tmp_path, monkeypatch):
    from PIL import Image

    import majortom_gen.inspect as inspect_module
    from majortom_gen.errors import DecodeError

    real = inspect_module.decode_product_thumbnail
    calls = {"n": 0}

    def flaky(product, item):
        calls["n"] += 1
        if calls["n"] == 2:
            raise DecodeError(f"{item}: truncated PNG")
        return real(product, item=item)

    monkeypatch.setattr(inspect_module, "decode_product_thumbnail", flaky)
    with pytest.warns(UserWarning, match="truncated PNG"):
        sheet = inspect_module.preview_sheet(world, tmp_path / "sheet.png")
    assert Image.open(sheet).size[0] > 0 and calls["n"] > 2  # the sheet went on after the bad one


# ----------------------------------------------------------------------------- evaluation (items 2, 6, 17)
@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    from model.features import save_random_extractors

    root = tmp_path_factory.mktemp("faults-eval")
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(root / "run"), "--max-steps", "2"])
    assert r.exit_code == 0, r.output
    return root / "run", save_random_extractors(root / "extractors")


def _evaluate(run, store, ext, out, *extra):
    return runner.invoke(app, ["evaluate", "--model", str(run), "--store", str(store), "--out", str(out),
                               "--fid-extractor", str(ext["inception"]), "--pr-extractor", str(ext["dinov2"]),
                               "--steps", "1", "--conditions", "none", "--generate", "DEM", *extra])


def test_evaluation_of_a_model_with_unknown_training_cells_says_so(trained, store, world, tmp_path):
    import shutil

    run, ext = trained
    model = tmp_path / "published"
    shutil.copytree(run / "model", model)
    record = json.loads((model / "training_data.json").read_text())
    (model / "training_data.json").write_text(json.dumps({"codec": record["codec"], "train_cells": None}))
    r = _evaluate(model, store, ext, tmp_path / "e1")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert meta["settings"]["training_cells"] == "unknown" and meta["settings"]["cells"] == sorted(WORLD_CELLS)
    assert "Warning" in (tmp_path / "e1" / "table1.md").read_text()
    seen = tmp_path / "train_metadata.txt"
    seen.write_text("# the official training cells\n" + "\n".join(WORLD_CELLS[:2]) + "\n")
    r = _evaluate(model, store, ext, tmp_path / "e2", "--exclude-cells", str(seen))
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert meta["settings"]["cells"] == [WORLD_CELLS[2]] and meta["settings"]["excluded_cells"] == sorted(WORLD_CELLS[:2])


def test_evaluation_states_n_reads_real_images_from_shards_and_survives_a_truncated_cache(trained, store, world, tmp_path):
    run, ext = trained
    cache = tmp_path / "cache"
    args = ("--split", "all", "--max-fragments", "6", "--cache-dir", str(cache))
    r = _evaluate(run, store, ext, tmp_path / "a", *args)
    assert r.exit_code == 0, r.output
    table = (tmp_path / "a" / "table1.md").read_text()
    assert table.count("N = 6 fragments, 1 sample(s) each") == 3  # every table says how many
    for entry in cache.glob("*.npz"):  # a killed write from an older version, a disk error...
        entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        r = _evaluate(run, store, ext, tmp_path / "b", *args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "metrics.csv").read_text() == (tmp_path / "a" / "metrics.csv").read_text()
    r = _evaluate(run, store, ext, tmp_path / "c", *args, "--real-source", str(world))
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert "read from the shards" in meta["settings"]["real_images"]
    import csv

    psnr = [float(next(csv.DictReader(open(tmp_path / f / "metrics.csv")))["psnr"]) for f in "ac"]
    assert psnr[0] != psnr[1]  # compared with the shards' pixels, not the codec's reconstruction


def test_device_cuda_without_cuda_is_refused_before_any_work(store, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for command in (["sample", "--generate", "DEM"], ["generate", "--generate", "DEM"]):
        r = runner.invoke(app, command + ["--model", str(tmp_path / "m"), "--store", str(store), "--cells", WORLD_CELLS[0],
                                          "--out", str(tmp_path / "o"), "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA device" in r.output, r.output
