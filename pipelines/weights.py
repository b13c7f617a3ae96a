"""Published weights -> this project's network (CLI glue around :mod:`model.convert`)."""

from __future__ import annotations

import os

from model.config import load_config
from model.convert import convert
from model.uvit import MultiModalUViT


def convert_published(checkpoint: str, out: str | os.PathLike, config: str = "release") -> MultiModalUViT:
    """Convert ``checkpoint`` with the network of ``config`` (modalities taken from it)."""
    nnet = dict(load_config(config).nnet)
    modalities = tuple(nnet.pop("modalities", ("DEM", "S1RTC", "S2L1C", "S2L2A")))
    nnet.pop("mlp_ratio", None)
    return convert(checkpoint, out, modalities=modalities, **nnet)
