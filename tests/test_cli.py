"""The CLI: one clear line and exit code 2 for user mistakes, no traceback."""

from __future__ import annotations


from typer.testing import CliRunner

from pipelines.cli import app

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
