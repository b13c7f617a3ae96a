"""`majortom-gen dataset build`: split subsets of a store by grid id, and the datasets export."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from majortom_gen.errors import MajorTomGenError
from majortom_gen.splits import split_cells
from majortom_gen.grid import parse_cell_id
from majortom_gen.store import LatentStore, load_aligned, moment_array


runner = CliRunner()


def test_split_cells_in_blocks_is_blocked_reproducible_and_disjoint():
    cells = [f"{r}U_{c}R" for r in range(100, 120) for c in range(200, 220)]  # 400 cells
    train, test = split_cells(cells, 0.1, seed=3, block=4)
    assert sorted(train + test) == sorted(cells) and not set(train) & set(test)
    assert 40 <= len(test) <= 40 + 16  # whole 4x4 blocks until the fraction is reached
    side = {**{c: "train" for c in train}, **{c: "test" for c in test}}
    blocks = {}
    for c in cells:  # every block is entirely on one side
        row, col = parse_cell_id(c)
        blocks.setdefault((row // 4, col // 4), set()).add(side[c])
    assert all(len(s) == 1 for s in blocks.values())
    assert split_cells(list(reversed(cells)), 0.1, seed=3, block=4) == (train, test)  # order does not matter
    assert split_cells(cells, 0.1, seed=4, block=4) != (train, test)
    assert len(split_cells(cells, 0.1, seed=3, block=1)[1]) == 40
    with pytest.raises(MajorTomGenError, match="test-fraction"):
        split_cells(cells, 1.5)
    with pytest.raises(MajorTomGenError, match="cannot be split"):
        split_cells(cells[:3], 0.5, block=50)  # one block: it would all be test


def test_split_cells_per_cell_is_the_rule_trained_models_recorded():
    """block=1 keeps the per-cell rule models were trained with (they record test_fraction and
    split_seed, and evaluation recomputes their held-out cells): expected lists computed with
    the rule as it was before splits had one home."""
    cells = [f"{r}U_{c}R" for r in range(500, 504) for c in range(60, 63)]
    assert split_cells(cells, 0.25, 3) == (
        ["500U_60R", "500U_61R", "501U_60R", "501U_61R", "501U_62R", "502U_60R", "502U_62R", "503U_60R", "503U_61R"],
        ["500U_62R", "502U_61R", "503U_62R"])
    assert split_cells(cells, 0.05, 0)[1] == ["503U_60R"]


def test_dataset_build_writes_a_split_store_and_a_datasets_export(store, tmp_path):
    import datasets

    out = tmp_path / "ds"
    r = runner.invoke(app, ["dataset", "build", "--store", str(store), "--out", str(out), "--modalities", "S1RTC,S2L2A",
                            "--test-fraction", "0.34", "--block-size", "1", "--seed", "1"])
    assert r.exit_code == 0, r.output
    subset = LatentStore.open(out)
    assert subset.modalities == ["S1RTC", "S2L2A"] and (out / "codec" / "config.json").exists()
    t = subset.table()
    assert "split" in t.column_names and "DEM" not in t.column_names and t.num_rows == 48
    split = dict(zip(t.column("grid_cell").to_pylist(), t.column("split").to_pylist()))
    rows_per = {c: t.column("grid_cell").to_pylist().count(c) for c in split}
    assert sorted(split.values()).count("test") == 1 and all(n == 16 for n in rows_per.values())
    assert all(len({s for c2, s in zip(t.column("grid_cell").to_pylist(), t.column("split").to_pylist()) if c2 == c}) == 1
               for c in split)
    # the subset is a store: its recorded split drives the training/test loaders
    test = load_aligned(subset, ["S1RTC", "S2L2A"], split="test")
    assert set(test.grid_cell.tolist()) == {c for c, s in split.items() if s == "test"} and len(test) == 16
    # the datasets export holds the same latents
    dd = datasets.load_from_disk(str(out / "hf"))
    assert set(dd) == {"train", "test"} and dd["train"].num_rows == 32 and dd["test"].num_rows == 16
    assert set(dd["train"]["grid_cell"]).isdisjoint(dd["test"]["grid_cell"])
    row = dd["test"].with_format("numpy")[0]
    assert row["S2L2A"].shape == (8, 32, 32) and dd["test"].features["S2L2A"].dtype == "float16"
    src = store_row(store, row["grid_cell"], int(row["fragment_index"]), "S2L2A")
    assert np.array_equal(row["S2L2A"].astype(np.float16), src)
    assert "Test cells" in (out / "README.md").read_text()
    # reproducible by seed
    again = tmp_path / "again"
    r = runner.invoke(app, ["dataset", "build", "--store", str(store), "--out", str(again), "--modalities", "S1RTC,S2L2A",
                            "--test-fraction", "0.34", "--block-size", "1", "--seed", "1", "--no-hf"])
    assert r.exit_code == 0, r.output
    assert LatentStore.open(again).manifest["dataset"]["cells"] == subset.manifest["dataset"]["cells"]
    assert not (again / "hf").exists()


def store_row(store_dir, cell, fragment, modality):
    t = LatentStore.open(store_dir).table(["grid_cell", "fragment_index", modality], cells=[cell])
    i = t.column("fragment_index").to_pylist().index(fragment)
    return moment_array(t.slice(i, 1), modality)[0]


@pytest.mark.parametrize("args, message", [
    (["--modalities", "LANDSAT"], "unknown modality"),
    (["--cells", "1U_1R"], "none of the 1 selected cells is in the store"),
    (["--split", "temporal"], "--split must be spatial or random"),
    (["--test-fraction", "1.2"], "--test-fraction must be in [0, 1)"),
])
def test_dataset_build_bad_input(store, tmp_path, args, message):
    r = runner.invoke(app, ["dataset", "build", "--store", str(store), "--out", str(tmp_path / "ds"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and not (tmp_path / "ds").exists()
