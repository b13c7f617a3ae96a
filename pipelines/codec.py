"""Codecs in the pipelines: the codec of a store, latents to pictures, and the learned offline
codec (train it on the thumbnails of a Major TOM source -- the synthetic world for the
shipped one -- and measure it).

``open_store_codec`` opens the codec that made a store's latents; ``decode_images`` is the one
way latents become 8-bit pictures.

``train_codec`` reads the fragments of the chosen cells (every modality), trains a small
``AutoencoderKL`` (:mod:`model.codec_training`), fits one latent normalisation per modality
(:class:`model.codecs.LatentNorm`) and writes a codec folder: the diffusers model files plus
``codec.json`` with the name, the normalisations and how it was made (command, seed, cells,
source, settings, the loss curve's last values and the reconstruction PSNR per modality).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from majortom_gen.errors import MajorTomGenError
from majortom_gen.fragments import from_unit_range, to_unit_range
from majortom_gen.modalities import MODALITY_NAMES
from majortom_gen.selection import select
from majortom_gen.staging import check_output, staged_folder
from model.codec_training import CodecTrainConfig, DecoderTuneConfig, train_small_vae, tune_decoder
from majortom_gen.store import LatentStore
from model.codecs import Codec, fit_latent_norms, load_codec, moment_means, reconstruction_psnr
from pipelines.cell_canvas import canvas_groups, tile, untile
from pipelines.ingest import read_fragments

PSNR_FRAGMENTS = 64  # per modality: the reconstruction PSNR recorded with a trained codec
DECODE_BATCH = 64  # latents decoded per call


def open_store_codec(store_dir: str | os.PathLike, source: str | None = None, device: str = "cpu") -> Codec | None:
    """The codec that made a store's latents, checked against the store's record: the one at
    ``source`` (an sd-vae's hub id, folder or state-dict file, or ENCODE,DECODE to decode with
    other weights), else where the store says it is (:attr:`LatentStore.codec_source`: its own
    copy in ``STORE/codec`` for small-vae and patch-pca, the recorded source for sd-vae). None
    when it cannot be had (an sd-vae store made before sources were recorded)."""
    store = LatentStore.open(store_dir)
    name = store.codec["name"]
    source = source or store.codec_source
    if source is None:
        return None
    codec = load_codec(name, source, device=device)
    if codec.info()["config_hash"] != store.codec["config_hash"]:
        raise MajorTomGenError(f"codec {source} ({codec.info()['config_hash'][:12]}) is not the one that made the store's "
                               f"latents ({store.codec['config_hash'][:12]})")
    return codec


def missing_codec(store_dir: str | os.PathLike, name: str) -> MajorTomGenError:
    """The error of a store whose codec cannot be had offline (sd-vae without a source)."""
    return MajorTomGenError(f"{store_dir}: the store's latents were made by {name}; pass --codec-source (the same "
                            "VAE: hub id, folder or .pth) to decode them")


def require_store_codec(store_dir: str | os.PathLike, source: str | None = None, device: str = "cpu") -> Codec:
    """:func:`open_store_codec`, or the :func:`missing_codec` error."""
    codec = open_store_codec(store_dir, source, device)
    if codec is None:
        raise missing_codec(store_dir, LatentStore.open(store_dir).codec["name"])
    return codec


def decode_images(codec: Codec, latents: torch.Tensor | np.ndarray, modality: str | None = None,
                  batch: int = DECODE_BATCH) -> np.ndarray:
    """Latents ``(N, 4, 32, 32)`` -> uint8 RGB pictures ``(N, 256, 256, 3)``, decoded in
    batches: the network's latents of ``modality`` when it is given, else the codec's own."""
    x = torch.as_tensor(np.asarray(latents, np.float32) if isinstance(latents, np.ndarray) else latents).float()
    if len(x) == 0:
        return np.zeros((0, 256, 256, 3), np.uint8)

    def one(part: torch.Tensor) -> torch.Tensor:
        return codec.decode(part) if modality is None else codec.decode_network(part, modality)

    return np.concatenate([from_unit_range(one(x[i:i + batch]).numpy()) for i in range(0, len(x), batch)])


def decode_fragments(codec: Codec, latents: torch.Tensor | np.ndarray, modality: str | None, cells: Sequence[str],
                     frags: Sequence[int], samples: Sequence[int] | None = None) -> np.ndarray:
    """Like :func:`decode_images` for rows that are fragments (``cells[i]``, ``frags[i]``,
    ``samples[i]``) of latents generated on cell canvases: the 16 fragments of a complete
    (cell, sample) are decoded together, in one call, so no fragment border shows (decoded one
    by one, each fragment's edges are decoded without what lies beyond them); the other rows
    one by one. uint8 ``(N, 256, 256, 3)`` in row order. (Decoding overlapping fragment-sized
    windows merged with pyramid weights was measured too: more contrast, but the decoder's
    group norms differ from window to window and leave soft colour blotches.)"""
    x = torch.as_tensor(np.asarray(latents, np.float32) if isinstance(latents, np.ndarray) else latents).float()
    out = np.zeros((len(x), 256, 256, 3), np.uint8)
    groups, rest = canvas_groups(cells, frags, samples)
    for rows in groups:  # one canvas (1, C, 128, 128) at a time, decoded whole
        canvas = tile(x[rows])
        decoded = codec.decode(canvas) if modality is None else codec.decode_network(canvas, modality)
        out[rows] = from_unit_range(untile(decoded).numpy())
    if rest:
        out[rest] = decode_images(codec, x[rest], modality)
    return out


@dataclass
class CodecResult:
    folder: Path
    fragments: dict[str, int]
    psnr_db: dict[str, float]
    seconds: float


def source_fragments(source: str | os.PathLike, cells: Sequence[str],
                     modalities: Sequence[str] = MODALITY_NAMES) -> dict[str, np.ndarray]:
    """Every readable thumbnail fragment of ``cells`` under ``source``: ``{modality: uint8
    (n, 256, 256, 3)}`` in cell order."""
    selection = select(source, list(cells), tuple(modalities))
    frags = read_fragments(selection, list(cells))
    out = {m: np.concatenate([frags[m][c] for c in sorted(frags[m])]) for m in modalities if frags.get(m)}
    if not out:
        raise MajorTomGenError(f"{source}: no readable thumbnail among the {len(cells)} cells")
    return out


def psnr_by_modality(codec: Codec, images: dict[str, np.ndarray]) -> dict[str, float]:
    """Reconstruction PSNR (dB, 0..255 scale; decode of the mean latent) per modality."""
    return {m: round(reconstruction_psnr(codec, torch.from_numpy(to_unit_range(a))), 2) for m, a in images.items()}


def train_codec(source: str | os.PathLike, cells: Sequence[str], out: str | os.PathLike, *,
                config: CodecTrainConfig = CodecTrainConfig(), command: str = "",
                progress: Callable[[int, int, float], None] | None = None, overwrite: bool = False) -> CodecResult:
    """Train the small-vae codec on the fragments of ``cells`` and write it to ``out``
    (staged: complete or absent)."""
    start = time.perf_counter()
    if config.crop % 8 or config.crop < 8:
        raise MajorTomGenError(f"--crop {config.crop} must be a multiple of 8 (the codec downsamples by 8)")
    inputs = (source,) if Path(str(source)).exists() else ()
    check_output(out, overwrite=overwrite, inputs=inputs)
    images = source_fragments(source, cells)
    pool = np.concatenate(list(images.values()))
    vae, losses = train_small_vae(pool, config, progress=progress)
    del pool
    codec = Codec("small-vae", vae)
    codec.norms = fit_latent_norms(codec, {m: torch.from_numpy(to_unit_range(a)) for m, a in images.items()})
    psnr = psnr_by_modality(codec, {m: a[:PSNR_FRAGMENTS] for m, a in images.items()})
    codec.provenance = {
        "command": command, "source": str(source), "cells": sorted(cells),
        "fragments": {m: int(len(a)) for m, a in images.items()}, "train": config.as_dict(),
        "final_loss": float(np.mean(losses[-50:])), "train_psnr_db": psnr, "psnr_fragments": PSNR_FRAGMENTS,
        "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with staged_folder(out, overwrite=overwrite, inputs=inputs, kind="codec train") as tmp:
        codec.save(tmp)
    return CodecResult(Path(out), {m: len(a) for m, a in images.items()}, psnr, time.perf_counter() - start)


def tune_codec_decoder(codec_dir: str | os.PathLike, source: str | os.PathLike, cells: Sequence[str],
                       out: str | os.PathLike, *, config: DecoderTuneConfig = DecoderTuneConfig(), command: str = "",
                       progress: Callable[[int, int, float], None] | None = None, psnr_fragments: int = 16,
                       overwrite: bool = False) -> CodecResult:
    """Write ``out``: the small-vae codec at ``codec_dir`` ('small-vae': the shipped one) with
    its decoder fine-tuned on noisy latents of the fragments of ``cells``
    (:func:`model.codec_training.tune_decoder`). The encoder, the normalisations and the
    codec's identity (its hash: what stores and models record) are unchanged, so stores made
    with the codec decode with the new decoder. ``codec.json`` records how the decoder was made
    and the reconstruction PSNR per modality (on its first ``psnr_fragments`` fragments) of
    clean latents and of latents with noise of std ``config.latent_noise / 2`` (network units),
    before and after."""
    start = time.perf_counter()
    codec = open_codec(str(codec_dir))
    if codec.name != "small-vae":
        raise MajorTomGenError(f"{codec_dir}: a {codec.name} codec; tune-decoder tunes small-vae codecs")
    if config.crop % 8 or config.crop < 8:
        raise MajorTomGenError(f"--crop {config.crop} must be a multiple of 8 (the codec downsamples by 8)")
    inputs = tuple(p for p in (source, codec_dir) if Path(str(p)).exists())
    check_output(out, overwrite=overwrite, inputs=inputs)
    images = source_fragments(source, cells)
    pool = np.concatenate(list(images.values()))
    scales = np.concatenate([np.full(len(a), codec.norm(m).scale, np.float32) for m, a in images.items()])
    measured = {m: a[:psnr_fragments] for m, a in images.items()}
    before = _decoder_psnr(codec, measured, config.latent_noise / 2, config.seed)
    start_from = codec.decoder if codec.decoder is not None else codec.model  # an earlier tuning goes on
    tuned, losses = tune_decoder(start_from, pool, scales, config, progress=progress)
    del pool
    codec.decoder = tuned
    after = _decoder_psnr(codec, measured, config.latent_noise / 2, config.seed)
    codec.decoder_record = {
        "command": command, "source": str(source), "cells": sorted(cells),
        "fragments": {m: int(len(a)) for m, a in images.items()}, "tune": config.as_dict(),
        "final_loss": float(np.mean(losses[-50:])), "psnr_fragments": psnr_fragments,
        "psnr_db": {"clean latents": {"before": before[0], "after": after[0]},
                    f"latents + noise std {config.latent_noise / 2:g}": {"before": before[1], "after": after[1]}},
        "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with staged_folder(out, overwrite=overwrite, inputs=inputs, kind="codec tune-decoder") as tmp:
        codec.save(tmp)
    return CodecResult(Path(out), {m: len(a) for m, a in images.items()}, after[0], time.perf_counter() - start)


def _decoder_psnr(codec: Codec, images: dict[str, np.ndarray], std: float, seed: int) -> tuple[dict, dict]:
    """Reconstruction PSNR (dB) per modality of ``images``: decoded from their latent means, and from the means plus Gaussian noise of ``std`` in the
    network's units (seeded)."""
    clean, noisy = {}, {}
    for m, a in images.items():
        x = torch.from_numpy(to_unit_range(a))
        clean[m] = round(reconstruction_psnr(codec, x), 2)
        z = moment_means(codec.encode_moments(x))
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)) * std / codec.norm(m).scale
        rec = codec.decode(z + noise)
        noisy[m] = round(float(10 * torch.log10(4.0 / ((rec - x) ** 2).mean())), 2)
    return clean, noisy


def open_codec(codec: str) -> Codec:
    """A codec folder (``codec train`` output, ``STORE/codec``), or ``'small-vae'``: the shipped one."""
    return load_codec("small-vae") if codec == "small-vae" else load_codec(None, codec)


def image_psnr(codec: Codec, path: str | os.PathLike) -> float:
    """Reconstruction PSNR (dB, 8-bit scale) of one image file (PNG/JPEG/WebP, sides multiples
    of 8); a clear error naming the file otherwise."""
    from PIL import Image

    try:
        pixels = np.asarray(Image.open(path).convert("RGB"))
    except OSError as exc:
        raise MajorTomGenError(f"{path}: not a readable image ({exc})") from None
    if pixels.shape[0] % 8 or pixels.shape[1] % 8:
        raise MajorTomGenError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} px; sides must be multiples of 8")
    return reconstruction_psnr(codec, torch.from_numpy(to_unit_range(pixels[None])))
