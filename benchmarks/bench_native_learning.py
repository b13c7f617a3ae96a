"""Does a native-family model learn the cross-modal mapping? A learning measurement on the
whole pipeline (synthetic Core shards -> native ingest -> train -> sample -> decode -> physical
units), in metres and dB, as ratios to unconditional generation of the same cells (#14).

    python benchmarks/bench_native_learning.py [--steps 2000] [--quick]
    python benchmarks/bench_native_learning.py --model RUN/model --store STORE --source WORLD --cells A,B,C

Full: a synthetic world of 66 training cells (490U-495U, 56R-66R) and 3 held-out cells,
ingested with per-group patch-pca codecs, ``native-tiny`` trained for ``--steps`` on the
training cells only (about 15 min for 2000 steps on 2 cores), then DEM and S1 of the
held-out cells generated (25 steps, 2 seeds) unconditionally, from the location and date
tokens, and from the three S2L2A band groups (with the tokens). Prints each row's error in
metres (DEM) and dB (S1) and its change against the unconditional row.

``--quick`` (CI): 3 cells, 10 training steps, 2 solver steps: every stage runs; figures meaningless.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from majortom_gen.synth import SynthOptions, write_world
from pipelines.ingest import IngestOptions
from pipelines.ingest_native import ingest_native
from pipelines.native_evaluate import UNITS, evaluate_native
from pipelines.native_sample import NativeSampling

TRAIN = [f"{r}U_{c}R" for r in range(490, 496) for c in range(56, 67)]
HELD_OUT = ["500U_60R", "502U_59R", "500U_58R"]
S2 = ["S2L2A_B02_B03_B04_B08", "S2L2A_B05_B06_B07_B11_B12_B8A", "S2L2A_B01_B09"]
TOKENS = ["3d_cartesian_lat_lon", "mean_timestamps"]
SETS = {"location + date": TOKENS, "S2L2A + location + date": S2 + TOKENS}


def build(tmp: Path, train_cells: list[str], held: list[str], steps: int) -> tuple[Path, Path, Path]:
    """World, native store and a trained native-tiny model; returns (model, store, world)."""
    from pipelines.dataset import build_dataset
    from pipelines.train import TrainOptions, train_on_store

    world = tmp / "world"
    t = time.perf_counter()
    write_world(train_cells + held, world, SynthOptions(seed=0, workers=2))
    ingest_native(world, train_cells + held, tmp / "store", IngestOptions(codec="patch-pca", workers=2))
    build_dataset(tmp / "store", tmp / "train-store", cells=train_cells, test_fraction=0.0, hf=False)
    print(f"world + native ingest: {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    train_on_store("native-tiny", tmp / "train-store", tmp / "run", TrainOptions(max_steps=steps, test_fraction=0.0,
                                                                                device="cpu"))
    print(f"training {steps} steps: {time.perf_counter() - t:.0f} s")
    return tmp / "run" / "model", tmp / "store", world


def report(model: Path, store: Path, world: Path, cells: list[str], options: NativeSampling, seeds: list[int]) -> None:
    for target in ("DEM_DEM", "S1RTC_vh_vv"):
        from majortom_gen.native import get_band_group

        unit = UNITS[get_band_group(target).encoding]
        rows = evaluate_native(model, store, world, cells, target, SETS, options, seeds)
        print(f"\n{target}: mean absolute error against the real product, {len(cells)} held-out cells, "
              f"{len(seeds)} seed(s), {options.steps} steps")
        for name, row in rows.items():
            print(f"   {name:28s} {row['error']:9.3f} {unit:>3s}   {row['change'] * 100:+6.1f}% vs unconditional")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--model")
    parser.add_argument("--store")
    parser.add_argument("--source")
    parser.add_argument("--cells", default=",".join(HELD_OUT))
    args = parser.parse_args()
    cells = [c for c in args.cells.split(",") if c]
    options = NativeSampling(steps=2 if args.quick else 25, guidance=1.0)
    seeds = [0] if args.quick else [0, 1]
    if args.model:
        report(Path(args.model), Path(args.store), Path(args.source), cells, options, seeds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        train_cells = TRAIN[:2] if args.quick else TRAIN
        held = HELD_OUT[:1] if args.quick else HELD_OUT
        model, store, world = build(Path(tmp), train_cells, held, 10 if args.quick else args.steps)
        report(model, store, world, held, options, seeds)


if __name__ == "__main__":
    main()
