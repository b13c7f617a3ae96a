"""Published weights -> this project's network (CLI glue around :mod:`model.convert`).

The converted folder records, in ``training_data.json`` (:mod:`pipelines.model_folder`), the
codec the published weights need (the Stable Diffusion kl-f8 VAE, latents scaled by 0.18215;
encoder ``autoencoder_kl.pth``, decoder ``autoencoder_kl_ema.pth``), the official split rule
(:mod:`majortom_gen.splits`) and the training cells when the user gives them (the official
``train_metadata.parquet``); without them, evaluation warns that its test cells may have been
seen in training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from majortom_gen.splits import OFFICIAL_RATIO, OFFICIAL_RULE, OFFICIAL_SEED
from model.config import load_config
from model.convert import convert
from model.uvit import MultiModalUViT
from pipelines.model_folder import RECORD, sd_vae_record


def convert_published(checkpoint: str, out: str | os.PathLike, config: str = "release",
                      training_cells: Sequence[str] | None = None, command: str = "") -> MultiModalUViT:
    """Convert ``checkpoint`` with the network of ``config`` (modalities taken from it) and
    write its record (codec, split rule, ``training_cells`` or null)."""
    nnet = dict(load_config(config).nnet)
    modalities = tuple(nnet.pop("modalities", ("DEM", "S1RTC", "S2L1C", "S2L2A")))
    nnet.pop("mlp_ratio", None)
    net = convert(checkpoint, out, modalities=modalities, **nnet)
    record = {"converted_from": str(checkpoint), "config": str(config), "command": command, "codec": sd_vae_record(),
              "split": {"rule": OFFICIAL_RULE, "ratio": OFFICIAL_RATIO, "seed": OFFICIAL_SEED},
              "train_cells": sorted(training_cells) if training_cells else None}
    (Path(out) / RECORD).write_text(json.dumps(record, indent=1))
    return net
