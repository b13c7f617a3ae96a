"""Cell borders: neighbouring cells generated each on its own vs joined in waves (issue #15),
figures as ratios measured in the same run.

    python benchmarks/bench_cell_seams.py [--steps 25] [--seeds 2] [--quick]

Builds a synthetic world of a 2 x 2 block of neighbouring cells held out of the shipped demo
model's training rows (one UTM zone; every cell in a different wave of
:func:`pipelines.cell_join.cell_waves`), ingests it with the shipped small-vae and generates
DEM and S1RTC from S2L1C+S2L2A with the shipped demo model, each cell on its seamless canvas:
independently, and joined (each later-wave cell given what its generated neighbours put
where their products overlap). For each, and for the real thumbnails, it prints:

- the cell seam ratio (:func:`model.metrics.border_seam_ratio`) of a hard-cut mosaic of the
  cells (every pixel from the nearest cell centre, :func:`pipelines.cell_join.owner_mosaic`):
  the |difference| across cell borders over the same one pixel inside, about 1 when
  neighbours continue each other;
- the overlap disagreement: the mean |difference| (8-bit units) between a cell and its
  neighbours on the ground they share;
- the paired MAE against the real fragments and the sampling time as a ratio to independent
  generation.

``--quick`` (CI: every section runs and prints, in a few minutes): the two cells of row 500
only (two waves), 2 solver steps, one seed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from majortom_gen.synth import SynthOptions, write_world
from model.metrics import border_seam_ratio
from model.train import SHIPPED_DEMO_MODEL
from pipelines.cell_canvas import cell_mosaic
from pipelines.cell_join import cell_grids, neighbour_pictures, owner_mosaic
from pipelines.codec import source_fragments
from pipelines.ingest import IngestOptions, ingest
from pipelines.model_folder import ModelOnStore
from pipelines.region import RegionRequest, sample_groups
from pipelines.sample import SamplingOptions, sample_rows_of

CELLS = ("500U_59R", "500U_60R", "501U_59R", "501U_60R")  # rows 500-501: held out of the shipped model's training
GENERATE, CONDITION = ("DEM", "S1RTC"), ("S2L1C", "S2L2A")


def overlap_disagreement(pictures: dict[str, np.ndarray], grids) -> float:
    """Mean |difference| (8-bit units) between each cell and its neighbours where they overlap."""
    diffs = []
    for cell in pictures:
        others = [(pictures[c], grids[c]) for c in pictures if c != cell and grids[cell].overlaps(grids[c])]
        if others:
            seen, covered = neighbour_pictures(grids[cell], others)
            diffs.append(np.abs(pictures[cell].astype(np.float32) - seen.astype(np.float32))[covered].ravel())
    return float(np.concatenate(diffs).mean())


def cell_pictures(bound: ModelOnStore, runs: list[Path], modality: str) -> dict[str, np.ndarray]:
    """The first sample of every cell of the sample runs, decoded as generated: {cell: (1024, 1024, 3)}."""
    out = {}
    for run in runs:
        with np.load(run / "samples.npz") as z:
            keep = z["sample"] == 0
            cells, frags = z["grid_cell"][keep], z["fragment_index"][keep]
            pictures = bound.pictures(z[f"latent_{modality}"][keep], modality, **sample_rows_of(cells, frags, 1))
        for cell in dict.fromkeys(cells.tolist()):
            rows = np.flatnonzero(cells == cell)
            out[cell] = cell_mosaic(pictures[rows[np.argsort(frags[rows])]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 cells, 2 solver steps, 1 seed (CI)")
    args = ap.parse_args()
    cells = list(CELLS)
    if args.quick:
        args.steps, args.seeds, cells = 2, 1, cells[:2]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_world(cells, root / "world", SynthOptions(seed=0, workers=1))
        ingest(root / "world", cells, root / "store", IngestOptions(scheduler="synchronous"))
        bound = ModelOnStore.open(SHIPPED_DEMO_MODEL, root / "store", device="cpu")
        grids = cell_grids(bound.store, cells)
        frags = source_fragments(root / "world", cells, GENERATE)  # (cells * 16, 256, 256, 3), cell then fragment order
        real = {m: {c: cell_mosaic(frags[m][16 * i:16 * (i + 1)]) for i, c in enumerate(sorted(cells))} for m in GENERATE}
        rows = {"real thumbnails": [{m: (border_seam_ratio(*owner_mosaic(real[m], grids)),
                                         overlap_disagreement(real[m], grids), 0.0) for m in GENERATE}]}
        seconds: dict[str, list[float]] = {}
        for join in (False, True):
            name = "cells joined in waves" if join else "independent cells"
            for seed in range(args.seeds):
                options = SamplingOptions(steps=args.steps, seed=seed, device="cpu")
                request = RegionRequest(generate=GENERATE, cells=tuple(cells), condition=CONDITION, join_cells=join)
                t0 = time.perf_counter()
                runs, _ = sample_groups(bound.model_dir, root / "store", {CONDITION: cells}, request, options,
                                        root / f"j{join}{seed}", None)
                seconds.setdefault(name, []).append(time.perf_counter() - t0)
                figures = {}
                for m in GENERATE:
                    made = cell_pictures(bound, runs, m)
                    error = np.mean([np.abs(made[c].astype(np.float32) - real[m][c].astype(np.float32)).mean() for c in cells])
                    figures[m] = (border_seam_ratio(*owner_mosaic(made, grids)), overlap_disagreement(made, grids), error)
                rows.setdefault(name, []).append(figures)
        base = np.mean(seconds["independent cells"])
        print(f"cells {', '.join(cells)}; {', '.join(GENERATE)} from {'+'.join(CONDITION)}; shipped demo model, "
              f"{args.steps} steps, {args.seeds} seed(s), {torch.get_num_threads()} CPU threads")
        print(f"{'':26s} {'time':>6s}  " + "  ".join(f"{m + ' cell seam / overlap |diff| / MAE':>36s}" for m in GENERATE))
        for name, per_seed in rows.items():
            time_text = f"{np.mean(seconds[name]) / base:5.2f}x" if name in seconds else ""
            values = {m: np.mean([f[m] for f in per_seed], axis=0) for m in GENERATE}
            print(f"{name:26s} {time_text:>6s}  " + "  ".join(
                f"{values[m][0]:12.2f} / {values[m][1]:8.2f} / " + (f"{values[m][2]:6.2f}" if name in seconds else f"{'':>6s}")
                for m in GENERATE))


if __name__ == "__main__":
    main()
