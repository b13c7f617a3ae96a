"""Commands that make a model: train, convert published weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from majortom_gen.errors import MajorTomGenError
from pipelines.cli.common import (
    DeviceOption,
    app,
    cells_file,
    command_line,
    console,
    err_console,
    progress_bar,
    user_errors,
)


def run_train(config: str, store: Path, out: Path, options):
    """Train (``options``: :class:`pipelines.train.TrainOptions`) with a progress bar; training
    warnings (a damaged checkpoint skipped, a config changed on resume) are printed as one
    yellow line each."""
    import warnings

    from pipelines.train import TrainingWarning, train_on_store

    others = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TrainingWarning):
            err_console.print(Text.assemble(("warning: ", "bold yellow"), str(message)), highlight=False, soft_wrap=True)
        else:
            others(message, category, filename, lineno, file, line)

    with warnings.catch_warnings(), progress_bar("training", "steps") as update:
        warnings.showwarning = show
        warnings.simplefilter("always", TrainingWarning)

        def tick(step: int, total: int, loss: float) -> None:
            update(step, total, note=f"loss {loss:.4f}, ")

        try:
            result = train_on_store(config, store, out, options, progress=tick)
        except ValueError as exc:
            raise MajorTomGenError(str(exc)) from None
    last = f"last loss {result.last_loss:.4f}" if result.losses else "no step left to run"
    console.print(f"[green]trained[/] {result.steps} steps, {last}; EMA model -> {result.model_dir}; "
                  f"loss curve -> {out / 'loss.png'}", highlight=False)
    return result


@app.command()
@user_errors
def train(
    store: Annotated[Path, typer.Option(help="Latent store to train on (its training split).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, log, loss curve, final EMA model.")],
    config: Annotated[str, typer.Option(help="tiny, paper, release, or a YAML path.")] = "tiny",
    max_steps: Annotated[Optional[int], typer.Option(
        min=1, help="Stop after this many steps (default: the config's).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Resume from the last complete checkpoint in --out (refused on a store of another codec).")] = False,
    test_fraction: Annotated[float, typer.Option(help="Share of cells held out for testing (by grid cell, seeded).")] = 0.05,
    init_from: Annotated[Optional[Path], typer.Option(
        help="Start from this model's weights (fine-tuning; same network config), e.g. the shipped demo model.")] = None,
    device: DeviceOption = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(
        min=1, help="Keep the newest N checkpoints, deleting older ones (default: the config's, 3).")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option(
        help="no, fp16 or bf16 (default: the config's). bf16 is faster on GPUs and on CPUs with AVX512-BF16 or "
             "AMX (1.4x measured on 2 AMD EPYC cores); elsewhere on a CPU it is slower.")] = None,
) -> None:
    """Train the multimodal U-ViT on a latent store (accelerate; GPU when present)."""
    from pipelines.train import TrainOptions

    command = command_line("train", config=config, store=store, out=out, max_steps=max_steps, resume=resume,
                           test_fraction=test_fraction, init_from=init_from, device=device,
                           keep_checkpoints=keep_checkpoints, mixed_precision=mixed_precision)
    run_train(config, store, out, TrainOptions(max_steps=max_steps, resume=resume, test_fraction=test_fraction,
                                               device=device, init_from=init_from, command=command,
                                               keep_checkpoints=keep_checkpoints, mixed_precision=mixed_precision))


@app.command("convert-weights")
@user_errors
def convert_weights(
    out: Annotated[Path, typer.Option(help="Folder for the converted model (save_pretrained).")],
    family: Annotated[str, typer.Option(
        help="beta: COP-GEN-Beta (thumbnails, mespinosami/COP-GEN-Beta); copgen: COP-GEN (native bands, "
             "mespinosami/copgen-base).")] = "beta",
    checkpoint: Annotated[Optional[str], typer.Option(
        help="Checkpoint path, or hub 'repo:file' (default: the family's published one).")] = None,
    config: Annotated[Optional[str], typer.Option(
        help="Network config the checkpoint was trained with (default: release / copgen-base).")] = None,
    vaes: Annotated[Optional[str], typer.Option(
        help="copgen: also convert the band-group VAEs, from a local copy of mespinosami/copgen-vaes or that hub "
             "id, into OUT/codecs/<group>.")] = None,
    training_cells: Annotated[Optional[Path], typer.Option(
        help="The cells the weights were trained on: the official train_metadata.parquet (grid_cell column) or a "
             "text file of ids; recorded so that evaluate leaves them out.")] = None,
) -> None:
    """Convert published weights into this project's network: COP-GEN-Beta (the folder records
    the codec they need, sd-vae at scale 0.18215, and with --training-cells the cells they were
    trained on) or COP-GEN (the network, and with --vaes each band group's VAE as a codec)."""
    from majortom_gen.native import NETWORK_HUB_FILE
    from pipelines.weights import convert_cop_gen, convert_published

    if family not in ("beta", "copgen"):
        raise MajorTomGenError(f"--family must be beta or copgen, got {family!r}")
    if vaes is not None and family != "copgen":
        raise MajorTomGenError("--vaes goes with --family copgen (COP-GEN-Beta uses one sd-vae)")
    cells = cells_file(training_cells, "--training-cells") if training_cells else None
    command = command_line("convert-weights", out=out, family=family, checkpoint=checkpoint, config=config, vaes=vaes,
                           training_cells=training_cells)
    try:
        if family == "copgen":
            net = convert_cop_gen(checkpoint or NETWORK_HUB_FILE, out, config or "copgen-base", vaes=vaes,
                                  command=command)
        else:
            net = convert_published(checkpoint or "mespinosami/COP-GEN-Beta:nnet_ema_114000.pth", out,
                                    config or "release", training_cells=cells, command=command)
    except ValueError as exc:
        raise MajorTomGenError(str(exc)) from None
    n = sum(p.numel() for p in net.parameters())
    console.print(f"[green]converted[/] {n / 1e6:.1f} M parameters, modalities {net.modalities} -> {out}", highlight=False)
    if cells is None and family == "beta":
        console.print("[yellow]training cells unknown[/]: the published split cannot be recomputed (see the README, "
                      "real data); pass --training-cells train_metadata.parquet, or --exclude-cells to evaluate",
                      highlight=False)


