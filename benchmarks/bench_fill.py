"""Gap filling (issue #15): PSNR inside a synthetic cloud mask covering 30% of held-out S2L2A
cells, for interpolation and for generated fills, with times as ratios measured in the same run.

    python benchmarks/bench_fill.py [--cells 2] [--steps 25] [--n-samples 4] [--quick]

Builds a synthetic world of held-out cells (not among the shipped demo model's training
cells) and ingests it with the shipped small-vae. Per cell, a cloud mask of smooth blobs
covering 30% of the 1024 px crop is laid over the real S2L2A thumbnail; the observed image has
thick-cloud white in the mask. The known latents are made as ``fill`` makes them
(:func:`pipelines.fill.known_latents`: the observed image with its gaps prefilled by
interpolation, encoded); one row encodes the white-cloud image instead, as the store holds it.
Then the gaps are filled by:

- nearest-neighbour and inverse-distance interpolation (the 8 nearest known pixels of the
  gap's rim, power 2), and the normalised-convolution interpolation that ``fill`` prefills with
  (:func:`pipelines.fill.prefill`);
- the shipped demo model with nothing known and no condition (an unconditional picture
  harmonised in);
- the model from the known pixels, with S1RTC and DEM as conditions or without, from pure
  noise (strength 1) or from the prefill (``fill``'s default strength), with RePaint's
  resampling (``fill``'s default); one sample, and the mean of ``--n-samples`` beside the mean
  of as many unconditional pictures; composited by :func:`pipelines.fill.composite_cell` (the
  decoded fill harmonised to the known pixels); one row pastes the decoded fill without
  harmonising, to show what that step does.

Prints PSNR and MAE (8-bit units) inside the mask against the real clear thumbnail, whether
every pixel outside the mask is unchanged, and the time as a ratio to the known-only fill.

``--quick`` (CI: every section runs and prints, in seconds): one cell, 2 solver steps, 2 samples.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from majortom_gen.fragments import to_unit_range
from majortom_gen.gaps import RESAMPLE_DEFAULT, STRENGTH_DEFAULT
from majortom_gen.synth import SynthOptions, write_world
from model.train import SHIPPED_DEMO_MODEL
from pipelines.codec import source_fragments
from pipelines.cell_canvas import cell_fragments, cell_mosaic
from pipelines.fill import FillRequest, ObservedCell, composite_cell, fill_cells, interpolate_into_gaps, known_latents, prefill
from pipelines.ingest import IngestOptions, ingest
from pipelines.model_folder import ModelOnStore
from pipelines.sample import SamplingOptions

CELLS = ("500U_60R", "502U_59R", "500U_58R", "502U_61R")  # held out of the shipped model's training rows
MODALITY, CONDITION = "S2L2A", ("S1RTC", "DEM")
GAP_FRACTION, BLOB_PX, CLOUD_WHITE = 0.30, 40.0, 250
RESAMPLE, STRENGTH = RESAMPLE_DEFAULT, STRENGTH_DEFAULT  # as `fill` does by default


def cloud_masks(n_cells: int, seed: int = 0) -> np.ndarray:
    """bool (n_cells, 1024, 1024): smooth blobs (Gaussian-filtered noise, sigma ``BLOB_PX``)
    above the quantile that leaves exactly ``GAP_FRACTION`` of the pixels in the gaps."""
    rng = np.random.default_rng(seed)
    fields = [ndimage.gaussian_filter(rng.standard_normal((1024, 1024)), BLOB_PX) for _ in range(n_cells)]
    return np.stack([f > np.quantile(f, 1 - GAP_FRACTION) for f in fields])


def nearest_fill(observed: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Each gap pixel takes the value of the nearest known pixel."""
    rows, cols = ndimage.distance_transform_edt(gaps, return_distances=False, return_indices=True)
    return observed[rows, cols]


def idw_fill(observed: np.ndarray, gaps: np.ndarray, k: int = 8, power: float = 2.0) -> np.ndarray:
    """Inverse-distance weighting of the ``k`` nearest known pixels of the gaps' rim (3 px wide)."""
    rim = ndimage.binary_dilation(gaps, iterations=3) & ~gaps
    known, wanted = np.argwhere(rim), np.argwhere(gaps)
    dist, idx = cKDTree(known).query(wanted, k=k)
    w = 1.0 / np.maximum(dist, 1e-6) ** power
    w /= w.sum(axis=1, keepdims=True)
    values = observed[known[:, 0], known[:, 1]].astype(np.float64)
    out = observed.copy()
    out[wanted[:, 0], wanted[:, 1]] = np.rint((values[idx] * w[..., None]).sum(axis=1)).astype(np.uint8)
    return out


def full_size_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """The Gaussian filter at full size on ``(H, W, C)`` (what the pyramid replaces)."""
    return ndimage.gaussian_filter(image, sigma, axes=(0, 1))


def interpolation_speed(observed: np.ndarray, gaps: np.ndarray) -> str:
    """One cell's normalised convolution (what ``fill`` prefills and harmonises with) on a
    Gaussian pyramid against full-size filters: time ratio and largest difference in the gaps."""
    values = observed.astype(np.float32)
    t0 = time.perf_counter()
    reference = interpolate_into_gaps(values, gaps, blur=full_size_blur)
    t1 = time.perf_counter()
    pyramid = interpolate_into_gaps(values, gaps)
    t2 = time.perf_counter()
    diff = np.abs(pyramid - reference)[gaps]
    return (f"normalised convolution of a 1024 px cell: pyramid {(t1 - t0) / (t2 - t1):.1f}x faster than full-size "
            f"filters ({t2 - t1:.2f} s against {t1 - t0:.2f} s), difference in the gaps mean {diff.mean():.3f}, "
            f"max {diff.max():.2f} grey levels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    ap.add_argument("--n-samples", type=int, default=4, help="fills averaged for the mean row")
    ap.add_argument("--quick", action="store_true", help="1 cell, 2 solver steps, 2 samples (CI)")
    args = ap.parse_args()
    if args.quick:
        args.cells, args.steps, args.n_samples = 1, 2, 2
    cells = list(CELLS[: args.cells])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_world(cells, root / "world", SynthOptions(seed=0, workers=1))
        ingest(root / "world", cells, root / "store", IngestOptions(scheduler="synchronous"))
        real = source_fragments(root / "world", cells, (MODALITY,))[MODALITY]  # (cells * 16, 256, 256, 3)
        bound = ModelOnStore.open(SHIPPED_DEMO_MODEL, root / "store", device="cpu")
        table = bound.store.table(["grid_cell", "fragment_index", MODALITY, *CONDITION], cells=cells)
        order = np.lexsort((table.column("fragment_index").to_numpy(),
                            [cells.index(c) for c in table.column("grid_cell").to_pylist()]))
        table = table.take(order)

        gaps_cells = cloud_masks(len(cells))
        real_cells = np.stack([cell_mosaic(real[i * 16:(i + 1) * 16]) for i in range(len(cells))])
        observed_cells = np.where(gaps_cells[..., None], np.uint8(CLOUD_WHITE), real_cells)
        gaps = np.concatenate([cell_fragments(g) for g in gaps_cells])
        observed = np.concatenate([cell_fragments(o) for o in observed_cells])
        known = known_latents(bound, [ObservedCell("bench", observed[i * 16:(i + 1) * 16], gaps[i * 16:(i + 1) * 16])
                                      for i in range(len(cells))], MODALITY)
        with torch.no_grad():  # the latents of the cloudy image, as the store holds them
            cloudy = bound.network_means(bound.require_codec().encode_moments(torch.from_numpy(to_unit_range(observed))),
                                         MODALITY)

        def score(filled_cells: np.ndarray) -> dict:
            err = filled_cells.astype(np.float64) - real_cells
            inside = err[gaps_cells]
            return {"psnr": 10 * np.log10(255.0 ** 2 / np.mean(inside ** 2)), "mae": float(np.abs(inside).mean()),
                    "unchanged": bool((filled_cells[~gaps_cells] == observed_cells[~gaps_cells]).all())}

        speed = interpolation_speed(observed_cells[0], gaps_cells[0])
        rows: dict[str, dict] = {}
        interpolations = (("nearest neighbour", nearest_fill), ("inverse distance (k 8, power 2)", idw_fill),
                          ("normalised convolution (`fill`'s prefill)", prefill))
        for name, fill in interpolations:
            t0 = time.perf_counter()
            out = np.stack([fill(o, g) for o, g in zip(observed_cells, gaps_cells)])
            rows[name] = {**score(out), "seconds": time.perf_counter() - t0}

        def model_fill(name: str, condition: tuple, n: int, latent_gaps: np.ndarray, resample: int = RESAMPLE,
                       strength: float = STRENGTH, pasted_row: str | None = None, given: torch.Tensor = known):
            options = SamplingOptions(n_samples=n, steps=args.steps, seed=0, device="cpu", resample=resample,
                                      strength=strength)
            t0 = time.perf_counter()
            fills = fill_cells(bound, table, FillRequest(MODALITY, "bench", condition), options, latent_gaps, given)
            seconds = time.perf_counter() - t0
            harmonised, pasted = [], []
            for i in range(len(cells)):
                per = slice(i * 16, (i + 1) * 16)
                mean = composite_cell(fills[i], observed[per], gaps[per]).astype(np.float32).mean(axis=1)
                harmonised.append(cell_mosaic(np.rint(mean).astype(np.uint8)))
                raw = np.where(gaps[per][..., None], fills[i].astype(np.float32).mean(axis=1), observed[per])
                pasted.append(cell_mosaic(np.rint(raw).astype(np.uint8)))
            rows[name] = {**score(np.stack(harmonised)), "seconds": seconds}
            if pasted_row:
                rows[pasted_row] = {**score(np.stack(pasted)), "seconds": seconds}

        everything = np.ones_like(gaps)
        cond, n = ", ".join(CONDITION), args.n_samples
        base_row = f"model, known pixels + {cond}, strength 1"
        model_fill("model, nothing known, no condition (unconditional), harmonised", (), 1, everything, 0, 1.0)
        model_fill(f"model, cloudy latents known (the store's) + {cond}, strength 1", CONDITION, 1, gaps, strength=1.0,
                   given=cloudy)
        model_fill(base_row, CONDITION, 1, gaps, strength=1.0)
        model_fill(f"model, known pixels + {cond}, strength {STRENGTH} (`fill`'s default)", CONDITION, 1, gaps,
                   pasted_row="the same, pasted without harmonising")
        model_fill(f"model, unconditional, harmonised, mean of {n}", (), n, everything, 0, 1.0)
        model_fill(f"model, known pixels only, strength {STRENGTH}, mean of {n}", (), n, gaps)
        model_fill(f"model, known pixels + {cond}, strength {STRENGTH}, mean of {n}", CONDITION, n, gaps)

    base = rows[base_row]["seconds"]
    print(f"\nGap filling: {len(cells)} held-out cell(s) {', '.join(cells)}, {MODALITY}, a {GAP_FRACTION:.0%} synthetic "
          f"cloud mask per cell; shipped demo model and small-vae, {args.steps} steps, RePaint {RESAMPLE} jumps per noisy "
          f"step, {torch.get_num_threads()} CPU threads")
    print("\n| fill | PSNR in gaps (dB) | MAE in gaps | outside unchanged | time (x strength-1 fill) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['psnr']:.2f} | {r['mae']:.2f} | {'yes' if r['unchanged'] else 'NO'} | "
              f"{r['seconds'] / base:.2f}x |")
    print(f"\n(the strength-1 fill took {base:.1f} s)\n{speed}")


if __name__ == "__main__":
    main()
