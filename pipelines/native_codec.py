"""A learned offline codec for a native band group: the small-vae architecture (a small kl-f8
``AutoencoderKL``, no attention) with the group's channels in and out and 8 latent channels,
trained on the group's patches in the official normalisation (:mod:`model.codec_training`).

``majortom-gen codec train --family native --group G --out DIR`` writes ``DIR/G/`` (model
files and ``codec.json``: the group's latent normalisation, the command, seed, cells and
steps); a folder of such group codecs is a codec set for ``ingest --family native --codec
small-vae --codec-source DIR`` (folders of other kinds, e.g. a patch-pca store's
``STORE/codec/<group>``, may sit beside them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from majortom_gen.errors import MajorTomGenError
from majortom_gen.native import from_model, get_band_group
from majortom_gen.selection import select
from majortom_gen.staging import swap_in
from pipelines.ingest import _decode_items
from pipelines.ingest_native import decode_native_task
from pipelines.train import hardware


def read_group_patches(source: str | os.PathLike, cells: Sequence[str], group: str) -> tuple[np.ndarray, list[str]]:
    """The group's patches of ``cells`` as model inputs, float32 ``(N, C, p, p)`` in [-1, 1],
    and the cells read (products that cannot be read are left out)."""
    g = get_band_group(group)
    selection = select(source, list(cells), (g.source,))
    parts, used = [], []
    for (modality, shard), items in _decode_items(selection, list(cells)).items():
        for cell, value in decode_native_task(modality, [g.name], shard, items).items():
            if not isinstance(value, str):
                parts.append(value[g.name])
                used.append(cell)
    if not parts:
        raise MajorTomGenError(f"no readable {g.source} product among the {len(cells)} cells for {g.name}")
    return np.concatenate(parts).astype(np.float32), sorted(used)


@dataclass
class NativeCodecResult:
    folder: Path
    patches: int
    seconds: float
    mae: float  # reconstruction error on the training patches, in the group's analysis unit
    unit: str


def reconstruction_error(codec, group: str, images: np.ndarray, batch: int = 32) -> float:
    """Mean absolute reconstruction error of model inputs ``images`` in physical units
    (metres, dB, reflectance) through ``codec`` (the posterior means)."""
    import torch

    from model.codecs import moment_means
    from pipelines.native_evaluate import physical_error

    g = get_band_group(group)
    errors = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch])
        rec = codec.decode(moment_means(codec.encode_moments(x))).numpy()
        errors.append(physical_error(g.name, from_model(g, rec), from_model(g, images[i:i + batch])))
    return float(np.mean(errors))


def train_native_codec(source: str | os.PathLike, cells: Sequence[str], group: str, out: str | os.PathLike, *,
                       config, command: str = "", progress: Callable[[int, int, float], None] | None = None,
                       overwrite: bool = False) -> NativeCodecResult:
    """Train the learned codec of ``group`` on the patches of ``cells`` and write it to
    ``out/<group>`` (whole or not at all; an existing one only with ``overwrite``)."""
    import torch

    from model.codec_training import native_vae_config, train_small_vae
    from model.codecs import Codec, fit_latent_norms
    from pipelines.native_evaluate import UNITS

    g = get_band_group(group)
    if g.is_scalar:
        raise MajorTomGenError(f"{g.name} is a scalar token: it has no codec")
    target = Path(out) / g.name
    if target.exists() and not overwrite:
        raise MajorTomGenError(f"{target} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    images, used = read_group_patches(source, cells, g.name)
    crop = min(config.crop, g.patch_px)
    config = replace(config, crop=crop - crop % 8)
    vae, losses = train_small_vae(images, config, vae_config=native_vae_config(g.img_channels), progress=progress)
    codec = Codec("small-vae", vae)
    codec.norms = fit_latent_norms(codec, {g.name: torch.from_numpy(images[::max(len(images) // 512, 1)])})
    mae = reconstruction_error(codec, g.name, images[::max(len(images) // 256, 1)])
    codec.provenance = {"command": command, "group": g.name, "cells": used, "patches": int(len(images)),
                        "config": config.as_dict(), "final_loss": losses[-1], "hardware": hardware(),
                        "reconstruction_mae": {"value": mae, "unit": UNITS[g.encoding], "on": "training patches"}}
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    codec.save(tmp)
    swap_in(tmp, target)
    return NativeCodecResult(target, int(len(images)), time.perf_counter() - start, mae, UNITS[g.encoding])
