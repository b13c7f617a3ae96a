"""Region throughput: fragments/s from the store to GeoTIFFs, figures as ratios measured in
the same run.

    python benchmarks/bench_region.py [--cells 4] [--steps 25] [--quick]

Builds a small synthetic world, ingests it, trains the tiny model for a few steps (its
quality does not matter for speed), then times, for every fragment of the region:
sampling (DPM-Solver++, CPU), decoding latents to thumbnails, writing fragment COGs, and
mosaics (VRTs, blended COGs). Prints fragments/s with sampling included and excluded, and
each stage's share of the time; the baseline for the writing stage is a plain (non-COG)
GeoTIFF write of the same pixels. The latents are decoded by the store's own codec (the
default ingest codec, small-vae; patch-pca with ``--quick``).

``--quick`` (CI: every stage runs and prints, in seconds): one cell, a patch-pca store, one
train step, 2 solver steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

from majortom_gen.georef import default_grid
from majortom_gen.synth import SynthOptions, write_world
from pipelines.export import sample_rows, write_fragments, write_mosaics
from pipelines.ingest import IngestOptions, ingest
from pipelines.codec import decode_images, open_store_codec
from pipelines.sample import SamplingOptions, sample_store
from pipelines.train import TrainOptions, train_on_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    ap.add_argument("--quick", action="store_true", help="1 cell, patch-pca store, 1 train step, 2 solver steps (CI)")
    args = ap.parse_args()
    options, train_steps = IngestOptions(scheduler="synchronous"), 5
    if args.quick:
        args.cells, args.steps, train_steps = 1, 2, 1
        options = IngestOptions(scheduler="synchronous", codec="patch-pca", fit_cells=1)
    grid = default_grid()
    cells = grid.cells_in((7.5, 45.0, 7.9, 45.2))[: args.cells]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_world(cells, root / "world", SynthOptions(seed=0, workers=1))
        ingest(root / "world", cells, root / "store", options)
        train_on_store("tiny", root / "store", root / "run", TrainOptions(max_steps=train_steps, test_fraction=0.0))
        t0 = time.perf_counter()
        result = sample_store(root / "run" / "model", root / "store", cells, ("S2L1C", "S2L2A"), ("DEM", "S1RTC"),
                              root / "samples", SamplingOptions(steps=args.steps, seed=0))
        t_sample = time.perf_counter() - t0
        z = np.load(root / "samples" / "samples.npz")
        codec = open_store_codec(root / "store")  # the codec that made the store's latents
        t0 = time.perf_counter()
        pixels = {m: decode_images(codec, z[f"latent_{m}"], m) for m in ("DEM", "S1RTC")}  # the network's latents
        t_decode = time.perf_counter() - t0
        rows = sample_rows(z, root / "samples")  # each fragment's UTM CRS and transform, as the run recorded them
        fragments = {}
        t0 = time.perf_counter()
        for m, px in pixels.items():
            _, fragments[m] = write_fragments(root / "tifs", m, px, rows, {})
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m, px in pixels.items():
            for i, row in enumerate(rows):
                with rasterio.open(root / "plain.tif", "w", driver="GTiff", width=256, height=256, count=3,
                                   dtype="uint8", crs=row.crs, transform=row.transform) as ds:
                    ds.write(np.moveaxis(px[i], -1, 0))
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m, by_sample in fragments.items():
            write_mosaics(m, by_sample, root / "tifs" / "mosaic", 1, {}, "EPSG:4326", None)
        t_mosaic = time.perf_counter() - t0
    n = result.fragments
    total = t_sample + t_decode + t_write + t_mosaic
    print(f"region of {len(cells)} cells, {n} fragments, 2 generated modalities, {args.steps} steps, "
          f"{codec.name} codec, {torch.get_num_threads()} CPU threads")
    print(f"  sampling included: {n / total:7.2f} fragments/s")
    print(f"  sampling excluded: {n / (total - t_sample):7.2f} fragments/s "
          f"({(total - t_sample) / total:.2f}x the time with sampling)")
    for name, t in (("sampling", t_sample), ("decoding", t_decode), ("writing COGs", t_write), ("mosaics", t_mosaic)):
        print(f"  {name:13s} {t:7.2f} s  {t / total:6.1%}")
    print(f"  COG writing costs {t_write / t_plain:.2f}x a plain GeoTIFF write of the same pixels")


if __name__ == "__main__":
    main()
