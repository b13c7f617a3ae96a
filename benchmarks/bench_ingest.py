"""Ingestion benchmarks, figures as ratios to baselines measured in the same run.

    python benchmarks/bench_ingest.py [--cells 16] [--workers 2] [--skip-vae] [--skip-memory] [--quick]

1. decode+crop (fragments/s, codec excluded): the ingest decode task in one process, against
   the bound of only decoding the same thumbnails in one process; and its scaling with
   Dask workers (1 vs N local workers).
2. end to end: ingest with the default offline codec, small-vae (cells/s, fragments/s);
   encode throughput of the full-size sd-vae architecture (random weights) on the CPU, and
   on a GPU when one is present, relative to patch-pca (benchmarks/bench_codec.py compares the
   codecs in detail).
3. store random read: aligned 4-modality tuples/s from a 10k-fragment store, against a
   contiguous copy of the same bytes.
4. peak memory of an ingest of N cells vs N/4 cells (bounded means a ratio near 1).

``--quick`` (CI: every section runs and prints, in seconds): 2 cells, decoded on 1 and 2
workers; the ingests on 1 worker with the patch-pca codec; encode speeds on 64x64 crops; a
512-fragment store read in 4 batches of 128; the memory of 1 cell vs 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from majortom_gen.formats import decode_thumbnail
from majortom_gen.fragments import fragment_windows
from majortom_gen.georef import default_grid
from majortom_gen.regions import read_region
from majortom_gen.selection import select
from majortom_gen.sources import read_row_groups
from majortom_gen.store import (
    CellLatents,
    CodecInfo,
    LatentStore,
    cells_table,
    load_aligned,
)
from majortom_gen.synth import SynthOptions, write_world

REGION = "7.3,44.9,8.1,45.4"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _decode_count(modality: str, shard: str, items: list) -> int:
    """Decode on the worker, return only the fragment count (no transfer to the client)."""
    from pipelines.ingest import decode_task

    return sum(v.shape[0] for v in decode_task(modality, shard, items, "grid").values() if not isinstance(v, str))


def decode_benchmark(world: Path, cells: list[str], workers: int) -> None:
    from pipelines.ingest import _decode_items, decode_task

    sel = select(world, cells)
    groups = _decode_items(sel, cells)
    # the bound: decode the same thumbnails, bytes already in memory
    blobs = []
    for (m, shard), items in groups.items():
        for _, result in read_row_groups(shard, sorted({rg for _, rg, _ in items}), ["thumbnail"]):
            blobs.append(result["thumbnail"])
    t_bound, _ = timed(lambda: [decode_thumbnail(b) for b in blobs])
    t_task, out = timed(lambda: [decode_task(m, shard, items, "grid") for (m, shard), items in groups.items()])
    n_frag = sum(v.shape[0] for d in out for v in d.values() if not isinstance(v, str))
    print(f"[decode] decode+read+crop {n_frag / t_task:,.0f} fragments/s in one process; "
          f"{len(blobs) / t_bound:,.1f} thumbnails/s decode-only bound -> ratio {t_bound / t_task:.2f} of the bound")

    from dask.distributed import Client, LocalCluster

    rates = {}
    for n in sorted({1, workers}):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40) as cl, Client(cl) as client:
            client.submit(lambda: 0).result()
            t, _ = timed(lambda: client.gather([client.submit(_decode_count, m, s, it, pure=False) for (m, s), it in groups.items()]))
            rates[n] = n_frag / t
    if workers > 1:
        print(f"[decode] Dask scaling (work on workers, counts returned): {rates[1]:,.0f} fragments/s on 1 worker, {rates[workers]:,.0f} on {workers} "
              f"-> {rates[workers] / rates[1]:.2f}x (linear would be {workers}x)")


def end_to_end(world: Path, cells: list[str], workers: int, skip_vae: bool, codec: str = "small-vae",
               size: int = 256) -> None:
    import torch

    from model.codecs import SD_VAE_CONFIG, Codec, fit_patch_pca
    from pipelines.ingest import IngestOptions, ingest

    with tempfile.TemporaryDirectory() as tmp:
        options = IngestOptions(workers=workers) if codec == "small-vae" else \
            IngestOptions(workers=workers, codec=codec, fit_cells=min(4, len(cells)))
        t, report = timed(lambda: ingest(world, cells, Path(tmp) / "store", options))
    print(f"[e2e] {codec} ingest of {report.cells_written} cells: {report.cells_written / t:.2f} cells/s, "
          f"{report.fragments_written / t:,.0f} fragments/s (incl. cluster start and codec set-up; {t:.1f} s)")
    x = torch.rand(16, 3, size, size) * 2 - 1
    pca, _ = fit_patch_pca(x)
    t_pca, _ = timed(lambda: pca.encode_moments(x))
    if skip_vae:
        return
    from diffusers import AutoencoderKL

    vae = Codec("sd-vae", AutoencoderKL(**SD_VAE_CONFIG))
    xb = x[:4]
    vae.encode_moments(xb[:1])
    t_vae, _ = timed(lambda: vae.encode_moments(xb))
    print(f"[e2e] encode on CPU, {size}x{size}: patch-pca {16 / t_pca:,.0f} fragments/s, sd-vae (full size, random weights) "
          f"{4 / t_vae:.2f} fragments/s -> sd-vae is {(16 / t_pca) / (4 / t_vae):,.0f}x slower")
    if torch.cuda.is_available():
        gv = Codec("sd-vae", AutoencoderKL(**SD_VAE_CONFIG), device="cuda", dtype=torch.float16)
        xg = (torch.rand(64, 3, size, size) * 2 - 1)
        gv.encode_moments(xg[:8])
        torch.cuda.synchronize()
        t_gpu, _ = timed(lambda: gv.encode_moments(xg))
        print(f"[e2e] sd-vae fp16 on {torch.cuda.get_device_name()}: {64 / t_gpu:,.0f} fragments/s "
              f"-> {(64 / t_gpu) / (4 / t_vae):,.0f}x the CPU")


def store_read(n_fragments: int = 10_000, batches: int = 40, batch: int = 256) -> None:
    grid = default_grid()
    cells = grid.cells_in(read_region("0,40,20,50"))[: n_fragments // 16]
    rng = np.random.default_rng(0)
    windows = fragment_windows("grid")
    mods = ("DEM", "S1RTC", "S2L1C", "S2L2A")
    with tempfile.TemporaryDirectory() as tmp:
        store = LatentStore.create(Path(tmp) / "s", CodecInfo("patch-pca", "bench", {}))
        for i in range(0, len(cells), 64):
            lat = [CellLatents(c, windows, {m: rng.standard_normal((16, 8, 32, 32)).astype(np.float16) for m in mods},
                               {}) for c in cells[i:i + 64]]
            store.write_shard(cells_table(lat))
        t_load, arrays = timed(lambda: load_aligned(store, mods, cache=True))
        n = len(arrays)
        idx = rng.integers(0, n, (batches, batch))
        t_rand, _ = timed(lambda: [arrays.get(np.sort(i)) for i in idx])
        rate = idx.size / t_rand
        contiguous = {m: np.asarray(a) for m, a in arrays.moments.items()}
        t_copy, _ = timed(lambda: [{m: a[:batch].copy() for m, a in contiguous.items()} for _ in range(batches)])
        print(f"[store] {n} aligned 4-modality fragments; first load + cache {t_load:.1f} s; random batches of {batch}: "
              f"{rate:,.0f} tuples/s (target >= 5,000) -> {t_copy / t_rand:.2f} of a contiguous in-memory copy")


def _peak_rss(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; sample the RSS of it and of its descendants (Dask workers) every 50 ms.
    Returns the peaks in MB: (the process itself, the largest descendant)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    me, peak_self, peak_child = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            peak_self = max(peak_self, me.memory_info().rss)
            for child in me.children(recursive=True):
                peak_child = max(peak_child, child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed with {proc.returncode}")
    return peak_self / 2**20, peak_child / 2**20


def peak_memory(cells_small: int, cells_big: int, workers: int, codec: str = "small-vae") -> None:
    """Peak RSS of an ingest (client process and its Dask workers) for few and many cells."""
    extra = "" if codec == "small-vae" else f", codec={codec!r}, fit_cells=1"
    code = ("import sys, pathlib, tempfile\nfrom pipelines.ingest import ingest, IngestOptions\n"
            f"ingest(sys.argv[1], sys.argv[2].split(','), pathlib.Path(tempfile.mkdtemp()) / 's', "
            f"IngestOptions(workers={workers}, cells_per_shard=4{extra}))\n")
    cells = default_grid().cells_in(read_region(REGION))[:cells_big]
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_world(cells, Path(tmp) / "w", SynthOptions(seed=2, workers=workers))
        for n in (cells_small, cells_big):
            peaks[n] = _peak_rss([sys.executable, "-c", code, str(Path(tmp) / "w"), ",".join(cells[:n])])
    (s_main, s_child), (b_main, b_child) = peaks[cells_small], peaks[cells_big]
    print(f"[memory] peak RSS, {cells_small} cells: client {s_main:.0f} MB, largest worker {s_child:.0f} MB; "
          f"{cells_big} cells: client {b_main:.0f} MB, worker {b_child:.0f} MB -> ratios {b_main / s_main:.2f}, "
          f"{b_child / s_child:.2f} for {cells_big / cells_small:.0f}x the cells")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="2 cells, patch-pca ingests, 64x64 encode timings, a 512-fragment store (CI)")
    args = ap.parse_args()
    codec, size, store_args, ingest_workers = "small-vae", 256, (10_000, 40, 256), args.workers
    if args.quick:
        args.cells, args.workers = 2, 2
        codec, size, store_args, ingest_workers = "patch-pca", 64, (512, 4, 128), 1
    cells = default_grid().cells_in(read_region(REGION))[: args.cells]
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        t, _ = timed(lambda: write_world(cells, world, SynthOptions(seed=1, workers=args.workers)))
        print(f"[setup] synthetic world of {len(cells)} cells in {t:.1f} s ({len(cells) / t:.2f} cells/s on {args.workers} workers)")
        decode_benchmark(world, cells, args.workers)
        end_to_end(world, cells, ingest_workers, args.skip_vae, codec, size)
    store_read(*store_args)
    if not args.skip_memory:
        peak_memory(1 if args.quick else max(args.cells // 4, 2), args.cells, ingest_workers, codec)


if __name__ == "__main__":
    main()
