"""A non-editable install works: the wheel carries the configs and the shipped weights, and
``load_config("tiny")`` and the shipped codec load from the installed copy, not the source tree."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_install_finds_configs_and_shipped_weights(tmp_path):
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]  # offline when we can
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("majortom_gen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"configs/tiny.yaml", "configs/small.yaml", "configs/release.yaml"} <= names
    assert "model/weights/small-vae/codec.json" in names and "model/weights/demo-model/config.json" in names
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    probe = ("import model.config as c, model.codecs as k; "
             "assert str(c.CONFIG_DIR).startswith(%r), c.CONFIG_DIR; "
             "print(c.load_config('tiny').nnet['embed_dim'], k.load_codec('small-vae').name)") % str(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["128", "small-vae"]
