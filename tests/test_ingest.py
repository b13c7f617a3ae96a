"""Ingestion end to end on synthetic worlds: alignment, GeoParquet, bad input, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from majortom_gen.formats import encode_png
from majortom_gen.georef import product_box
from majortom_gen.splits import split_cells
from majortom_gen.store import LatentStore, load_aligned
from majortom_gen.synth import SynthOptions, write_world
from pipelines.ingest import IngestOptions, ingest

# The ingest mechanics (alignment, bad input, resume) are codec-independent: these tests use the
# fast, fitted patch-pca codec (the hardest case for resume: it is fitted on the first cells);
# the default small-vae codec is covered by the shared store (conftest) and test_codecs.
PCA = "patch-pca"
CELLS8 = ["501U_59R", "501U_60R", "501U_61R", "502U_59R", "502U_60R", "502U_61R", "503U_59R", "503U_60R"]


@pytest.fixture(scope="module")
def world8(tmp_path_factory):
    root = tmp_path_factory.mktemp("world8")
    write_world(CELLS8, root, SynthOptions(seed=11, products_per_shard=3, workers=2))
    return root


@pytest.fixture(scope="module")
def store8(world8, tmp_path_factory):
    root = tmp_path_factory.mktemp("store8") / "store"
    report = ingest(world8, CELLS8, root, IngestOptions(cells_per_shard=3, workers=2, codec=PCA))
    return root, report


def test_ingest__16_aligned_fragments_per_cell(store8):
    root, report = store8
    assert report.cells_written == 8 and report.fragments_written == 128 and not report.quarantined
    assert report.codec["name"] == "patch-pca" and report.codec_psnr_db > 20
    store = LatentStore.open(root)
    info = store.info()
    assert info["rows"] == 128 and info["cells"] == 8 and info["aligned_fragments"] == 128
    assert all(v == {"fragments": 128, "cells": 8} for v in info["coverage"].values())
    t = store.table(["grid_cell", "fragment_index"])
    counts = pd_counts(t)
    assert set(counts.values()) == {16} and len(counts) == 8
    assert json.loads((root / "manifest.json").read_text())["shards"][0]["rows"] > 0


def pd_counts(t):
    cells = t.column("grid_cell").to_pylist()
    return {c: cells.count(c) for c in set(cells)}


def test_store__is_geoparquet_with_exact_georeferencing(store8):
    root, _ = store8
    gdf = gpd.read_parquet(next((root / "shards").glob("part-*.parquet")))
    assert gdf.crs.to_string() in ("OGC:CRS84", "EPSG:4326")
    row = gdf.iloc[5]
    box = product_box(row["grid_cell"])
    a, b, c, d, e, f = row["utm_transform"]
    assert (a, e) == (10.0, -10.0)
    assert c == pytest.approx(box.west + 10 * row["col_off"]) and f == pytest.approx(box.north - 10 * row["row_off"])
    assert row["utm_crs"] == box.crs
    assert gdf.geometry.iloc[5].contains(gpd.points_from_xy([row["centre_lon"]], [row["centre_lat"]])[0])
    duckdb = pytest.importorskip("duckdb")
    n = duckdb.sql(f"select count(*) from '{root}/shards/*.parquet' where S1RTC is not null").fetchall()[0][0]
    assert n == 128


def test_store__aligned_reader_split_and_cache(store8):
    root, _ = store8
    store = LatentStore.open(root)
    full = load_aligned(store, ["DEM", "S2L2A"])
    assert full.moments["DEM"].shape == (128, 8, 32, 32) and full.moments["DEM"].dtype == np.float16
    train = load_aligned(store, ["DEM", "S2L2A"], split="train", test_fraction=0.25, seed=1)
    test = load_aligned(store, ["DEM", "S2L2A"], split="test", test_fraction=0.25, seed=1)
    assert len(train) + len(test) == 128 and not set(train.grid_cell) & set(test.grid_cell)
    assert split_cells(CELLS8, 0.25, 1) == split_cells(list(reversed(CELLS8)), 0.25, 1)
    cached = load_aligned(store, ["DEM", "S2L2A"], cache=True)
    assert isinstance(cached.moments["DEM"], np.memmap)
    assert np.array_equal(np.asarray(cached.moments["S2L2A"]), full.moments["S2L2A"])
    batch = cached.get(np.array([3, 77, 5]))
    assert batch["DEM"].shape == (3, 8, 32, 32)


def test_store__lookup_by_cells_and_region(store8):
    root, _ = store8
    store = LatentStore.open(root)
    df = store.lookup(cells=["501U_60R"])
    assert len(df) == 16 and df[[f"has_{m}" for m in store.modalities]].all().all()
    from shapely.geometry import Point

    c = df.iloc[0]
    hit = store.lookup(region=Point(c["centre_lon"], c["centre_lat"]).buffer(0.001))
    assert len(hit) >= 1 and c["grid_cell"] in set(hit["grid_cell"])


def test_ingest__rerun_skips_and_refuses_other_codec(store8, world8):
    root, _ = store8
    before = LatentStore.open(root).info()["rows"]
    again = ingest(world8, CELLS8, root, IngestOptions(scheduler="synchronous", codec=PCA))
    assert again.cells_written == 0 and again.cells_already_stored == 8
    assert LatentStore.open(root).info()["rows"] == before
    from majortom_gen.store import StoreError

    with pytest.raises(StoreError, match="refusing to add latents"):
        LatentStore.create(root, type("C", (), {"name": "sd-vae", "config_hash": "abc", "config": {}})())


# ----------------------------------------------------------------------------- bad input
def _rewrite_shard(path: Path, change) -> None:
    pf = pq.ParquetFile(path)
    tables = [change(i, pf.read_row_group(i)) for i in range(pf.metadata.num_row_groups)]
    with pq.ParquetWriter(path.with_suffix(".new"), tables[0].schema) as w:
        for t in tables:
            w.write_table(t, row_group_size=1)
    os.replace(path.with_suffix(".new"), path)


def _set(t: pa.Table, col: str, value: bytes) -> pa.Table:
    return t.set_column(t.schema.get_field_index(col), col, pa.array([value], pa.binary()))


def _shard_of(world: Path, modality_dir: str, cell: str) -> Path:
    md = pq.read_table(world / modality_dir / "metadata.parquet").to_pandas()
    return world / modality_dir / md.loc[md.grid_cell == cell, "parquet_url"].iloc[0]


def test_ingest__bad_input_is_quarantined_and_the_rest_stored(tmp_path):
    cells = CELLS8 + ["503U_61R"]
    world = tmp_path / "world"
    write_world(cells, world, SynthOptions(seed=4, products_per_shard=1, workers=2))
    bad = {}
    # 1. truncated S1 PNG thumbnail
    p = _shard_of(world, "Core-S1RTC", cells[0])
    _rewrite_shard(p, lambda i, t: _set(t, "thumbnail", t.column("thumbnail")[0].as_py()[:5000]))
    bad[cells[0]] = "truncated"
    # 2. corrupt S2L2A thumbnail (not an image)
    _rewrite_shard(_shard_of(world, "Core-S2L2A", cells[1]), lambda i, t: _set(t, "thumbnail", b"\x00garbage" * 50))
    bad[cells[1]] = "not a PNG or JPEG"
    # 3. DEM thumbnail of the wrong size
    _rewrite_shard(_shard_of(world, "Core-DEM", cells[2]), lambda i, t: _set(t, "thumbnail", encode_png(np.full((300, 300), 99, np.uint8))))
    bad[cells[2]] = "300x300 px, expected 356"
    # 4. an all-nodata S2L1C product
    from majortom_gen.formats import encode_jpeg

    _rewrite_shard(_shard_of(world, "Core-S2L1C", cells[3]), lambda i, t: _set(t, "thumbnail", encode_jpeg(np.zeros((1068, 1068, 3), np.uint8))))
    bad[cells[3]] = "entirely nodata"
    # 5. metadata row pointing at a row group that does not exist
    md_path = world / "Core-S1RTC/metadata.parquet"
    md = pq.read_table(md_path).to_pandas()
    md.loc[md.grid_cell == cells[4], "parquet_row"] = 7
    pq.write_table(pa.Table.from_pandas(md, preserve_index=False), md_path)
    bad[cells[4]] = "row group 7: out of range"
    # 6. a row group with missing columns (no thumbnail column)
    p = _shard_of(world, "Core-DEM", cells[5])
    pq.write_table(pq.read_table(p).drop_columns(["thumbnail"]), p)
    bad[cells[5]] = "no column(s) ['thumbnail']"
    # 7. a modality present in metadata but absent from the shards
    _shard_of(world, "Core-S2L1C", cells[6]).unlink()
    bad[cells[6]] = "shard not found"

    store = tmp_path / "store"
    report = ingest(world, cells, store, IngestOptions(cells_per_shard=4, workers=2, codec=PCA))
    assert set(report.quarantined) == set(bad)
    for cell, text in bad.items():
        assert text in report.quarantined[cell], (cell, report.quarantined[cell])
    assert report.completed_with_errors and report.cells_written == 2
    errors = [json.loads(line) for line in (store / "ingest-errors.jsonl").read_text().splitlines()]
    assert {e["grid_cell"] for e in errors} == set(bad)
    assert LatentStore.open(store).stored_cells() == {cells[7], cells[8]}


def test_cli_ingest__exit_status_completed_with_errors(tmp_path, world8):
    from typer.testing import CliRunner

    from pipelines.cli import app

    r = CliRunner().invoke(app, ["ingest", "--source", str(world8), "--cells", "501U_60R", "600U_1R",
                                 "--store", str(tmp_path / "s"), "--workers", "1", "--codec", PCA])
    assert r.exit_code == 3, r.output
    assert "completed with errors" in r.output and "600U_1R" in r.output
    r = CliRunner().invoke(app, ["store", "info", str(tmp_path / "s")])
    assert r.exit_code == 0 and "16 fragments of 1 cells" in " ".join(r.output.split())


# ----------------------------------------------------------------------------- kill and resume
def _rows(root: Path) -> dict[tuple[str, int], bytes]:
    t = LatentStore.open(root).table()
    out = {}
    for i in range(t.num_rows):
        key = (t.column("grid_cell")[i].as_py(), t.column("fragment_index")[i].as_py())
        assert key not in out, f"duplicate row {key}"
        out[key] = b"".join(np.asarray(t.column(m)[i].values.to_numpy(zero_copy_only=False)).tobytes()
                            for m in ("DEM", "S1RTC", "S2L1C", "S2L2A"))
    return out


def test_ingest__killed_and_resumed_equals_uninterrupted(tmp_path, world8):
    cmd = [sys.executable, "-m", "pipelines.cli", "ingest", "--source", str(world8), "--cells", ",".join(CELLS8),
           "--cells-per-shard", "1", "--workers", "1", "--codec", PCA]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--store", str(killed)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "shards").glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list((killed / "shards").glob("part-*.parquet")))
    assert 2 <= partial < 8, "the kill should land mid-run"
    subprocess.run(cmd + ["--store", str(killed)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clean = tmp_path / "clean"
    subprocess.run(cmd + ["--store", str(clean)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = _rows(killed), _rows(clean)
    assert len(a) == 128 and a.keys() == b.keys()
    assert a == b


def test_training_arrays_do_not_depend_on_the_order_shards_were_written(tmp_path, world8):
    """Parallel ingest writes shards in any order; the arrays training and evaluation read are
    the same for the same stored content."""
    import json

    cells = ["502U_60R", "501U_60R"]
    for name, order in (("ab", cells), ("ba", cells[::-1])):
        for cell in order:  # one ingest per cell: the shards are written in this order
            source = str(tmp_path / "ab" / "codec") if (tmp_path / "ab" / "codec").is_dir() else None  # one fit
            ingest(world8, [cell], tmp_path / name, IngestOptions(scheduler="synchronous", codec=PCA, codec_source=source))
    firsts = [json.loads((tmp_path / n / "manifest.json").read_text())["shards"][0]["cells"] for n in ("ab", "ba")]
    assert firsts[0] != firsts[1]  # the shards are listed in another order
    a, b = (load_aligned(LatentStore.open(tmp_path / n), ["DEM", "S2L2A"]) for n in ("ab", "ba"))
    assert list(a.grid_cell) == sorted(a.grid_cell) and np.array_equal(a.grid_cell, b.grid_cell)
    assert np.array_equal(a.fragment_index, b.fragment_index)
    assert all(np.array_equal(a.moments[m], b.moments[m]) for m in ("DEM", "S2L2A"))


def test_store_removes_temporary_files_of_killed_writes_old_and_new(tmp_path, world8):
    """Leftovers of an interrupted shard or manifest write, named by this version
    (``.NAME.tmp-<hex>.EXT``) or an older one (``.NAME.tmp``), are removed when the store is
    next opened; the shards and the rows stay the same."""
    store_dir = tmp_path / "s"
    ingest(world8, ["502U_60R"], store_dir, IngestOptions(scheduler="synchronous", codec=PCA))
    before = _rows(store_dir)
    leftovers = [store_dir / "shards" / ".part-0123456789abcdef.parquet.tmp",
                 store_dir / "shards" / ".part-0123456789abcdef.tmp-1a2b3c4d.parquet",
                 store_dir / ".manifest.0123.tmp", store_dir / ".manifest.tmp-1a2b3c4d.json"]
    for path in leftovers:
        path.write_bytes(b"half")
    assert _rows(store_dir) == before
    assert not [p for p in leftovers if p.exists()]


def test_ingest__on_an_existing_scheduler(tmp_path, world8):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        report = ingest(world8, ["502U_60R"], tmp_path / "s", IngestOptions(scheduler=cluster.scheduler_address, codec=PCA))
        assert cluster.scheduler_address.startswith("tcp://") or cluster.scheduler_address.startswith("inproc://")
    assert report.cells_written == 1 and report.fragments_written == 16


def test_select__rule_and_filters(world8):
    from majortom_gen.selection import Filters, choose_products, select
    from majortom_gen.sources import read_metadata

    md = read_metadata(world8 / "Core-S2L2A", "S2L2A")
    dup = md.iloc[[0, 0]].copy()
    dup["cloud_cover"] = [50.0, 5.0]
    dup["product_id"] = ["cloudy", "clear"]
    assert choose_products(dup)["product_id"].tolist() == ["clear"]
    dup["timestamp"] = [md["timestamp"].iloc[0] + pd_timedelta(1), md["timestamp"].iloc[0]]
    assert choose_products(dup, "most-recent")["product_id"].tolist() == ["cloudy"]
    sel = select(world8, CELLS8, filters=Filters(max_cloud_cover=-1))
    cov = sel.coverage()
    assert cov["S2L2A"] == cov["S2L1C"] == 0 and cov["DEM"] == cov["S1RTC"] == 8


def pd_timedelta(days):
    import pandas as pd

    return pd.Timedelta(days=days)


def test_a_local_cluster_leaves_this_process_environment_as_it_was():
    """distributed writes the workers' thread limits into the parent's environment; later
    subprocesses (and torch, loaded after it) would run on one thread."""
    from pipelines.local_cluster import local_cluster

    before = dict(os.environ)
    with local_cluster(1) as cluster:
        assert cluster.workers
    assert dict(os.environ) == before
