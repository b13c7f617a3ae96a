"""Published weights -> this project's network (CLI glue around :mod:`model.convert`).

The converted folder records, in ``training_data.json`` (:mod:`pipelines.model_folder`), the
codec the published weights need (the Stable Diffusion kl-f8 VAE, latents scaled by 0.18215;
encoder ``autoencoder_kl.pth``, decoder ``autoencoder_kl_ema.pth``), the official split rule
(:mod:`majortom_gen.splits`) and the training cells when the user gives them (the official
``train_metadata.parquet``); without them, evaluation warns that its test cells may have been
seen in training.

COP-GEN (the native family, ``--family copgen``): the network of ``configs/copgen-base.yaml``
from ``mespinosami/copgen-base``, and, with ``vaes``, each image band group's VAE from
``mespinosami/copgen-vaes`` converted to a codec folder ``codecs/<group>/`` beside it; the
record lists the group codecs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from majortom_gen.splits import OFFICIAL_RATIO, OFFICIAL_RULE, OFFICIAL_SEED
from model.config import load_config
from majortom_gen.native import VAE_HUB_REPO as VAE_HUB
from majortom_gen.native import get_band_group
from model.codecs import from_cop_gen_vae
from model.convert import convert, from_cop_gen, load_checkpoint
from model.uvit import MultiModalUViT
from pipelines.model_folder import RECORD, sd_vae_record


def convert_published(checkpoint: str, out: str | os.PathLike, config: str = "release",
                      training_cells: Sequence[str] | None = None, command: str = "") -> MultiModalUViT:
    """Convert ``checkpoint`` with the network of ``config`` (modalities taken from it) and
    write its record (codec, split rule, ``training_cells`` or null)."""
    nnet = dict(load_config(config).nnet)
    modalities = tuple(nnet.pop("modalities", ("DEM", "S1RTC", "S2L1C", "S2L2A")))
    net = convert(checkpoint, out, modalities=modalities, **nnet)
    record = {"converted_from": str(checkpoint), "config": str(config), "command": command, "codec": sd_vae_record(),
              "split": {"rule": OFFICIAL_RULE, "ratio": OFFICIAL_RATIO, "seed": OFFICIAL_SEED},
              "train_cells": sorted(training_cells) if training_cells else None}
    (Path(out) / RECORD).write_text(json.dumps(record, indent=1))
    return net


def convert_cop_gen(checkpoint: str, out: str | os.PathLike, config: str = "copgen-base", vaes: str | None = None,
                    command: str = "", vae_channels: int = 128) -> MultiModalUViT:
    """Convert a COP-GEN checkpoint (a ``.pth`` file or hub ``repo:file``) with the network of
    ``config`` (its modalities must be native band groups, in the checkpoint's order) to
    ``out``; with ``vaes`` (a local copy of ``mespinosami/copgen-vaes`` or that hub id),
    convert the VAE of every image group to ``out/codecs/<group>``. ``vae_channels``: the
    VAEs' base width (``ch``; 128 for the published ones)."""
    nnet = dict(load_config(config).nnet)
    groups = [get_band_group(m) for m in nnet["modalities"]]  # refuses names that are no band group
    patch = nnet["patch_size"]
    specs = {g.name: g.network_spec(patch[g.name] if isinstance(patch, dict) else patch) for g in groups}
    net = from_cop_gen(load_checkpoint(checkpoint), specs, embed_dim=nnet["embed_dim"], depth=nnet["depth"],
                       num_heads=nnet["num_heads"], mlp_ratio=nnet.get("mlp_ratio", 4.0),
                       qkv_bias=nnet.get("qkv_bias", False), mlp_time_embed=nnet.get("mlp_time_embed", False),
                       prediction=nnet.get("prediction", "epsilon"))
    out = Path(out)
    net.save_pretrained(out)
    codecs = {}
    for g in groups:
        if g.is_scalar or vaes is None:
            continue
        local = Path(vaes) / g.vae_file
        source = str(local) if Path(vaes).is_dir() else f"{vaes}:{g.vae_file}"
        codec = from_cop_gen_vae(source, {**g.vae_ddconfig(), "ch": vae_channels}, g.vae_scale_factor)
        codec.save(out / "codecs" / g.name)
        codecs[g.name] = {"folder": f"codecs/{g.name}", "source": source, "config_hash": codec.info()["config_hash"]}
    record = {"converted_from": str(checkpoint), "config": str(config), "command": command, "family": "native",
              "codec": {"name": "cop-gen-vae", "per_modality": codecs or None,
                        "hub": {g.name: f"{VAE_HUB}:{g.vae_file}" for g in groups if not g.is_scalar}},
              "train_cells": None}
    (out / RECORD).write_text(json.dumps(record, indent=1))
    return net
