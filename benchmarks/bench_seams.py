"""Seams: a cell generated as 16 independent fragments vs on one canvas (issue #15), figures as
ratios measured in the same run.

    python benchmarks/bench_seams.py [--cells 2] [--steps 25] [--seeds 2] [--quick]

Builds a synthetic world of held-out cells (not among the shipped demo model's training
cells), ingests it with the shipped small-vae, and generates DEM and S1RTC from S2L1C+S2L2A
with the shipped demo model three ways: independent fragments decoded one by one (the old
path), independent fragments decoded as whole cells, and the seamless canvas (overlapping
windows merged at every solver step, decoded whole). For each it prints the pixel and tone
seam ratios (:func:`model.metrics.seam_ratio`) of the cells' mosaics beside those of the real
thumbnails, the paired MAE against the real fragments (8-bit units, mean over seeds) and the
sampling time as a ratio to independent generation.

``--quick`` (CI: every section runs and prints, in seconds): one cell, 2 solver steps, one seed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from majortom_gen.synth import SynthOptions, write_world
from model.metrics import mae, seam_ratio
from pipelines.cell_canvas import cell_mosaic
from pipelines.codec import decode_fragments, decode_images, open_store_codec, source_fragments
from pipelines.ingest import IngestOptions, ingest
from pipelines.sample import SamplingOptions, sample_store
from model.train import SHIPPED_DEMO_MODEL

CELLS = ("500U_60R", "502U_59R", "500U_58R", "502U_61R")  # held out of the shipped model's training rows
GENERATE, CONDITION = ("DEM", "S1RTC"), ("S2L1C", "S2L2A")
TONE_PX = 8


def mosaics(pictures: np.ndarray) -> np.ndarray:
    """uint8 (cells * 16, 256, 256, 3) in (cell, fragment index) order -> (cells, 1024, 1024, 3)."""
    return np.stack([cell_mosaic(cell) for cell in pictures.reshape(-1, 16, *pictures.shape[1:])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    ap.add_argument("--seeds", type=int, default=2, help="seeds averaged for the MAE")
    ap.add_argument("--quick", action="store_true", help="1 cell, 2 solver steps, 1 seed (CI)")
    args = ap.parse_args()
    if args.quick:
        args.cells, args.steps, args.seeds = 1, 2, 1
    cells = list(CELLS[: args.cells])
    model = SHIPPED_DEMO_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_world(cells, root / "world", SynthOptions(seed=0, workers=1))
        ingest(root / "world", cells, root / "store", IngestOptions(scheduler="synchronous"))
        real = source_fragments(root / "world", cells, GENERATE)  # (cells * 16, 256, 256, 3), fragment order
        codec = open_store_codec(root / "store")
        figures: dict[str, dict] = {}
        for seamless in (False, True):
            for seed in range(args.seeds):
                options = SamplingOptions(steps=args.steps, seed=seed, device="cpu", seamless=seamless)
                t0 = time.perf_counter()
                run = sample_store(model, root / "store", cells, CONDITION, GENERATE, root / f"s{seamless}{seed}",
                                   replace(options), overwrite=True).out
                seconds = time.perf_counter() - t0
                z = np.load(run / "samples.npz")
                order = np.lexsort((z["fragment_index"], [cells.index(c) for c in z["grid_cell"]]))
                rows = (z["grid_cell"][order].tolist(), z["fragment_index"][order].tolist())
                decodes = {"whole cells": lambda x, m: decode_fragments(codec, x, m, *rows)}
                if not seamless:
                    decodes["one by one"] = lambda x, m: decode_images(codec, x, m)
                for how, decode in decodes.items():
                    name = ("seamless canvas" if seamless else "independent") + f", decoded {how}"
                    entry = figures.setdefault(name, {"seconds": [], **{m: [] for m in GENERATE}})
                    entry["seconds"].append(seconds)
                    for m in GENERATE:
                        pictures = decode(z[f"latent_{m}"][order].astype(np.float32), m)
                        mos = mosaics(pictures)
                        entry[m].append((seam_ratio(mos), seam_ratio(mos, width=TONE_PX), float(mae(pictures, real[m]).mean())))
        base = np.mean(figures["independent, decoded one by one"]["seconds"])
        print(f"{len(cells)} held-out cell(s), {16 * len(cells)} fragments; {', '.join(GENERATE)} from "
              f"{'+'.join(CONDITION)}; shipped demo model, {args.steps} steps, {args.seeds} seed(s), "
              f"{torch.get_num_threads()} CPU threads")
        print(f"{'':42s} {'time':>6s}  " + "  ".join(f"{m + ' seam px/tone':>20s} {m + ' MAE':>10s}" for m in GENERATE))
        real_mos = {m: mosaics(real[m]) for m in GENERATE}
        print(f"{'real thumbnails':42s} {'':>6s}  " + "  ".join(
            f"{seam_ratio(real_mos[m]):9.2f} /{seam_ratio(real_mos[m], width=TONE_PX):9.2f} {'':>10s}" for m in GENERATE))
        for name, entry in figures.items():
            values = {m: np.mean(entry[m], axis=0) for m in GENERATE}
            print(f"{name:42s} {np.mean(entry['seconds']) / base:5.2f}x  " + "  ".join(
                f"{values[m][0]:9.2f} /{values[m][1]:9.2f} {values[m][2]:10.2f}" for m in GENERATE))


if __name__ == "__main__":
    main()
