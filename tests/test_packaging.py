"""A non-editable install works: the wheel carries the configs and the shipped weights, they
load from the installed copy (not the source tree), and the reduced demo runs from it."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project's wheel, built from this checkout and unpacked into a fresh site folder
    (its dependencies are those of the running environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]  # offline when we can
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                            "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp / "dist").glob("majortom_gen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"configs/tiny.yaml", "configs/small.yaml", "configs/release.yaml"} <= names
    assert "model/weights/small-vae/codec.json" in names and "model/weights/demo-model/config.json" in names
    assert "pipelines/cli/__main__.py" in names
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp / "site")
    return tmp / "site"


def _run(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Python with only the installed copy importable (run outside the source tree)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_wheel_install_finds_configs_and_shipped_weights(installed, tmp_path):
    probe = ("import model.config as c, model.codecs as k, pipelines.cli as cli, majortom_gen as g; "
             "assert all(str(p).startswith(%r) for p in (c.CONFIG_DIR, cli.__file__, g.__file__)), c.CONFIG_DIR; "
             "print(c.load_config('tiny').nnet['embed_dim'], k.load_codec('small-vae').name)") % str(installed)
    ran = _run(installed, ["-c", probe], tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == ["128", "small-vae"]


def test_demo_runs_from_the_wheel_install(installed, tmp_path):
    """The README's main job, reduced (4 cells, 3 fine-tuning and 6 sampling steps), from the
    installed copy: every stage's outputs exist, the GeoTIFFs sit on their fragments' grid,
    the evaluation table is written, nothing is left half-written."""
    import rasterio
    from affine import Affine

    from majortom_gen.store import LatentStore

    out = tmp_path / "demo"
    r = _run(installed, ["-m", "pipelines.cli", "demo", "--out", str(out), "--cells", "4", "--steps", "3",
                         "--sample-steps", "6", "--workers", "1"], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (out / "world-preview.png").exists()
    assert sorted(p.name for p in (out / "world").iterdir()) == ["Core-DEM", "Core-S1RTC", "Core-S2L1C", "Core-S2L2A"]
    store = LatentStore.open(out / "store")
    info = store.info()
    assert info["cells"] == 4 and info["aligned_fragments"] == 64
    assert (out / "train" / "loss.png").exists() and (out / "train" / "model" / "config.json").exists()
    region = out / "region"
    held_out = json.loads((region / "region.json").read_text())["cells"]
    assert len(held_out) == 1
    assert [p.name for p in (region / "samples" / "all").glob("*.png")] == [f"{held_out[0]}.png"]
    tifs = [p for p in (region / "geotiff").rglob("*.tif") if p.parent.name != "mosaic"]
    assert len(tifs) == 16 * 2 * 2  # fragments x samples x (DEM, S1RTC)
    geo = store.lookup(cells=held_out).set_index("fragment_index")
    for tif in tifs[:8]:
        with rasterio.open(tif) as ds:
            row = geo.loc[int(tif.stem[1:3])]
            assert ds.crs.to_epsg() == 32632 and ds.crs == rasterio.crs.CRS.from_user_input(row["utm_crs"])
            assert ds.transform.almost_equals(Affine(*row["utm_transform"]), precision=1.0)
    mosaic = region / "geotiff" / "mosaic"
    assert (mosaic / "DEM_mean_EPSG4326.tif").exists() and (mosaic / "S1RTC_std_EPSG4326.tif").exists()
    with rasterio.open(next(mosaic.glob("DEM_s0_*.vrt"))) as ds:  # relative paths resolve
        assert ds.read(1).max() > 0
    rows = list(csv.DictReader(open(out / "evaluation" / "metrics.csv")))
    assert {row["condition"] for row in rows} == {"none", "S2L2A", "S2L1C+S2L2A"} and len(rows) == 6
    assert {row["modality"] for row in rows} == {"DEM", "S1RTC"}
    assert all(row["mae_change"] != "" for row in rows if row["condition"] != "none")
    assert "| S2L1C+S2L2A |" in (out / "evaluation" / "table1.md").read_text()
    listed = (out / "FILES.md").read_text()
    assert "evaluation/table1.md" in listed and "region/geotiff/index.md" in listed
    assert not [p for p in out.rglob("*") if ".partial-" in p.name or ".tmp" in p.name]
    assert "QGIS" in r.stdout and "randomly initialised" in r.stdout and "shipped" in r.stdout
    assert "--n-samples 2 --steps 6" in r.stdout  # the repeat-by-hand commands use the steps it ran with
