"""The main job on an embedded default: ``majortom-gen demo``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from majortom_gen.errors import MajorTomGenError
from pipelines.cli.common import DeviceOption, app, console, user_errors
from pipelines.cli.evaluate import run_evaluate
from pipelines.cli.model import run_train
from pipelines.cli.store import run_ingest, store_info
from pipelines.cli.world import print_inspection, run_synth

DEMO_REGION = "POLYGON ((7.45 44.97, 7.92 44.95, 7.95 45.22, 7.62 45.27, 7.42 45.15, 7.45 44.97))"  # Turin and its hills


DEMO_TEST_FRACTION = 0.125  # 2 of 16 cells held out: the region to fill and the evaluation set
DEMO_CONDITIONS = "none,S2L2A,S2L1C+S2L2A"  # what S2 buys for the withheld DEM and S1RTC
DEMO_GENERATE = "DEM,S1RTC"
DEMO_CONFIG = "small-finetune"  # the shipped demo model's network and last recipe, at a gentle learning rate
DEMO_FINE_TUNE_STEPS = 30
DEMO_SAMPLE_STEPS = 25


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("demo-out"),
    cells: Annotated[int, typer.Option(min=4, max=21, help="How many grid cells of the demo region to use (it has 21).")] = 16,
    steps: Annotated[int, typer.Option(min=0, help="Fine-tuning steps of the shipped demo model on the demo's training "
                                                   "cells (0: use it as shipped).")] = DEMO_FINE_TUNE_STEPS,
    seed: Annotated[int, typer.Option(min=0, help="Seed for the synthetic world and the sampling.")] = 0,
    sample_steps: Annotated[int, typer.Option(min=1, help="DPM-Solver++ steps of the region fill and the "
                                                          "evaluation.")] = DEMO_SAMPLE_STEPS,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes (default: all cores).")] = 0,
    device: DeviceOption = None,
) -> None:
    """The main job on an embedded default, offline: a synthetic Major TOM world around
    Turin in the Core format, inspected, ingested on a local Dask cluster into a latent store
    (the shipped learned codec), the shipped demo model fine-tuned briefly on it, a region
    polygon over held-out cells filled with DEM + S1RTC generated from S2 (COGs, mosaics,
    quick-looks), and the Table-1 evaluation of the model on those cells."""
    from majortom_gen.georef import default_grid
    from majortom_gen.regions import read_region

    ids = default_grid().cells_in(read_region(DEMO_REGION))[:cells]
    if len(ids) < 4:
        raise MajorTomGenError(f"--cells must be >= 4 (some are held out to fill and evaluate), got {cells}")
    start = time.perf_counter()
    paths, run = DemoPaths.under(out), DemoSettings(seed, steps, sample_steps, device)
    _reset_if_other_demo(out, {"seed": seed, "cells": ids, "steps": steps})
    _adopt_demo_outputs(paths.region, paths.evaluation)
    _world_and_store(paths, ids, seed, workers or (os.cpu_count() or 1), device)
    test_cells = _fine_tune(paths, ids, steps, device)
    region_file = _fill_region(paths, run, test_cells)
    extractors = _evaluate(paths, run)
    console.rule("[bold]done")
    _summary(paths, time.perf_counter() - start)
    _repeat_by_hand(paths, run, ids, region_file, extractors)


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo writes: everything under ``out``."""

    out: Path
    world: Path
    store: Path
    run: Path
    region: Path
    evaluation: Path
    extractors: Path
    preview: Path
    region_file: Path

    @classmethod
    def under(cls, out: Path) -> "DemoPaths":
        return cls(out, out / "world", out / "store", out / "train", out / "region", out / "evaluation",
                   out / "extractors", out / "world-preview.png", out / "region.geojson")


@dataclass(frozen=True)
class DemoSettings:
    """The demo's seed, fine-tuning steps, sampling steps and device."""

    seed: int
    steps: int
    sample_steps: int
    device: str | None


MODALITIES = ("DEM", "S1RTC", "S2L1C", "S2L2A")


def _world_and_store(paths: DemoPaths, ids: list[str], seed: int, workers: int, device: str | None) -> None:
    """Steps 1-3: the synthetic world, its inspection, the latent store."""
    from majortom_gen.selection import Filters
    from pipelines.ingest import IngestOptions

    console.rule("[bold]1. synthetic Major TOM world")
    console.print(f"{len(ids)} cells around Turin, seed {seed} -> {paths.world}")
    run_synth(ids, paths.world, seed=seed, workers=workers, products_per_shard=500, quirks=(), modalities=MODALITIES)
    console.rule("[bold]2. inspect it")
    print_inspection(paths.world, paths.preview)
    console.rule("[bold]3. ingest into a latent store (local Dask cluster, the shipped small-vae codec)")
    run_ingest(str(paths.world), ids, paths.store, IngestOptions(workers=workers, device=device or "auto"),
               modalities=MODALITIES, filters=Filters(), rule="least-cloudy")
    store_info(paths.store)


def _fine_tune(paths: DemoPaths, ids: list[str], steps: int, device: str | None) -> list[str]:
    """Step 4: fine-tune the shipped demo model on the training cells; returns the held-out cells."""
    from majortom_gen.splits import split_cells
    from pipelines.train import SHIPPED_DEMO_MODEL, TrainOptions

    train_cells, test_cells = split_cells(ids, DEMO_TEST_FRACTION, 0)
    console.rule(f"[bold]4. fine-tune the shipped demo model ({steps} steps) on {len(train_cells)} cells; "
                 f"{len(test_cells)} held out")
    made = _shipped_record()
    console.print(Text(f"Starting from the demo model shipped with the package ({SHIPPED_DEMO_MODEL}): made by "
                       f"`{made['command']}` on {len(made['train_cells'])} cells of the synthetic world that are not "
                       f"the demo's ({_shipped_steps(made):,} steps in all on {made['hardware']['cpu_count']} CPU "
                       "cores; its training_data.json has the stages). A few CPU minutes cannot teach a diffusion model "
                       "the cross-modal mapping from scratch; the demo adapts the shipped model to its own cells for a "
                       "few steps at a gentle learning rate (configs/small-finetune.yaml), which keeps what it "
                       "learnt.", style="yellow"), soft_wrap=True)
    run_train(DEMO_CONFIG, paths.store, paths.run,
              TrainOptions(max_steps=steps, resume=(paths.run / "checkpoints").exists(), test_fraction=DEMO_TEST_FRACTION,
                           device=device, init_from=SHIPPED_DEMO_MODEL, command=_train_command(paths, steps)))
    return test_cells


def _shipped_record() -> dict:
    """``training_data.json`` of the shipped demo model."""
    from pipelines.train import SHIPPED_DEMO_MODEL

    return json.loads((SHIPPED_DEMO_MODEL / "training_data.json").read_text())


def _shipped_steps(made: dict) -> int:
    """Training steps of the shipped demo model, all its stages together."""
    return int(made.get("total_steps", made["steps"]))


def _train_command(paths: DemoPaths, steps: int) -> str:
    from pipelines.train import SHIPPED_DEMO_MODEL

    return (f"majortom-gen train --config {DEMO_CONFIG} --store {paths.store} --out {paths.run} --max-steps {steps} "
            f"--test-fraction {DEMO_TEST_FRACTION} --init-from {SHIPPED_DEMO_MODEL}")


def _fill_region(paths: DemoPaths, run: DemoSettings, test_cells: list[str]) -> Path:
    """Step 5: a polygon inside the held-out cells, DEM and S1RTC generated from S2; returns its file."""
    import geopandas as gpd
    from shapely.ops import unary_union

    from majortom_gen.georef import default_grid
    from pipelines.region import RegionRequest, generate_region
    from pipelines.sample import SamplingOptions

    console.rule("[bold]5. fill a region: DEM and S1RTC withheld, generated from S2L1C + S2L2A")
    polygon = unary_union([default_grid().footprint(c) for c in test_cells]).buffer(-0.01)  # inside the held-out cells
    gpd.GeoDataFrame({"name": ["demo region"]}, geometry=[polygon], crs="EPSG:4326").to_file(paths.region_file,
                                                                                             driver="GeoJSON")
    console.print(f"region: {len(test_cells)} held-out cells {', '.join(test_cells)} (the model never saw them); "
                  "the store keeps their real DEM/S1RTC for comparison, the model is not given them", soft_wrap=True)
    request = RegionRequest(generate=("DEM", "S1RTC"), region=polygon, condition=("S2L1C", "S2L2A"))
    region = generate_region(paths.run / "model", paths.store, paths.region, request,
                             SamplingOptions(n_samples=2, steps=run.sample_steps, seed=run.seed, device=run.device),
                             overwrite=True)  # the demo's own folder, rerun
    tifs = [f for f in region.files if f.suffix in (".tif", ".vrt")]
    console.print(f"{len(tifs)} GeoTIFFs/VRTs -> {paths.region}/geotiff: <cell>/<modality>/f<fragment>_s<sample>.tif "
                  "(fragment COGs), mosaic/<modality>_s<k>_EPSG4326.tif (blended, clipped to the polygon), "
                  "mosaic/*.vrt (per UTM zone), mosaic/<modality>_mean|std_EPSG4326.tif (over samples); "
                  f"quick-looks {paths.region}/samples/all/<cell>.png", soft_wrap=True)
    console.print("  each quick-look shows the cell as a whole (its 4 x 4 fragments in place): a row of the "
                  "conditions (S2L1C, S2L2A), then per generated modality: real | sample 1 | sample 2 | mean | "
                  "per-pixel std", soft_wrap=True)
    return paths.region_file


def _evaluate(paths: DemoPaths, run: DemoSettings) -> dict[str, Path]:
    """Step 6: the Table-1 evaluation on the held-out cells, with offline extractors; returns them."""
    from pipelines.evaluate import EvalOptions, offline_extractors, parse_conditions

    console.rule("[bold]6. evaluate (Table-1 layout) on the held-out cells")
    extractors = offline_extractors(paths.extractors, seed=run.seed)
    console.print(Text("  offline, the feature extractors are randomly initialised (the FID Inception-v3 "
                       "architecture and a small DINOv2), saved locally: the numbers rank runs of this demo only "
                       "and are not comparable with published FID/precision/recall (use the default extractors, "
                       "downloaded once, for that). The demo model is small and CPU-trained "
                       f"({_shipped_steps(_shipped_record()):,} steps): "
                       "its S1RTC samples follow the S2 land cover and water; its DEM samples put relief roughly where "
                       "S2 suggests it, as soft blobs with blocky edges, and draw some where there is none (these two "
                       "cells are flatter than most); compare the rows 'none' and 'S2L2A' of table1.md (mae_change) "
                       "to see what conditioning buys. Sharp, faithful samples need tens of thousands of steps on a "
                       "GPU, or the published weights.", style="yellow"), soft_wrap=True)
    options = EvalOptions(conditions=parse_conditions(DEMO_CONDITIONS), generate=tuple(DEMO_GENERATE.split(",")),
                          steps=run.sample_steps, seed=run.seed, batch_size=48, fid_extractor=str(extractors["inception"]),
                          pr_extractor=str(extractors["dinov2"]), device=run.device, overwrite=True)
    run_evaluate(paths.run / "model", paths.store, paths.evaluation, options)
    return extractors


def _summary(paths: DemoPaths, seconds: float) -> None:
    """What was written, where to look, how to open it in QGIS."""
    out, region_out = paths.out, paths.region
    listing = _write_file_list(out)
    console.print(f"wall time {seconds:.1f} s; every file written is listed in {listing}:", highlight=False)
    for folder, (n, size) in _folder_sizes(out).items():
        console.print(f"  {folder + '/':24s} {n:5d} files {size / 2**20:8.1f} MiB", highlight=False)
    console.print(f"Look at: {paths.preview}, {paths.run}/loss.png, {region_out}/samples/all/*.png, "
                  f"{region_out}/geotiff/index.md, {paths.evaluation}/table1.md, {paths.evaluation}/plots/",
                  soft_wrap=True, highlight=False)
    console.print(f"QGIS: Layer > Add Layer > Add Raster Layer, pick {region_out}/geotiff/mosaic/DEM_mean_EPSG4326.tif "
                  "(or any .tif/.vrt; or drag them in). Fragment COGs carry their cell's UTM CRS and land over their "
                  "grid cell; mosaics are in EPSG:4326, clipped to the region. Values are 8-bit visualisations "
                  "(hillshade, false colour), not elevation or backscatter.", soft_wrap=True, highlight=False)


def _repeat_by_hand(paths: DemoPaths, run: DemoSettings, ids: list[str], region_file: Path,
                    extractors: dict[str, Path]) -> None:
    """The commands that repeat the demo step by step."""
    console.print("Repeat the steps by hand:")
    dev = f" --device {run.device}" if run.device else ""
    model = paths.run / "model"
    for line in (f"majortom-gen synth --cells {','.join(ids)} --out {paths.world} --seed {run.seed}",
                 f"majortom-gen inspect {paths.world} --preview {paths.preview}",
                 f"majortom-gen ingest --source {paths.world} --cells {','.join(ids)} --store {paths.store}",
                 f"majortom-gen store info {paths.store}",
                 _train_command(paths, run.steps) + dev,
                 f"majortom-gen generate --model {model} --store {paths.store} --region {region_file} "
                 f"--condition S2L1C,S2L2A --generate DEM,S1RTC --n-samples 2 --steps {run.sample_steps} --seed {run.seed} "
                 f"--out {paths.region} --overwrite{dev}",
                 f"majortom-gen evaluate --model {model} --store {paths.store} --out {paths.evaluation} --conditions "
                 f"{DEMO_CONDITIONS} --generate {DEMO_GENERATE} --steps {run.sample_steps} --fid-extractor {extractors['inception']} "
                 f"--pr-extractor {extractors['dinov2']} --overwrite{dev}"):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    console.print("On real data: --source hf://datasets/Major-TOM (or a local mirror), --codec sd-vae --codec-source "
                  "<VAE>, `majortom-gen convert-weights` for the published COP-GEN-Beta model, and the default "
                  "extractors for evaluation (GPU advised). See the README.", soft_wrap=True)


def _folder_sizes(out: Path) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    for f in sorted(out.rglob("*")):
        if f.is_file():
            top = f.relative_to(out).parts[0] if len(f.relative_to(out).parts) > 1 else "."
            n, size = sizes.get(top, (0, 0))
            sizes[top] = (n + 1, size + f.stat().st_size)
    return sizes


def _write_file_list(out: Path) -> Path:
    """``FILES.md``: every file under the demo folder with its size."""
    path = out / "FILES.md"
    lines = ["# Files written by `majortom-gen demo`", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {f.relative_to(out).as_posix()} | {f.stat().st_size} |"
              for f in sorted(out.rglob("*")) if f.is_file() and f != path]
    path.write_text("\n".join(lines) + "\n")
    return path


def _reset_if_other_demo(out: Path, params: dict) -> None:
    """A demo folder is resumable for the same parameters; other parameters start afresh
    (a store must not mix latents of two worlds, nor a run resume on other cells: its
    held-out cells would differ)."""
    import json
    import shutil

    record = out / "demo.json"
    if record.exists() and json.loads(record.read_text()) != params:
        for name in ("world", "store", "train", "region", "evaluation"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(params))


def _adopt_demo_outputs(*folders: Path) -> None:
    """Folders of the demo's own output (``demo.json`` beside them) written by a version
    before output markers get one, so that the demo can replace them on a re-run."""
    from majortom_gen.staging import MARKER

    for folder in folders:
        if folder.is_dir() and not (folder / MARKER).exists() and (folder.parent / "demo.json").exists():
            (folder / MARKER).write_text(json.dumps({"made_by": "majortom-gen", "kind": "demo"}) + "\n")


