"""Training faults (issue #12, items 8, 14, 15, 17): what a careful user tries to break in
`train`. Each test failed before its fix: checkpoints are pruned and the final model is
swapped in whole; bad step counts, configs and devices are refused before any work with a
message naming the item; a resume refuses another codec, says what changed, and survives a
truncated checkpoint."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from majortom_gen.cli import app
from model.config import CONFIG_DIR, NNET_FIELDS, TrainConfig, load_config
from model.train import TrainingWarning, train
from model.uvit import MultiModalUViT

from test_model import IDENTITY, _pairs, tiny_cfg

runner = CliRunner()


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
