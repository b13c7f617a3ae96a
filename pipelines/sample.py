"""Sample missing modalities for fragments of a latent store.

Conditions come from the store (latents sampled from their stored moments, or their mean
with ``deterministic_conditions``). Each fragment's starting noise derives from
(seed, grid cell, fragment, sample), so re-running part of a selection regenerates
identical fragments. Writes ``samples.npz`` (latents, float16) and, when the store's codec
can be loaded offline (patch-pca), one PNG per cell: conditions | generated samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from majortom_gen.errors import MajorTomGenError
from majortom_gen.fragments import from_unit_range
from majortom_gen.staging import staged_folder
from majortom_gen.store import MOMENT_SHAPE, LatentStore, moment_array
from model.codecs import load_codec, sample_latents
from model.sample import generate
from model.uvit import MultiModalUViT
from pipelines.train import store_scale_factor


@dataclass
class SampleResult:
    out: Path
    fragments: int
    files: list[Path]


def fragment_seed(seed: int, cell: str, fragment: int, sample: int, modality: str = "") -> int:
    """A stable 63-bit seed for one fragment sample (and modality: generated modalities
    start from independent noise)."""
    digest = hashlib.sha256(f"{seed}|{cell}|{fragment}|{sample}|{modality}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_store(model_dir: str | os.PathLike, store_dir: str | os.PathLike, cells: Sequence[str], condition: Sequence[str],
                 generate_modalities: Sequence[str], out: str | os.PathLike, *, n_samples: int = 1, steps: int = 50,
                 seed: int = 0, deterministic_conditions: bool = False, batch_size: int = 64,
                 device: str | None = None) -> SampleResult:
    net = MultiModalUViT.from_pretrained(model_dir).eval()
    net = net.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store = LatentStore.open(store_dir)
    scale = store_scale_factor(store)
    for m in list(condition) + list(generate_modalities):
        if m not in net.modalities:
            raise MajorTomGenError(f"the model does not know modality {m!r}; it models {net.modalities}")
    missing_in_store = [m for m in condition if m not in store.modalities]
    if missing_in_store:
        raise MajorTomGenError(f"the store has no {missing_in_store} to condition on")
    real_cols = [m for m in generate_modalities if m in store.modalities]
    table = store.table(["grid_cell", "fragment_index"] + list(dict.fromkeys(list(condition) + real_cols)), cells=cells)
    valid = np.ones(table.num_rows, bool)
    for m in condition:
        valid &= table.column(m).is_valid().to_numpy(zero_copy_only=False)
    table = table.filter(pa.array(valid))
    if table.num_rows == 0:
        raise MajorTomGenError(f"no fragment of the {len(cells)} selected cells has all of {list(condition)}")
    cell_ids = table.column("grid_cell").to_pylist()
    frag_ids = table.column("fragment_index").to_pylist()
    gen = torch.Generator().manual_seed(seed)
    cond = {}
    for m in condition:
        mom = torch.from_numpy(moment_array(table, m, np.float32))
        cond[m] = mom[:, :4] * scale if deterministic_conditions else sample_latents(mom, scale, gen)
    shape = (net.config.in_chans, net.config.img_size, net.config.img_size)
    noise = {m: torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(fragment_seed(seed, c, f, s, m)))
                             for c, f in zip(cell_ids, frag_ids) for s in range(n_samples)])
             for m in generate_modalities}
    result = generate(net, cond, list(generate_modalities), n_samples=n_samples, steps=steps, seed=seed,
                      initial_noise=noise, batch_size=batch_size)
    final = Path(out)
    with staged_folder(final) as out:  # complete or nothing
        arrays = {f"latent_{m}": result[m].cpu().numpy().astype(np.float16) for m in result}
        np.savez_compressed(out / "samples.npz", grid_cell=np.repeat(np.asarray(cell_ids), n_samples),
                            fragment_index=np.repeat(np.asarray(frag_ids), n_samples),
                            sample=np.tile(np.arange(n_samples), len(cell_ids)), **arrays)
        (out / "samples.json").write_text(json.dumps({
            "model": str(model_dir), "store": str(store_dir), "condition": list(condition), "generate": list(generate_modalities),
            "n_samples": n_samples, "steps": steps, "seed": seed, "deterministic_conditions": deterministic_conditions,
            "codec": store.codec["name"], "scale_factor": scale,
            "latents": "scaled latents in the network's space; divide by scale_factor before decoding"}, indent=1))
        files = [out / "samples.npz", out / "samples.json"]
        codec_dir = Path(store_dir) / "codec"
        if store.codec["name"] == "patch-pca" and (codec_dir / "config.json").exists():
            real = {}
            for m in real_cols:  # the store's own latents of the generated modalities, where it has them
                valid = table.column(m).is_valid().to_numpy(zero_copy_only=False)
                moms = np.zeros((table.num_rows,) + MOMENT_SHAPE, np.float32)
                if valid.any():
                    moms[valid] = moment_array(table.filter(pa.array(valid)), m, np.float32)
                real[m] = (valid, moms)
            files += _png_grids(load_codec("patch-pca", str(codec_dir)), result, cell_ids, frag_ids, n_samples,
                                list(condition), list(generate_modalities), out, real, scale)
    return SampleResult(final, len(cell_ids), [final / f.relative_to(out) for f in files])


def _png_grids(codec, result, cell_ids, frag_ids, n_samples, condition, generated, out: Path,
               real: dict[str, tuple[np.ndarray, np.ndarray]], scale: float) -> list[Path]:
    """One quick-look PNG per cell; rows = fragments; columns = conditions, then for each
    generated modality its samples and the real one where the store has it (grey if not)."""
    files = []
    images = {m: from_unit_range(codec.decode(result[m].float()).numpy()) for m in result}  # (B*n, 256, 256, 3)
    real_images = {m: (valid, from_unit_range(codec.decode(torch.from_numpy(moms[:, :4] * scale)).numpy()))
                   for m, (valid, moms) in real.items()}
    grey = np.full((256, 256, 3), 128, np.uint8)
    for cell in dict.fromkeys(cell_ids):
        rows = []
        for i, (c, f) in enumerate(zip(cell_ids, frag_ids)):
            if c != cell:
                continue
            tiles = [images[m][i * n_samples] for m in condition]
            for m in generated:
                tiles += [images[m][i * n_samples + s] for s in range(n_samples)]
                if m in real_images:
                    valid, imgs = real_images[m]
                    tiles.append(imgs[i] if valid[i] else grey)
            rows.append(np.concatenate([t[::2, ::2] for t in tiles], axis=1))
        path = out / f"{cell}.png"
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)
        files.append(path)
    return files
