"""The evaluation command (Table 1 of the paper)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from majortom_gen.errors import MajorTomGenError
from pipelines.cli.common import (
    DeviceOption,
    GuidanceOption,
    OverwriteOption,
    SeamlessOption,
    app,
    cells_file,
    console,
    progress_bar,
    user_errors,
)
from pipelines.guidance import GUIDANCE_DEFAULT


def run_evaluate(model: Path, store: Path, out: Path, options) -> list[dict]:
    """Run the evaluation with a progress bar and print the Table-1 layout."""
    from pipelines.evaluate import DISTRIBUTION_METRICS, evaluate

    with progress_bar("evaluating", "fragments") as update:
        result = evaluate(model, store, out, options, progress=lambda d, t, note: update(d, t, f"{note}: "))
    table = Table(title=f"N = {result.fragments} {options.split} fragments x {options.n_samples} sample(s); FID (Inception), "
                        "precision/recall/F (DINOv2)")
    table.add_column("condition")
    table.add_column("generated")
    for name in DISTRIBUTION_METRICS + ("psnr", "ssim"):
        table.add_column(name, justify="right")
    for r in result.rows:
        table.add_row(r["condition"], r["modality"], *[("" if r[k] != r[k] else f"{r[k]:.3g}")
                                                       for k in DISTRIBUTION_METRICS + ("psnr", "ssim")])
    console.print(table)
    console.print(f"[green]wrote[/] {', '.join(f.name for f in result.files if f.parent == result.out)} and plots/ -> {result.out}",
                  highlight=False)
    return result.rows


@app.command()
@user_errors
def evaluate(
    model: Annotated[Path, typer.Option(help="A trained or converted model folder.")],
    store: Annotated[Path, typer.Option(help="Latent store with the real fragments.")],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.csv, table1.md, metrics.json, plots/.")],
    conditions: Annotated[str, typer.Option(help="Condition sets, comma-separated; 'none' = unconditional; "
                                                 "join modalities with '+' (S2L1C+S2L2A).")] = "none,DEM,S1RTC,S2L1C,S2L2A",
    generate: Annotated[Optional[str], typer.Option(help="Modalities to generate and score, comma-separated "
                                                         "(default: every modality not in the condition).")] = None,
    split: Annotated[str, typer.Option(help="Cells to evaluate on: test (held out in training), train or all.")] = "test",
    n_samples: Annotated[int, typer.Option(min=1, help="Samples per fragment (best-of-n PSNR and spread use them all).")] = 1,
    steps: Annotated[int, typer.Option(min=1, help="DPM-Solver++ steps.")] = 50,
    guidance: GuidanceOption = GUIDANCE_DEFAULT,
    seed: Annotated[int, typer.Option(min=0, help="Seed; each fragment's noise derives from (seed, cell, fragment).")] = 0,
    k: Annotated[int, typer.Option(min=1, help="Nearest neighbours for precision/recall manifolds.")] = 3,
    max_fragments: Annotated[Optional[int], typer.Option(min=1, help="Evaluate at most this many fragments.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Fragments per sampling/feature batch.")] = 32,
    fid_extractor: Annotated[str, typer.Option(help="Inception state-dict file, or pt_inception-2015-12-05 (download).")] = "pt_inception-2015-12-05",
    pr_extractor: Annotated[str, typer.Option(help="DINOv2 folder or hub id.")] = "facebook/dinov2-small",
    codec: Annotated[Optional[str], typer.Option(help="Codec name (default: the store's).")] = None,
    codec_source: Annotated[Optional[str], typer.Option(help="Codec folder/hub id/file (default: the one the store recorded).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache (default: STORE/cache/eval).")] = None,
    exclude_cells: Annotated[Optional[Path], typer.Option(
        help="Cells never to evaluate on: a text file of ids or a parquet with a grid_cell column (e.g. the official "
             "train_metadata.parquet of the published weights).")] = None,
    real_source: Annotated[Optional[str], typer.Option(
        help="Compare with the real thumbnails read from these Major TOM shards (as the paper), not the codec's "
             "reconstruction.")] = None,
    seamless: SeamlessOption = True,
    device: DeviceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Evaluate a model the COP-GEN-Beta way: FID, precision, recall, F-score per condition
    and generated modality (Table 1), plus PSNR/SSIM/MAE against the paired real fragment."""
    from majortom_gen.modalities import parse_modalities
    from majortom_gen.store import LatentStore
    from pipelines.evaluate import EvalOptions, parse_conditions

    if LatentStore.open(store).native:  # the native family: errors in physical units
        from majortom_gen.native import parse_band_groups
        from pipelines.native_evaluate import run_native_evaluate
        from pipelines.native_sample import NativeSampling

        native = conditions if conditions != "none,DEM,S1RTC,S2L1C,S2L2A" else "none,location+date,S2L2A+location+date"
        result = run_native_evaluate(
            model, store, out, conditions=native, real_source=real_source, split=split,
            max_cells=-(-max_fragments // 36) if max_fragments else None,
            generate=parse_band_groups(generate) if generate else None,
            options=NativeSampling(steps=steps, seed=seed, n_samples=n_samples, guidance=guidance, device=device or "cpu"),
            overwrite=overwrite)
        console.print(result["table"], highlight=False)
        return

    options = EvalOptions(conditions=parse_conditions(conditions), generate=parse_modalities(generate) if generate else None,
                          split=split, n_samples=n_samples, steps=steps, guidance=guidance,
                          seed=seed, k=k, max_fragments=max_fragments, batch_size=batch_size,
                          fid_extractor=fid_extractor, pr_extractor=pr_extractor, codec=codec, codec_source=codec_source,
                          cache_dir=str(cache_dir) if cache_dir else None, device=device,
                          exclude_cells=tuple(cells_file(exclude_cells, "--exclude-cells")) if exclude_cells else (),
                          real_source=real_source, seamless=seamless, overwrite=overwrite)
    try:
        run_evaluate(model, store, out, options)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None


