"""Fault injection: what a careful user tries to break (issue #12). Each test failed before
its fix. Sections: outputs never destroy what the tool did not write; a model never runs on
latents of another codec; numeric options and devices are checked before any work; messages
name the user's item; evaluation states what it compared; the store (one writer, no
duplicates, failed modalities retried, damaged shards named and repaired); training
(checkpoints pruned, the final model swapped in whole, resume checks, config errors named)."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from majortom_gen.errors import MajorTomGenError
from majortom_gen.modalities import MODALITY_NAMES
from majortom_gen.staging import MARKER, check_output, remove_stale_partials, staged_folder
from majortom_gen.store import LatentStore, load_aligned
from majortom_gen.synth import SynthOptions, write_world
from model.config import CONFIG_DIR, NNET_FIELDS, TrainConfig, load_config
from model.train import TrainingWarning, train
from model.uvit import MultiModalUViT
from pipelines.ingest import IngestOptions, ingest

from conftest import WORLD_CELLS
from test_model import IDENTITY, _pairs, tiny_cfg

runner = CliRunner()
CELLS = ["501U_59R", "501U_60R", "502U_60R"]  # the store section's world
PCA = "patch-pca"  # the fast codec: these mechanics do not depend on the codec
SYNC = IngestOptions(scheduler="synchronous", codec=PCA, cells_per_shard=1)  # one cell per shard


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
    from majortom_gen.staging import _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".other.partial-{_host()}-{dead_pid}-0123abcd"  # another output's, from a killed run
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"0" * 1000)
    keep = [tmp_path / f".busy.partial-{_host()}-{os.getpid()}-fedcba98",  # a run still going
            tmp_path / f".far.partial-otherhost-{dead_pid}-0123abcd",  # a run on another machine (shared disk)
            tmp_path / ".backup.partial-20240101",  # the user's own folders
            tmp_path / ".old.partial-89abcdef"]
    for folder in keep:
        folder.mkdir()
    with staged_folder(tmp_path / "new") as tmp:
        _write(tmp)
    assert not stale.exists() and all(folder.exists() for folder in keep)
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
    # a VAE with the same encoder and another decoder (like sd-vae-ft-ema vs the original kl-f8) is the same codec
    torch.manual_seed(2)
    vae = AutoencoderKL(**config)
    same_encoder = AutoencoderKL(**config)
    same_encoder.load_state_dict({k: (v if k.startswith(("encoder.", "quant_conv.")) else v + 1)
                                  for k, v in vae.state_dict().items()})
    vae.save_pretrained(tmp_path / "a")
    same_encoder.save_pretrained(tmp_path / "b")
    assert load_codec("sd-vae", str(tmp_path / "a")).info()["config_hash"] == \
        load_codec("sd-vae", str(tmp_path / "b")).info()["config_hash"]
    assert load_codec("sd-vae", str(tmp_path / "a")).info()["config_hash"] != alone.info()["config_hash"]
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


# ============================================================================= the store (items 12, 13, 16)
# A store that can be trusted: one writer at a time, no fragment stored twice, a failed
# modality added on the next run, damaged shards named and repaired.


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-world")
    write_world(CELLS, root, SynthOptions(seed=5, products_per_shard=2, workers=1))
    return root


@pytest.fixture(scope="module")
def base_store(world3, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-store") / "store"
    ingest(world3, CELLS, root, SYNC)
    return root


@pytest.fixture
def store_copy(base_store, tmp_path):
    """A private copy of the 3-cell store (one shard per cell) to damage."""
    dst = tmp_path / "store"
    shutil.copytree(base_store, dst)
    return dst


# ----------------------------------------------------------------------------- helpers
def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result, " ".join(result.output.split())


def rows_per_cell(root: Path) -> Counter:
    """Fragments per cell as the store's reader returns them."""
    return Counter(LatentStore.open(root).table(["grid_cell", "fragment_index"]).column("grid_cell").to_pylist())


def stored_copies(root: Path) -> Counter:
    """Latents stored per (cell, modality), counted in the listed shard files themselves."""
    manifest = json.loads((root / "manifest.json").read_text())
    counts: Counter = Counter()
    for entry in manifest["shards"]:
        t = pq.read_table(root / "shards" / entry["file"], columns=["grid_cell"] + list(MODALITY_NAMES))
        cells = np.asarray(t.column("grid_cell").to_pylist())
        for m in MODALITY_NAMES:
            valid = t.column(m).is_valid().to_numpy(zero_copy_only=False)
            counts.update((c, m) for c in cells[valid])
    return counts


def shard_holding(root: Path, cell: str) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = root / "shards" / entry["file"]
        if cell in pq.read_table(path, columns=["grid_cell"]).column("grid_cell").to_pylist():
            return path
    raise AssertionError(f"no shard holds {cell}")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_lock(root: Path, pid: int, host: str) -> None:
    """A lock file as a writer leaves it (data/README.md, store layout)."""
    record = {"pid": pid, "host": host, "purpose": "ingest", "since": "2024-01-01T00:00:00+00:00", "token": "t"}
    (root / "write.lock").write_text(json.dumps(record))


def ingest_args(source: Path, store: Path) -> list[str]:
    return ["ingest", "--source", str(source), "--cells", ",".join(CELLS), "--store", str(store), "--codec", PCA,
            "--scheduler", "synchronous", "--cells-per-shard", "1"]


# ----------------------------------------------------------------------------- 12. one writer, no duplicates
def test_lock__a_second_writer_gets_a_clear_error_naming_the_holder(store_copy, world3):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        host = socket.gethostname()
        write_lock(store_copy, holder.pid, host)
        with pytest.raises(MajorTomGenError, match=rf"locked for writing by pid {holder.pid} on {host}"):
            ingest(world3, CELLS, store_copy, SYNC)
        r, out = invoke(*ingest_args(world3, store_copy))
        assert r.exit_code == 2 and f"pid {holder.pid}" in out and "write.lock" in out, r.output
        # a lock of another host is never taken over, whatever its pid
        write_lock(store_copy, 2**22 + 12345, "elsewhere.example")
        with pytest.raises(MajorTomGenError, match="on elsewhere.example"):
            ingest(world3, CELLS, store_copy, SYNC)
    finally:
        holder.kill()
        holder.wait()
    assert (store_copy / "write.lock").exists(), "a refused writer must leave the holder's lock alone"
    assert set(stored_copies(store_copy).values()) == {16}


def test_lock__a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(store_copy, world3):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(store_copy, dead.pid, socket.gethostname())
    with pytest.warns(UserWarning, match=rf"stale.*pid {dead.pid}"):
        report = ingest(world3, CELLS, store_copy, SYNC)
    assert report.cells_already_stored == 3 and report.cells_written == 0
    assert not (store_copy / "write.lock").exists(), "the lock is released when the run ends"


def test_ingest__two_concurrent_runs_store_each_cell_once(world3, tmp_path):
    """A second ingest of the same cells starting while the first runs (new store: the first is
    setting up the codec and writing shards) is refused, not merged into duplicates."""
    root = tmp_path / "store"
    second: dict = {}

    def progress(done: int, total: int) -> None:
        if not second:
            try:
                second["report"] = ingest(world3, CELLS, root, SYNC)
            except MajorTomGenError as exc:
                second["error"] = str(exc)

    first = ingest(world3, CELLS, root, SYNC, progress=progress)
    assert "locked for writing by" in second.get("error", ""), second
    assert f"pid {os.getpid()}" in second["error"]
    assert first.cells_written == 3
    assert set(rows_per_cell(root).values()) == {16}
    assert set(stored_copies(root).values()) == {16}


def test_store__cells_written_twice_are_stored_once(store_copy):
    """The 'already stored' check of ingest bypassed (two writers racing, or a shard adopted
    after a crash): the store itself refuses to keep a second copy."""
    store = LatentStore.open(store_copy)
    shard = store.shard_paths()[0]
    store.write_shard(pq.read_table(shard))  # the same content written again
    shutil.copy(shard, store_copy / "shards" / "part-00copyofashard.parquet")  # an unlisted copy, adopted on open
    store = LatentStore.open(store_copy)
    assert len(store.manifest["shards"]) == 3
    assert rows_per_cell(store_copy) == {c: 16 for c in CELLS}
    assert set(stored_copies(store_copy).values()) == {16}


def test_store__a_fragment_stored_twice_is_reported_and_repair_keeps_one(store_copy):
    """A store left with duplicate rows by an unlocked writer of an older version."""
    manifest = json.loads((store_copy / "manifest.json").read_text())
    dup = store_copy / "shards" / "part-00duplicate0000.parquet"
    shutil.copy(store_copy / "shards" / manifest["shards"][0]["file"], dup)
    manifest["shards"].append({"file": dup.name, "rows": pq.read_metadata(dup).num_rows})
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MajorTomGenError, match="store check --repair"):
        LatentStore.open(store_copy).table()
    r, out = invoke("store", "check", str(store_copy))
    assert r.exit_code == 3 and "stored twice" in out, r.output
    r, out = invoke("store", "check", "--repair", str(store_copy))
    assert r.exit_code == 0, r.output
    assert rows_per_cell(store_copy) == {c: 16 for c in CELLS}
    assert set(stored_copies(store_copy).values()) == {16}
    assert invoke("store", "check", str(store_copy))[0].exit_code == 0


# ----------------------------------------------------------------------------- 13. a failed modality
def test_ingest__a_modality_that_failed_is_reported_and_added_on_the_next_run(world3, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(world3, world)
    md = world / "Core-S2L2A" / "metadata.parquet"
    good = md.read_bytes()
    md.write_bytes(good[: len(good) // 2])  # a transient fault: truncated metadata
    store = tmp_path / "store"
    r, out = invoke(*ingest_args(world, store))
    assert r.exit_code == 3, r.output
    assert "S2L2A failed" in out and "completed with errors" in out
    info = LatentStore.open(store).info()
    assert info["coverage"]["S2L2A"]["cells"] == 0 and info["coverage"]["DEM"]["cells"] == 3
    errors = [json.loads(line) for line in (store / "ingest-errors.jsonl").read_text().splitlines()]
    assert {"modality": "S2L2A"}.items() <= errors[0].items()

    md.write_bytes(good)  # fixed
    r, out = invoke(*ingest_args(world, store))
    assert r.exit_code == 0, r.output
    info = LatentStore.open(store).info()
    assert info["rows"] == 48 and info["aligned_fragments"] == 48
    assert all(cov == {"fragments": 48, "cells": 3} for cov in info["coverage"].values())
    assert rows_per_cell(store) == {c: 16 for c in CELLS}
    assert set(stored_copies(store).values()) == {16}
    assert len(load_aligned(LatentStore.open(store), list(MODALITY_NAMES))) == 48
    r, out = invoke(*ingest_args(world, store))
    assert r.exit_code == 0 and "3 cells were already stored" in out, r.output


# ----------------------------------------------------------------------------- 16. a damaged store
def test_store__a_truncated_shard_is_named_by_every_read_and_by_check(store_copy, world3):
    shard = shard_holding(store_copy, CELLS[1])
    truncate(shard)
    r, out = invoke("store", "info", str(store_copy))
    assert r.exit_code == 2, r.output
    assert shard.name in out and "store check --repair" in out and "ArrowInvalid" not in out
    with pytest.raises(MajorTomGenError, match=shard.name):
        ingest(world3, CELLS, store_copy, SYNC)
    with pytest.raises(MajorTomGenError, match=shard.name):
        load_aligned(LatentStore.open(store_copy), ["DEM"])
    r, out = invoke("store", "check", str(store_copy))
    assert r.exit_code == 3 and shard.name in out and "unreadable" in out and CELLS[1] in out, r.output


def test_store__check_repair_then_ingest_makes_a_damaged_store_whole(store_copy, world3):
    truncated = shard_holding(store_copy, CELLS[0])
    deleted = shard_holding(store_copy, CELLS[2])
    deleted.unlink()
    with pytest.raises(MajorTomGenError, match=rf"{deleted.name} is missing.*store check --repair"):
        LatentStore.open(store_copy).info()
    assert deleted.name in (store_copy / "manifest.json").read_text(), "a lost shard must not be dropped silently"
    truncate(truncated)
    r, out = invoke("store", "check", str(store_copy))
    assert r.exit_code == 3 and truncated.name in out and deleted.name in out and "missing" in out, r.output

    r, out = invoke("store", "check", "--repair", str(store_copy))
    assert r.exit_code == 0, r.output
    assert CELLS[0] in out and CELLS[2] in out and CELLS[1] not in out
    assert (store_copy / "quarantine" / truncated.name).exists() and not truncated.exists()
    info = LatentStore.open(store_copy).info()
    assert info["cells"] == 1 and info["rows"] == 16

    report = ingest(world3, CELLS, store_copy, SYNC)
    assert report.cells_written == 2 and report.cells_already_stored == 1
    assert rows_per_cell(store_copy) == {c: 16 for c in CELLS}
    assert LatentStore.open(store_copy).info()["aligned_fragments"] == 48
    assert invoke("store", "check", str(store_copy))[0].exit_code == 0


def test_load_aligned__the_training_cache_follows_shard_content(store_copy):
    store = LatentStore.open(store_copy)
    first = np.asarray(load_aligned(store, ["DEM", "S2L2A"], cache=True).moments["S2L2A"]).copy()
    shard = shard_holding(store_copy, CELLS[0])
    original = shard.read_bytes()
    truncate(shard)  # the cache must not hide a damaged shard (same number of shards as when cached)
    with pytest.raises(MajorTomGenError, match=shard.name):
        load_aligned(LatentStore.open(store_copy), ["DEM", "S2L2A"], cache=True)
    shard.write_bytes(original)

    # the shard's content replaced (same shards, same rows), then re-recorded by a repair
    t = pq.read_table(shard)
    col = t.column("S2L2A").combine_chunks()
    negated = pa.FixedSizeListArray.from_arrays(pa.array(-col.flatten().to_numpy(zero_copy_only=False)), col.type.list_size)
    pq.write_table(t.set_column(t.schema.get_field_index("S2L2A"), "S2L2A", negated.cast(col.type)), shard)
    assert invoke("store", "check", "--repair", str(store_copy))[0].exit_code == 0
    store = LatentStore.open(store_copy)
    again = np.asarray(load_aligned(store, ["DEM", "S2L2A"], cache=True).moments["S2L2A"])
    assert not np.array_equal(again, first)
    assert np.array_equal(again, load_aligned(store, ["DEM", "S2L2A"]).moments["S2L2A"])


def test_store__a_store_without_its_manifest_can_be_repaired(store_copy, world3):
    before = LatentStore.open(store_copy).info()
    (store_copy / "manifest.json").unlink()
    with pytest.raises(MajorTomGenError, match="store check --repair"):
        LatentStore.open(store_copy)
    r, out = invoke("store", "check", str(store_copy))
    assert r.exit_code == 3 and "manifest.json" in out, r.output
    r, out = invoke("store", "check", "--repair", str(store_copy))
    assert r.exit_code == 0, r.output
    after = LatentStore.open(store_copy).info()
    for key in ("rows", "cells", "coverage", "aligned_fragments", "codec", "fragment_mode"):
        assert after[key] == before[key], key
    report = ingest(world3, CELLS, store_copy, SYNC)
    assert report.cells_already_stored == 3 and report.cells_written == 0


# ============================================================================= training (items 8, 14, 15, 17)

def _data(n=64):
    ma, mb, _, _ = _pairs(n)
    return {"A": ma, "B": mb}


def _steps(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in sorted((run / "checkpoints").glob("step-*"))]


def _weights(folder: Path) -> list[torch.Tensor]:
    return list(MultiModalUViT.from_pretrained(folder).state_dict().values())


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _config_file(tmp_path: Path, name: str = "cfg.yaml", **train_values) -> Path:
    """configs/tiny.yaml made smaller still (a few seconds a step on the CPU), as a YAML file."""
    raw = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    raw["nnet"].update(embed_dim=32, depth=2, num_heads=4, patch_size=8)
    raw["train"].update({"batch_size": 4, "checkpoint_every": 1, "log_every": 1, **train_values})
    raw["sample"] = {"steps": 2}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------- item 8: checkpoints pruned
def test_keep_checkpoints__only_the_newest_remain_and_resume_still_works(tmp_path):
    cfg = tiny_cfg(checkpoint_every=1, keep_checkpoints=2)
    full = train(cfg, _data(), tmp_path / "full", norms=IDENTITY, max_steps=8)
    assert _steps(tmp_path / "full") == [7, 8]
    train(cfg, _data(), tmp_path / "part", norms=IDENTITY, max_steps=5)
    assert _steps(tmp_path / "part") == [4, 5]
    resumed = train(cfg, _data(), tmp_path / "part", norms=IDENTITY, max_steps=8, resume=True)
    assert _steps(tmp_path / "part") == [7, 8]
    assert resumed.losses == full.losses[5:]
    assert _same(_weights(tmp_path / "part" / "model"), _weights(tmp_path / "full" / "model"))
    assert not [p for p in (tmp_path / "part" / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_checkpoints__zero_or_negative_is_refused(keep):
    with pytest.raises(ValueError, match=r"train.keep_checkpoints must be at least 1.*got " + str(keep)):
        TrainConfig(keep_checkpoints=keep)


def test_keep_checkpoints__the_resumed_checkpoint_stays_until_a_newer_one_exists(tmp_path, monkeypatch):
    import model.train as mt

    cfg = tiny_cfg(checkpoint_every=1, keep_checkpoints=1)
    run = tmp_path / "run"
    train(cfg, _data(), run, norms=IDENTITY, max_steps=3)
    assert _steps(run) == [3]
    seen = []
    train(cfg, _data(), run, norms=IDENTITY, max_steps=5, resume=True,
          on_checkpoint=lambda step, net: seen.append((step, _steps(run))))
    assert seen == [(4, [4]), (5, [5])]  # pruned only once the newer checkpoint was complete

    def broken(out, step, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mt, "_save_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, _data(), run, norms=IDENTITY, max_steps=7, resume=True)
    assert _steps(run) == [5]  # the checkpoint resumed from is still there, complete


def test_final_model__an_interrupted_swap_leaves_the_old_model_complete(tmp_path, monkeypatch):
    import model.train as mt

    run = tmp_path / "run"
    cfg = tiny_cfg()
    train(cfg, _data(), run, norms=IDENTITY, max_steps=2)
    old = _weights(run / "model")
    old_record = (run / "model" / "run_config.json").read_text()
    real_replace, real_save = os.replace, MultiModalUViT.save_pretrained

    def save_fails_midway(self, folder, *args, **kwargs):
        if Path(folder).parent == run:  # the final model (checkpoints are written under checkpoints/)
            Path(folder).mkdir(exist_ok=True)
            (Path(folder) / "config.json").write_text("{")
            raise OSError("disk full")
        return real_save(self, folder, *args, **kwargs)

    monkeypatch.setattr(MultiModalUViT, "save_pretrained", save_fails_midway)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, _data(), run, norms=IDENTITY, max_steps=3, resume=True)
    assert _same(_weights(run / "model"), old) and (run / "model" / "run_config.json").read_text() == old_record
    monkeypatch.setattr(MultiModalUViT, "save_pretrained", real_save)

    failed = []

    def rename_into_place_fails_once(src, dst):
        if Path(dst) == run / "model" and not failed:
            failed.append(src)
            raise OSError("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(mt.os, "replace", rename_into_place_fails_once)
    with pytest.raises(OSError, match="interrupted"):
        train(cfg, _data(), run, norms=IDENTITY, max_steps=4, resume=True)
    assert failed and _same(_weights(run / "model"), old)
    assert (run / "model" / "run_config.json").read_text() == old_record
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no half-written siblings left
    monkeypatch.setattr(mt.os, "replace", real_replace)
    train(cfg, _data(), run, norms=IDENTITY, max_steps=4, resume=True)
    assert not _same(_weights(run / "model"), old) and (run / "model" / "run_config.json").exists()


def test_cli_keep_checkpoints(store, tmp_path):
    cfg = _config_file(tmp_path)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--config", str(cfg), "--max-steps", "3",
                            "--keep-checkpoints", "2"])
    assert r.exit_code == 0, r.output
    assert _steps(run) == [2, 3]
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(tmp_path / "zero"), "--config", str(cfg),
                            "--keep-checkpoints", "0"])
    assert r.exit_code == 2 and "--keep-checkpoints" in r.output, r.output
    assert not (tmp_path / "zero").exists()


# ----------------------------------------------------------------------------- item 14: step counts
@pytest.mark.parametrize("steps", [0, -1])
def test_max_steps_below_one_is_refused_before_any_work(tmp_path, steps):
    with pytest.raises(ValueError, match=f"max_steps must be at least 1, got {steps}"):
        train(tiny_cfg(), _data(), tmp_path / "run", norms=IDENTITY, max_steps=steps)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="train.max_steps must be at least 1"):
        tiny_cfg(max_steps=steps)


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_cli_max_steps_below_one_is_refused_before_any_work(store, tmp_path, steps):
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--max-steps", steps])
    assert r.exit_code == 2 and "--max-steps" in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not run.exists()


# ----------------------------------------------------------------------------- item 15: resume on other data
def test_resume_refuses_a_store_of_another_codec(store, tmp_path):
    cfg = _config_file(tmp_path)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--config", str(cfg), "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    before = (run / "model" / "training_data.json").read_text()
    other = tmp_path / "other-store"
    shutil.copytree(store, other, ignore=shutil.ignore_patterns("cache", "codec"))  # as a store made with sd-vae:
    manifest = json.loads((other / "manifest.json").read_text())  # no codec kept with it, another name and hash
    old_hash = manifest["codec"]["config_hash"]
    manifest["codec"].update(name="sd-vae", config_hash="f" * 64)
    (other / "manifest.json").write_text(json.dumps(manifest))
    r = runner.invoke(app, ["train", "--store", str(other), "--out", str(run), "--config", str(cfg), "--max-steps", "2",
                            "--resume"])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert f"patch-pca ({old_hash[:12]})" in text and f"sd-vae ({'f' * 12})" in text, text
    assert _steps(run) == [1] and (run / "model" / "training_data.json").read_text() == before


def test_resume_with_a_changed_batch_size_warns_and_records_it(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(batch_size=64), _data(), run, norms=IDENTITY, max_steps=3)
    with pytest.warns(TrainingWarning, match=r"train.batch_size 64 -> 32"):
        res = train(tiny_cfg(batch_size=32), _data(), run, norms=IDENTITY, max_steps=5, resume=True)
    assert res.resumed_from == 3
    assert res.config_changes == [{"step": 3, "changes": {"train.batch_size": [64, 32]}}]
    state = json.loads((run / "checkpoints" / "step-000005" / "state.json").read_text())
    assert state["config_changes"] == res.config_changes  # carried on to later resumes


def test_resume_refuses_a_changed_network(tmp_path):
    from dataclasses import replace

    run = tmp_path / "run"
    cfg = tiny_cfg()
    train(cfg, _data(), run, norms=IDENTITY, max_steps=2)
    wider = replace(cfg, nnet={**cfg.nnet, "embed_dim": 32})
    with pytest.raises(ValueError, match=r"network config changed.*nnet.embed_dim 64 -> 32"):
        train(wider, _data(), run, norms=IDENTITY, max_steps=3, resume=True)
    spelled_out = replace(cfg, nnet={**cfg.nnet, "prediction": "epsilon"})  # the default, written out: no change
    assert train(spelled_out, _data(), run, norms=IDENTITY, max_steps=3, resume=True).config_changes == []


def test_cli_resume_with_a_changed_batch_size_says_so(store, tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--config",
                            str(_config_file(tmp_path, "a.yaml")), "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(run), "--config",
                            str(_config_file(tmp_path, "b.yaml", batch_size=2)), "--max-steps", "2", "--resume"])
    assert r.exit_code == 0, r.output
    assert "train.batch_size 4 -> 2" in " ".join(r.output.split())
    record = json.loads((run / "model" / "training_data.json").read_text())
    assert record["config_changes"] == [{"step": 1, "changes": {"train.batch_size": [4, 2]}}]
    assert record["resumed_from"] == 1


# ----------------------------------------------------------------------------- item 17: clear messages
def test_truncated_optimizer_falls_back_to_the_previous_checkpoint(tmp_path):
    cfg = tiny_cfg(checkpoint_every=2)
    full = train(cfg, _data(), tmp_path / "full", norms=IDENTITY, max_steps=6)
    run = tmp_path / "run"
    train(cfg, _data(), run, norms=IDENTITY, max_steps=4)
    opt = run / "checkpoints" / "step-000004" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    with pytest.warns(TrainingWarning, match=r"step-000004.optimizer\.pt"):
        resumed = train(cfg, _data(), run, norms=IDENTITY, max_steps=6, resume=True)
    assert resumed.resumed_from == 2 and resumed.losses == full.losses[2:]
    assert _same(_weights(run / "model"), _weights(tmp_path / "full" / "model"))


def test_no_complete_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(checkpoint_every=2)
    run = tmp_path / "run"
    train(cfg, _data(), run, norms=IDENTITY, max_steps=2)
    opt = run / "checkpoints" / "step-000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.warns(TrainingWarning), pytest.raises(ValueError, match=r"no complete checkpoint.*optimizer\.pt"):
        train(cfg, _data(), run, norms=IDENTITY, max_steps=4, resume=True)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIG_DIR / "tiny.yaml").read_text().replace("train: {batch_size: 32,", "train: {batch_size: 32"))
    with pytest.raises(ValueError, match=rf"{bad}: not valid YAML.*line \d+"):
        load_config(bad)
    bad.write_text("- nnet\n- train\n")
    with pytest.raises(ValueError, match=rf"{bad}: .*mapping"):
        load_config(bad)


@pytest.mark.parametrize("old, new, key", [
    ("depth: 4", "depth: four", "nnet.depth"),
    ("batch_size: 32", "batch_size: [32]", "train.batch_size"),
    ("lr: 4.0e-3", "lr: 4e-3", "optimizer.lr"),  # YAML 1.1 reads 4e-3 as text
    ("hflip: true", "hflip: 1", "train.hflip"),
    ("qkv_bias: false", "qkv_bias: false\n  qkv_bais: true", "nnet"),
])
def test_wrong_type_in_a_config_names_the_file_and_key(tmp_path, old, new, key):
    text = (CONFIG_DIR / "tiny.yaml").read_text().replace("seed: 0}", "seed: 0, hflip: true}")
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(ValueError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and key in str(err.value), err.value


def test_config_nnet_fields_match_the_network():
    params = inspect.signature(MultiModalUViT.__init__).parameters
    assert set(NNET_FIELDS) == set(params) - {"self"}


def test_cli_malformed_config_is_one_line(store, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIG_DIR / "tiny.yaml").read_text().replace("depth: 4", "depth: four"))
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(tmp_path / "run"), "--config", str(bad)])
    assert r.exit_code == 2 and "nnet.depth" in r.output and "bad.yaml" in r.output, r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(store, tmp_path):
    with pytest.raises(ValueError, match="no CUDA device"):
        train(tiny_cfg(), _data(), tmp_path / "run", norms=IDENTITY, max_steps=1, device="cuda")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="device must be"):
        train(tiny_cfg(), _data(), tmp_path / "run", norms=IDENTITY, max_steps=1, device="tpu")
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(tmp_path / "run"), "--config",
                            str(_config_file(tmp_path)), "--max-steps", "1", "--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA device" in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_train_out_that_is_not_a_run_is_refused(store, tmp_path):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "my-notes.txt").write_text("mine")
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(mine), "--max-steps", "1"])
    assert r.exit_code == 2 and "not a majortom-gen training run" in r.output, r.output
    assert (mine / "model" / "my-notes.txt").read_text() == "mine"
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(store / "run"), "--max-steps", "1"])
    assert r.exit_code == 2 and "input" in r.output, r.output
