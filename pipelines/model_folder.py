"""A model folder, what it records, and the check that it fits a latent store.

A model folder is a ``save_pretrained`` of :class:`model.uvit.MultiModalUViT`
(``config.json`` + ``diffusion_pytorch_model.safetensors``): ``train --out RUN`` writes one
in ``RUN/model``, ``convert-weights --out DIR`` in ``DIR``. Beside the weights,
``training_data.json`` records what the network was trained on:

- ``codec``: the codec whose latents it learned -- ``name`` and ``config_hash`` (the hash of
  the codec's config, per-modality normalisation and weights, as the store's manifest holds
  it) for a model trained here; for converted COP-GEN-Beta weights ``name: sd-vae``,
  ``config_hash: null`` and the normalisation ``latent_norm`` (scale 0.18215, no shift),
  since any copy of the Stable Diffusion kl-f8 encoder gives the same latents;
- ``train_cells``: the grid cells it was trained on (``null`` when unknown, e.g. the
  published weights; see :mod:`pipelines.official_split`).

Every command that runs a model on a store (sample, chain, generate, evaluate, fine-tuning)
goes through :func:`open_model_for_store`, which refuses a store whose latents come from
another codec (the network would turn them into garbage without a word) and says which
codec to ingest with. :class:`ModelOnStore` is what they hold afterwards: the model folder,
the store, the per-modality latent normalisation, the device and (opened on first use) the
codec that decodes the latents into pictures.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from majortom_gen.errors import MajorTomGenError
from majortom_gen.store import CODEC_DIR, LatentStore
from model.codecs import SD_SCALE_FACTOR, Codec, LatentNorm, latent_norms, moment_means

RECORD = "training_data.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class ModelCodecWarning(UserWarning):
    """A model does not record its codec (or its training cells), so a check cannot be made."""


def resolve_model_dir(path: str | os.PathLike, option: str = "--model") -> Path:
    """The model folder at ``path``, or at ``path/model`` for a ``train --out`` run folder.
    Raises a MajorTomGenError that says what was expected when neither holds a model."""
    given = Path(path)
    if not given.exists():
        raise MajorTomGenError(f"{option} {given} does not exist; give a model folder (`train --out RUN` writes "
                               "RUN/model, `convert-weights --out DIR` writes DIR)")
    for folder in (given, given / "model"):
        if (folder / "config.json").is_file():
            return _checked(folder, given, option)
    raise MajorTomGenError(f"{option} {given} is not a model folder: expected config.json and {WEIGHTS} in it (or in "
                           "its model/ subfolder, for a `train --out` run folder)")


def _checked(folder: Path, given: Path, option: str) -> Path:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise MajorTomGenError(f"{option} {given}: {folder / 'config.json'} is not readable JSON ({exc})") from None
    if config.get("_class_name") != "MultiModalUViT":
        raise MajorTomGenError(f"{option} {given}: {folder / 'config.json'} describes a {config.get('_class_name')!r}, "
                               "not a majortom-gen MultiModalUViT (convert published weights with convert-weights)")
    if not (folder / WEIGHTS).is_file():
        raise MajorTomGenError(f"{option} {given}: {folder} has config.json but no {WEIGHTS}")
    return folder


def model_record(model_dir: str | os.PathLike) -> dict:
    """``training_data.json`` of a model folder ({} when absent or unreadable)."""
    path = Path(model_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path} is not readable ({exc}); the model's codec and training cells are unknown",
                      ModelCodecWarning, stacklevel=2)
        return {}


def expected_codec(model_dir: str | os.PathLike) -> dict | None:
    """The codec record of the latents the model was trained on (see the module docstring)."""
    return model_record(model_dir).get("codec")


def sd_vae_record(encode: str = "autoencoder_kl.pth", decode: str = "autoencoder_kl_ema.pth") -> dict:
    """The codec that published COP-GEN-Beta weights expect: the Stable Diffusion kl-f8 VAE,
    latents scaled by 0.18215; the official pipeline encodes with ``encode`` and decodes with
    ``decode`` (the EMA weights)."""
    return {"name": "sd-vae", "config_hash": None,
            "latent_norm": {"shift": [0.0, 0.0, 0.0, 0.0], "scale": SD_SCALE_FACTOR},
            "encode_weights": encode, "decode_weights": decode}


def check_model_codec(model_dir: str | os.PathLike, store_codec: dict, store_dir: str | os.PathLike,
                      modalities: list[str] | tuple[str, ...]) -> None:
    """Raise a MajorTomGenError when the store's latents (``store_codec``: the manifest's
    record) are not those the model was trained on; warn when the model records no codec."""
    expected = expected_codec(model_dir)
    have = f"{store_codec['name']} ({str(store_codec.get('config_hash'))[:12]})"
    if not expected:
        warnings.warn(f"the model {model_dir} does not record which codec made its training latents; cannot check "
                      f"that the store's codec {have} is the right one", ModelCodecWarning, stacklevel=2)
        return
    if expected.get("config_hash"):
        if expected["config_hash"] == store_codec.get("config_hash"):
            return
        raise MajorTomGenError(
            f"the model {model_dir} was trained on latents of codec {expected['name']} "
            f"({expected['config_hash'][:12]}); the store {store_dir} holds latents of {have}. "
            f"Ingest the cells into a new store with the model's codec: {_ingest_hint(model_dir, expected)}")
    wanted = {m: _norm_dict(expected["latent_norm"]) for m in modalities}
    got = {m: n.as_dict() for m, n in latent_norms(store_codec, modalities).items()}
    if store_codec["name"] == expected["name"] and all(_close(wanted[m], got[m]) for m in modalities):
        return
    raise MajorTomGenError(
        f"the model {model_dir} expects latents of {expected['name']} scaled by {expected['latent_norm']['scale']} "
        f"(the Stable Diffusion kl-f8 VAE of the published weights); the store {store_dir} holds latents of {have}. "
        f"Ingest with `--codec {expected['name']} --codec-source <VAE>` (encoder: "
        f"{expected.get('encode_weights', 'the kl-f8 VAE')}; see the README, real data)")


def _norm_dict(d: dict) -> dict:
    return {"shift": [float(v) for v in d["shift"]], "scale": float(d["scale"])}


def _close(a: dict, b: dict) -> bool:
    return (abs(a["scale"] - b["scale"]) <= 1e-6 * abs(a["scale"])
            and len(a["shift"]) == len(b["shift"]) and all(abs(x - y) <= 1e-6 for x, y in zip(a["shift"], b["shift"])))


def _ingest_hint(model_dir: str | os.PathLike, expected: dict) -> str:
    from model.codecs import SHIPPED_CODEC

    shipped = SHIPPED_CODEC / "codec.json"
    if expected["name"] == "small-vae" and shipped.is_file():
        from model.codecs import load_codec

        if load_codec("small-vae", str(SHIPPED_CODEC)).info()["config_hash"] == expected["config_hash"]:
            return "`majortom-gen ingest ... --codec small-vae` (the shipped codec, the default)"
    store = model_record(model_dir).get("store")
    source = (f"{store}/{CODEC_DIR}" if store and Path(store, CODEC_DIR).is_dir()
              else "<the codec folder of the training store>")
    return f"`majortom-gen ingest ... --codec {expected['name']} --codec-source {source}`"


def open_model_for_store(model: str | os.PathLike, store_dir: str | os.PathLike, option: str = "--model") -> Path:
    """Resolve ``model`` (:func:`resolve_model_dir`) and check it against the store's codec
    (:func:`check_model_codec`); returns the model folder."""
    from model.uvit import MultiModalUViT

    model_dir = resolve_model_dir(model, option)
    store = LatentStore.open(store_dir)
    modalities = list(MultiModalUViT.load_config(model_dir)["modalities"])
    check_model_codec(model_dir, store.codec, store_dir, modalities)
    return model_dir


@dataclass
class ModelOnStore:
    """A model folder opened on a latent store, checked to fit it (:func:`open_model_for_store`).

    ``modalities``: the network's, in its order; ``norms``: per modality, the map between the
    codec's latents ``z`` and the network's ``x`` (from the store's codec record); ``device``:
    where the network runs (None: CUDA when available); ``codec_source``: the VAE for an sd-vae
    store (None: the codec kept with the store)."""

    model_dir: Path
    store_dir: Path
    store: LatentStore
    modalities: list[str]
    norms: dict[str, LatentNorm]
    device: str | None = None
    codec_source: str | None = None

    @classmethod
    def open(cls, model: str | os.PathLike, store_dir: str | os.PathLike, *, device: str | None = None,
             codec_source: str | None = None, option: str = "--model") -> "ModelOnStore":
        from model.uvit import MultiModalUViT

        model_dir = open_model_for_store(model, store_dir, option)
        modalities = list(MultiModalUViT.load_config(model_dir)["modalities"])
        store = LatentStore.open(store_dir)
        return cls(model_dir, Path(store_dir), store, modalities, latent_norms(store.codec, modalities), device,
                   codec_source)

    def check(self, modalities: Sequence[str], *, in_store: Sequence[str] = ()) -> None:
        """Refuse modalities the network does not model, or (``in_store``) the store lacks."""
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown:
            raise MajorTomGenError(f"the model does not know modality {unknown}; it models {self.modalities}")
        absent = [m for m in in_store if m not in self.store.modalities]
        if absent:
            raise MajorTomGenError(f"the store has no {absent}")

    def network_means(self, moments: torch.Tensor | np.ndarray, modality: str) -> torch.Tensor:
        """Stored moments ``(N, 8, 32, 32)`` -> the network's latents of their means ``(N, 4, 32, 32)``."""
        return self.norms[modality].to_network(moment_means(torch.as_tensor(moments).float()))

    @functools.cached_property
    def codec(self) -> Codec | None:
        """The codec that made the store's latents, on ``device`` (CPU by default); None for an
        sd-vae store without ``codec_source``."""
        from pipelines.codec import open_store_codec

        return open_store_codec(self.store_dir, self.codec_source, device=self.device or "cpu")

    def require_codec(self) -> Codec:
        from pipelines.codec import missing_codec

        if self.codec is None:
            raise missing_codec(self.store_dir, self.store.codec["name"])
        return self.codec

    def pictures(self, latents: torch.Tensor | np.ndarray, modality: str | None = None, *,
                 cells: Sequence[str] | None = None, frags: Sequence[int] | None = None,
                 samples: Sequence[int] | None = None) -> np.ndarray:
        """The network's latents of ``modality`` (the codec's own when None) -> uint8
        ``(N, 256, 256, 3)`` (:func:`pipelines.codec.decode_images`). Given the rows' ``cells``
        and ``frags`` (and ``samples``), whole cells are decoded as one canvas each
        (:func:`pipelines.codec.decode_fragments`: no seams at fragment borders)."""
        from pipelines.codec import decode_fragments, decode_images

        if cells is None or frags is None:
            return decode_images(self.require_codec(), latents, modality)
        return decode_fragments(self.require_codec(), latents, modality, cells, frags, samples)
