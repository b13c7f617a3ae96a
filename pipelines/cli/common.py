"""What every command shares: the app and its command groups, error handling (a user
mistake ends with one red line on stderr and exit code 2, no traceback), progress bars,
the options used by several commands and the command line recorded in outputs."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from majortom_gen.errors import MajorTomGenError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Generative modelling of Copernicus data on the Major TOM grid.")
grid_app = typer.Typer(no_args_is_help=True, help="The Major TOM grid: locate points, list the cells of a region.")
store_app = typer.Typer(no_args_is_help=True, help="The grid-indexed latent store.")
codec_app = typer.Typer(no_args_is_help=True, help="The learned offline codec: train one, measure one.")
dataset_app = typer.Typer(no_args_is_help=True, help="Training sets by grid id: split subsets of a store, HF datasets export.")
app.add_typer(grid_app, name="grid")
app.add_typer(store_app, name="store")
app.add_typer(codec_app, name="codec")
app.add_typer(dataset_app, name="dataset")
console = Console()
err_console = Console(stderr=True)
EXIT_COMPLETED_WITH_ERRORS = 3  # a batch job that finished but isolated some items


MODEL_EXTRA = ("torch", "diffusers", "accelerate", "scipy", "torchmetrics", "transformers")  # pyproject's [model]


def missing_model_extra(module: str) -> str:
    return (f"this command needs the model side of majortom-gen ({module} is not installed): "
            "pip install 'majortom-gen[model]' (with the PyTorch build for your machine, e.g. torch==2.13.0 for CPU)")


def user_errors(fn):
    """Turn MajorTomGenError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in MODEL_EXTRA:
                raise
            err_console.print(Text.assemble(("error: ", "bold red"), missing_model_extra(exc.name)), highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2) from None
        except (MajorTomGenError, OSError) as exc:  # OSError: unwritable --out, full disk, ...
            err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def cells_from_options(cells: list[str] | None, region: str | None) -> list[str]:
    from majortom_gen.selection import cells_from

    return cells_from(cells, region)


def cells_file(path: Path, option: str) -> list[str]:
    """The cell ids of a file given to ``option`` (see :func:`majortom_gen.selection.parse_cell_list`)."""
    from majortom_gen.selection import parse_cell_list

    if not path.is_file():
        raise MajorTomGenError(f"{option} {path}: no such file")
    return parse_cell_list([str(path)])


CellsOption = Annotated[Optional[list[str]], typer.Option(
    help="Cell ids: --cells 501U_60R 502U_60R, comma-separated, or a text/CSV file of ids.")]
RegionOption = Annotated[Optional[str], typer.Option(help="Vector file, WKT polygon or bbox 'west,south,east,north'.")]


@contextmanager
def progress_bar(description: str, unit: str, total: int | None = None):
    """A rich progress bar; yields ``update(done, total=None, note='')`` showing ``unit``/s."""
    start = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")

        def update(done: int, total: int | None = None, note: str = "") -> None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            progress.update(task, completed=done, total=total if total is not None else progress.tasks[task].total,
                            rate=f"{note}{rate:.2f} {unit}/s")

        yield update


def command_line(command: str, **options) -> str:
    """The command with the options it ran with (recorded in what it makes): ``None`` options
    are left out, ``True`` flags written bare, lists joined by commas."""
    parts = [f"majortom-gen {command}"]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    return " ".join(parts)


ReflectanceOption = Annotated[bool, typer.Option(
    help="Also write generated S2 fragments as approximate reflectance (inverted thumbnail, below saturation only).")]
CodecSourceOption = Annotated[Optional[str], typer.Option(
    help="Decode with this VAE (hub id, folder or .pth; ENCODE,DECODE for other decoder weights, official: "
         "autoencoder_kl.pth,autoencoder_kl_ema.pth) instead of the codec the store recorded at ingest; it must have "
         "the store's encoder.")]
WorkersOption = Annotated[Optional[int], typer.Option(
    min=0, help="Sampling workers on a local Dask cluster (default: one per GPU when there are several, else in-process).")]
SeamlessOption = Annotated[bool, typer.Option(
    help="Generate each cell whose 16 fragments are all requested as one canvas of overlapping windows, so fragments "
         "agree at their borders (about 1.6-1.8x the time); --no-seamless: every fragment on its own.")]


def _device_option(value: str | None) -> str | None:
    """Refuse a device torch cannot use (``cuda``/``cuda:N`` without CUDA, ``mps`` without
    MPS, an unknown name) before any work; ``train`` applies its stricter rule itself."""
    if value is None:
        return value
    from pipelines.sample import device_problem

    problem = device_problem(value)
    if problem:
        raise typer.BadParameter(problem)
    return value


GuidanceOption = Annotated[float, typer.Option(
    min=0.0, help="Classifier-free guidance weight on the conditions (0: none): samples follow the conditions more "
                  "closely, at one more network call on each of the noisier steps.")]
DeviceOption = Annotated[Optional[str], typer.Option(callback=_device_option,
                                                     help="cpu or cuda (default: cuda when available).")]
OverwriteOption = Annotated[bool, typer.Option(
    help="Replace --out when it holds an earlier output of majortom-gen (never a folder it did not write).")]



