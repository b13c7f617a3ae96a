"""`majortom-gen evaluate` end to end on a synthetic store, a tiny model and locally saved
random extractors: the Table-1 outputs, caching, determinism and bad input."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from majortom_gen.splits import split_cells
from model.features import save_random_extractors

from conftest import WORLD_CELLS

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    r = runner.invoke(app, ["train", "--store", str(store), "--out", str(root / "run"), "--max-steps", "3"])
    assert r.exit_code == 0, r.output
    return root, store, save_random_extractors(root / "extractors")


def _args(root, store, ext, out, *extra):
    return ["evaluate", "--model", str(root / "run" / "model"), "--store", str(store), "--out", str(out),
            "--fid-extractor", str(ext["inception"]), "--pr-extractor", str(ext["dinov2"]), "--steps", "2",
            "--max-fragments", "8", *extra]


def test_evaluate_writes_the_table1_outputs(setup, tmp_path):
    root, store, ext = setup
    out = tmp_path / "eval"
    r = runner.invoke(app, _args(root, store, ext, out, "--conditions", "none,S1RTC,S2L1C+S2L2A", "--n-samples", "2"))
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    pairs = [(row["condition"], row["modality"]) for row in rows]
    assert pairs == [("none", m) for m in ("DEM", "S1RTC", "S2L1C", "S2L2A")] + \
        [("S1RTC", m) for m in ("DEM", "S2L1C", "S2L2A")] + [("S2L1C+S2L2A", m) for m in ("DEM", "S1RTC")]
    by = {(row["condition"], row["modality"]): row for row in rows}
    for row in rows:
        assert row["n"] == "8" and float(row["fid"]) >= 0
        assert 0 <= float(row["precision"]) <= 1 and 0 <= float(row["recall"]) <= 1
        # paired metrics on every row: unconditional samples are compared with the same places too
        assert 0 < float(row["psnr"]) < 100 and -1 <= float(row["ssim"]) <= 1
        assert float(row["psnr_best"]) >= float(row["psnr"]) and float(row["spread"]) > 0
        assert 0 < float(row["gradient_ratio"]) < 100  # roughness of the samples over the real images'
        none = by[("none", row["modality"])]
        assert float(row["mae_change"]) == pytest.approx((float(row["mae"]) - float(none["mae"])) / float(none["mae"]))
        assert float(row["psnr_gain"]) == pytest.approx(float(row["psnr"]) - float(none["psnr"]))
    table = (out / "table1.md").read_text()
    assert "| S1RTC | " in table and "DEM FID↓" in table and "S2L2A f_score↑" in table
    assert "What conditioning buys" in table and "DEM mae_change↓" in table and "%" in table
    assert "DEM gradient_ratio≈1" in table
    s1_row = next(line for line in table.splitlines() if line.startswith("| S1RTC |"))
    assert s1_row.count("—") == 4  # S1RTC is the condition: its 4 columns are empty
    meta = json.loads((out / "metrics.json").read_text())
    _, test_cells = split_cells(WORLD_CELLS, 0.05, 0)
    assert meta["settings"]["cells"] == test_cells and len(meta["rows"]) == 9
    assert meta["settings"]["extractors"]["fid"]["kind"] == "inception"
    assert (out / "plots" / "fid.png").stat().st_size > 1000 and (out / "plots" / "ssim.png").exists()
    assert not list(tmp_path.glob(".eval.partial-*"))

    # a second run reads the cached features; a fresh cache recomputes the same numbers
    again = tmp_path / "again"
    r = runner.invoke(app, _args(root, store, ext, again, "--conditions", "none,S1RTC,S2L1C+S2L2A", "--n-samples", "2",
                                 "--cache-dir", str(tmp_path / "fresh-cache")))
    assert r.exit_code == 0, r.output
    assert (again / "metrics.csv").read_text() == (out / "metrics.csv").read_text()


def test_evaluate_reports_seams_of_whole_cells(setup, tmp_path):
    """With a whole test cell evaluated, every row has the pixel and tone seam ratios of the
    generated and the real mosaics."""
    root, store, ext = setup
    out = tmp_path / "eval"
    r = runner.invoke(app, _args(root, store, ext, out, "--conditions", "S2L1C+S2L2A", "--generate", "DEM",
                                 "--max-fragments", "16"))
    assert r.exit_code == 0, r.output
    (row,) = list(csv.DictReader(open(out / "metrics.csv")))
    for name in ("seam_ratio", "seam_ratio_real", "tone_seam_ratio", "tone_seam_ratio_real"):
        assert 0 < float(row[name]) < 1000, name
    assert "## Seams" in (out / "table1.md").read_text()


def test_cell_seams__whole_cells_only():
    import numpy as np

    from pipelines.evaluate import cell_seams

    rng = np.random.default_rng(0)
    tiles = np.repeat(rng.integers(0, 255, (16, 1, 1, 1)), 256, axis=1).repeat(256, axis=2).repeat(3, axis=3)
    tiles = (tiles + rng.integers(0, 3, tiles.shape)).astype(np.uint8)  # flat tiles of different tones
    px, tone = cell_seams(tiles, ["a"] * 16, list(range(16)))
    assert px > 10 and tone > 10  # every border is a step
    assert np.isnan(cell_seams(tiles[:8], ["a"] * 8, list(range(8)))).all()  # half a cell: no mosaic to score


@pytest.mark.parametrize("extra, message", [
    (["--conditions", "LANDSAT"], "unknown modality"),
    (["--conditions", "DEM+S1RTC+S2L1C+S2L2A"], "leaves nothing to generate"),
    (["--conditions", "S1RTC", "--k", "8"], "needs more than 8"),
    (["--conditions", "S1RTC", "--split", "validation"], "split must be"),
])
def test_evaluate_bad_input(setup, tmp_path, extra, message):
    root, store, ext = setup
    r = runner.invoke(app, _args(root, store, ext, tmp_path / "bad", *extra))
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "bad").exists()
