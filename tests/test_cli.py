"""The CLI: one clear line and exit code 2 for user mistakes, no traceback."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from majortom_gen.cli import app

runner = CliRunner()


def test_grid_locate():
    r = runner.invoke(app, ["grid", "locate", "--lat", "45.07", "--lon", "7.69"])
    assert r.exit_code == 0, r.output
    assert "501U_60R" in r.output and "EPSG:32632" in r.output


def test_grid_cells__bbox_and_file_output(tmp_path):
    r = runner.invoke(app, ["grid", "cells", "--region", "7.6,45.0,7.8,45.1", "--out", str(tmp_path / "ids.txt")])
    assert r.exit_code == 0, r.output
    ids = (tmp_path / "ids.txt").read_text().split()
    assert "501U_60R" in ids and len(ids) == len(set(ids))


def test_user_errors_are_one_line(tmp_path):
    for args, msg in [
        (["grid", "locate", "--lat", "95", "--lon", "7"], "outside the grid"),
        (["grid", "cells", "--region", "POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))"], "invalid geometry"),
        (["synth", "--cells", "12X_3R", "--out", str(tmp_path)], "malformed grid cell id '12X_3R'"),
        (["synth", "--out", str(tmp_path)], "no grid cells selected"),
        (["inspect", str(tmp_path / "nothing")], "no such file"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output


def test_synth_and_inspect(tmp_path):
    ids = tmp_path / "cells.csv"
    ids.write_text("grid_cell\n501U_60R\n")
    r = runner.invoke(app, ["synth", "--cells", str(ids), "--out", str(tmp_path / "w"), "--seed", "2",
                            "--workers", "1", "--modalities", "DEM,s1_rtc"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "w/Core-DEM/metadata.parquet").exists() and (tmp_path / "w/Core-S1RTC/images/part_00001.parquet").exists()
    assert not (tmp_path / "w/Core-S2L2A").exists()
    r = runner.invoke(app, ["inspect", str(tmp_path / "w"), "--preview", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert "all of them" in r.output and (tmp_path / "p.png").stat().st_size > 1000
    r = runner.invoke(app, ["inspect", str(tmp_path / "w/Core-S1RTC/images/part_00001.parquet"), "--no-preview"])
    assert r.exit_code == 0 and "S1RTC image shard, 1 products" in r.output and "preview" not in r.output
    (tmp_path / "junk.parquet").write_text("junk")
    r = runner.invoke(app, ["inspect", str(tmp_path / "junk.parquet"), "--no-preview"])
    assert r.exit_code == 2 and "not a readable parquet" in r.output


def test_synth__space_separated_cells_and_unwritable_out(tmp_path):
    r = runner.invoke(app, ["synth", "--cells", "501U_60R", "bogus", "--out", str(tmp_path / "w")])
    assert r.exit_code == 2 and "malformed grid cell id 'bogus'" in r.output
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["synth", "--cells", "501U_60R", "--out", str(tmp_path / "file" / "w"), "--modalities", "DEM"])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_demo_small(tmp_path):
    """A reduced demo (4 cells, 3 steps): every stage's outputs exist, the GeoTIFFs sit on their
    fragments' grid, the evaluation table is written, nothing is left half-written."""
    import csv

    import rasterio
    from affine import Affine

    from majortom_gen.staging import is_temporary
    from majortom_gen.store import LatentStore

    r = runner.invoke(app, ["demo", "--out", str(tmp_path), "--cells", "4", "--steps", "3", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "world-preview.png").exists()
    assert sorted(p.name for p in (tmp_path / "world").iterdir()) == ["Core-DEM", "Core-S1RTC", "Core-S2L1C", "Core-S2L2A"]
    store = LatentStore.open(tmp_path / "store")
    info = store.info()
    assert info["cells"] == 4 and info["aligned_fragments"] == 64
    assert (tmp_path / "train" / "loss.png").exists() and (tmp_path / "train" / "model" / "config.json").exists()
    region = tmp_path / "region"
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
    rows = list(csv.DictReader(open(tmp_path / "evaluation" / "metrics.csv")))
    assert {row["condition"] for row in rows} == {"none", "S2L2A", "S2L1C+S2L2A"} and len(rows) == 6
    assert {row["modality"] for row in rows} == {"DEM", "S1RTC"}
    assert all(row["mae_change"] != "" for row in rows if row["condition"] != "none")
    assert "| S2L1C+S2L2A |" in (tmp_path / "evaluation" / "table1.md").read_text()
    listed = (tmp_path / "FILES.md").read_text()
    assert "evaluation/table1.md" in listed and "region/geotiff/index.md" in listed
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name or is_temporary(p.name)]
    assert "QGIS" in r.output and "randomly initialised" in r.output and "shipped" in r.output
