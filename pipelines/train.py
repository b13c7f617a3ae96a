"""Train the multimodal U-ViT on a latent store: the bridge between the store (geography
side) and :mod:`model.train` (tensors only)."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from majortom_gen.errors import MajorTomGenError
from majortom_gen.staging import write_text_atomic
from majortom_gen.native import get_band_group
from majortom_gen.store import LatentStore, load_aligned
from model.codecs import latent_norms
from model.config import load_config
from pipelines.model_folder import model_record, open_model_for_store
from pipelines.native_scalars import scalar_moments
from model.train import (  # noqa: F401 (the demo's model and the warning class, for the CLI)
    SHIPPED_DEMO_MODEL,
    TrainingWarning,
    TrainResult,
    check_device,
    check_max_steps,
    checkpoint_state,
    train,
)


@dataclass(frozen=True)
class TrainOptions:
    """How to train on a store: ``max_steps`` (None: the config's); ``resume`` from the last
    complete checkpoint in ``out``; the split (``test_fraction`` of the cells held out, by
    ``split_seed``); ``device`` (None: CUDA when available); ``init_from``: a model folder to
    start from (fine-tuning); ``keep_checkpoints`` (None: the config's); ``mixed_precision``:
    no | fp16 | bf16 (None: the config's; bf16 also speeds up CPUs with AVX512-BF16 or AMX);
    ``command``: the command line, recorded with the model."""

    max_steps: int | None = None
    resume: bool = False
    test_fraction: float = 0.05
    split_seed: int = 0
    device: str | None = None
    init_from: str | os.PathLike | None = None
    keep_checkpoints: int | None = None
    mixed_precision: str | None = None
    command: str = ""


def train_on_store(config: str | os.PathLike, store_dir: str | os.PathLike, out: str | os.PathLike,
                   options: TrainOptions = TrainOptions(),
                   progress: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train on the store's training split (:class:`TrainOptions`). The model folder records the
    store, codec, split, command, the hardware, the step a resume started from and the config
    changes of the run's resumes in ``training_data.json``.

    Every checkpoint records the store's codec (``data.codec`` in its ``state.json``): a
    resume on a store of another codec is refused."""
    start = time.perf_counter()
    if options.max_steps is not None:
        check_max_steps(options.max_steps)
    check_device(options.device)
    cfg = load_config(config)
    if options.keep_checkpoints is not None:
        cfg = cfg.with_train(keep_checkpoints=options.keep_checkpoints)
    if options.mixed_precision is not None:
        cfg = cfg.with_train(mixed_precision=options.mixed_precision)
    check_run_folder(out, inputs=(store_dir, options.init_from))
    store = LatentStore.open(store_dir)
    if options.resume:
        check_resume_codec(out, store.codec, store_dir)
    init_from = (open_model_for_store(options.init_from, store_dir, option="--init-from")
                 if options.init_from is not None else None)
    inherited = _inherited_cells(Path(out), options.resume, init_from)
    modalities = list(cfg.nnet.get("modalities", store.modalities))
    native = store.native
    scalars = [m for m in modalities if native and m not in store.modalities and get_band_group(m).is_scalar]
    stored = [m for m in modalities if m not in scalars]
    arrays = load_aligned(store, stored, split="train", test_fraction=options.test_fraction, seed=options.split_seed,
                          cache=True)
    if len(arrays) == 0:
        raise MajorTomGenError(f"{store_dir}: no training fragment has all of {stored}")
    for m in scalars:  # location and date tokens: from each patch's place and its products' dates
        arrays.moments[m] = scalar_moments(store, m, arrays.grid_cell, arrays.fragment_index)

    def record(folder: Path, result: TrainResult) -> None:
        meta = {"store": str(Path(store_dir).resolve()), "codec": store.codec, "test_fraction": options.test_fraction,
                "split_seed": options.split_seed, "train_fragments": len(arrays),
                "train_cells": sorted(set(arrays.grid_cell.tolist()) | set(inherited or [])),
                "train_cells_complete": inherited is not None, "config": str(config), "steps": result.steps,
                "resumed_from": result.resumed_from, "config_changes": result.config_changes,
                "seconds": round(time.perf_counter() - start, 1),
                "init_from": str(init_from) if init_from is not None else None, "command": options.command,
                "hardware": hardware()}
        write_text_atomic(folder / "training_data.json", json.dumps(meta, indent=1))

    result = train(cfg, arrays.moments, out, norms=latent_norms(store.codec, modalities), max_steps=options.max_steps,
                   resume=options.resume, progress=progress, device=options.device, init_from=init_from,
                   on_checkpoint=None if native else _sample_grid_callback(store, Path(store_dir), Path(out) / "samples",
                                                                            cfg.sample.steps),
                   data={"codec": _codec_id(store.codec)}, finish_model=record)
    plot_losses(Path(out) / "log.jsonl", Path(out) / "loss.png")
    return result


def _inherited_cells(out: Path, resume: bool, init_from: Path | None) -> list[str] | None:
    """The cells earlier weights saw: a resumed run's (the cells of every invocation count) and
    a fine-tuned model's; None when some are unknown."""
    def known_cells(record: dict) -> list[str] | None:
        complete = record.get("train_cells_complete", not record.get("init_from"))
        return list(record["train_cells"]) if record.get("train_cells") is not None and complete else None

    inherited: list[str] | None = []
    earlier = out / "model" / "training_data.json"
    if resume and earlier.is_file():
        inherited = known_cells(json.loads(earlier.read_text()))
    if init_from is not None:
        start_cells = known_cells(model_record(init_from))
        inherited = None if start_cells is None or inherited is None else inherited + start_cells
    return inherited


def check_run_folder(out: str | os.PathLike, inputs=()) -> None:
    """Refuse a ``train --out`` that would overwrite what is not a training run: the working
    directory or a parent of it, an input (the store, the starting model) or a folder holding
    one, or an existing non-empty folder with neither ``checkpoints/`` nor ``log.jsonl``."""
    from majortom_gen.staging import OutputError, check_output, check_place

    path = Path(out).expanduser().resolve()
    if path.is_dir() and any(path.iterdir()):  # only a run to resume
        if not ((path / "checkpoints").is_dir() or (path / "log.jsonl").is_file()):
            raise OutputError(f"--out {out} holds files that are not a majortom-gen training run; nothing was "
                              "changed. Give a new folder (or the folder of the run to resume).")
        check_place(out, inputs=inputs)
    else:
        check_output(out, inputs=inputs)


def _codec_id(codec: dict) -> dict:
    """What identifies a codec: its name and config hash (as the store's manifest holds them)."""
    return {"name": codec["name"], "config_hash": codec["config_hash"]}


def _codec_text(codec: dict) -> str:
    return f"{codec['name']} ({str(codec['config_hash'])[:12]})"


def check_resume_codec(out: str | os.PathLike, store_codec: dict, store_dir: str | os.PathLike) -> None:
    """Refuse to resume the run in ``out`` on latents of another codec than the one its
    checkpoints record (a run from before codecs were recorded resumes with a warning)."""
    state = checkpoint_state(out)
    if state is None:
        return
    recorded = (state.get("data") or {}).get("codec")
    if recorded is None:
        warnings.warn(f"{out}: its checkpoints do not record the codec of their latents; cannot check that the store's "
                      f"codec {_codec_text(store_codec)} is the run's", TrainingWarning, stacklevel=2)
        return
    if _codec_id(recorded) != _codec_id(store_codec):
        raise MajorTomGenError(
            f"{out}: the run was trained on latents of codec {_codec_text(recorded)}; the store {store_dir} holds "
            f"latents of codec {_codec_text(store_codec)}. Resume on a store made with the run's codec, or start a "
            "new run (another --out)")


def hardware() -> dict:
    """What a run ran on: platform, CPU count, torch, accelerator."""
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": gpu}


def _sample_grid_callback(store: LatentStore, store_dir: Path, folder: Path, steps: int):
    """At each checkpoint: 4 joint samples of every modality, decoded with the store's
    codec, as ``samples/step-NNNNNN.png`` (rows: samples; columns: modalities). Only when
    the codec can be loaded offline (stored with the store)."""
    from pipelines.codec import decode_images, open_store_codec

    codec = open_store_codec(store_dir)
    if codec is None:
        return None
    import numpy as np
    from PIL import Image

    from model.sample import generate

    def draw(step: int, net) -> None:
        out = generate(net, {}, net.modalities, n_samples=4, steps=min(steps, 25), seed=0)
        tiles = [decode_images(codec, out[m].float().cpu(), m) for m in net.modalities]
        rows = [np.concatenate([t[i][::2, ::2] for t in tiles], axis=1) for i in range(4)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(folder / f"step-{step:06d}.png")

    return draw


def plot_losses(log: Path, png: Path) -> Path:
    """The loss curve (total and per modality) of a training log, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="total", color="black")
    for key in sorted(k for k in rows[0] if k.startswith("loss_")):
        ax.plot(steps, [r[key] for r in rows], label=key.removeprefix("loss_"), alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE of the predicted noise or v)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
