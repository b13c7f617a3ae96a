"""A store that can be trusted: one writer at a time, no fragment stored twice, a failed
modality added on the next run, damaged shards named and repaired (issue #12, items 12, 13, 16)."""

from __future__ import annotations

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
from typer.testing import CliRunner

from majortom_gen.cli import app
from majortom_gen.errors import MajorTomGenError
from majortom_gen.modalities import MODALITY_NAMES
from majortom_gen.store import LatentStore, load_aligned
from majortom_gen.synth import SynthOptions, write_world
from pipelines.ingest import IngestOptions, ingest

CELLS = ["501U_59R", "501U_60R", "502U_60R"]
PCA = "patch-pca"  # the fast codec: these mechanics do not depend on the codec
SYNC = IngestOptions(scheduler="synchronous", codec=PCA, cells_per_shard=1)  # one cell per shard


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
