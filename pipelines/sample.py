"""Sample missing modalities for fragments of a latent store.

Conditions come from the store: each generated sample gets its own posterior draw of its
conditions from their stored moments (as the official COP-GEN-Beta sampler does), or, with
``deterministic_conditions``, every sample gets their mean. Every random draw of a fragment
sample -- its condition latents, its starting noise, the noise standing in for marginalised
modalities -- derives from (seed, grid cell, fragment, sample, modality), so re-running part
of a selection, in other batches or on other workers, regenerates identical fragments.
Sampling runs in chunks, in process or on a local Dask cluster with one worker per GPU.
Writes ``samples.npz`` (latents, float16; the conditions too: each sample's draw) and, when
the store's codec can be loaded offline (small-vae, patch-pca), one quick-look PNG per cell
(see :mod:`pipelines.quicklook`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from majortom_gen.errors import MajorTomGenError
from majortom_gen.fragments import from_unit_range
from majortom_gen.staging import check_output, local_paths, staged_folder
from majortom_gen.store import MOMENT_SHAPE, LatentStore, complete_rows, moment_array
from model.codecs import CODEC_RECORD, LatentNorm, latent_norms, load_codec, sample_latents
from model.sample import generate
from model.uvit import MultiModalUViT
from pipelines.model_folder import open_model_for_store


@dataclass
class SampleResult:
    out: Path
    fragments: int
    files: list[Path]


def open_store_codec(store_dir: str | os.PathLike, source: str | None = None, device: str = "cpu"):
    """The codec that made a store's latents: the copy kept with the store (``STORE/codec``:
    small-vae, patch-pca), or the sd-vae at ``source`` (hub id, folder or state-dict file),
    checked against the store's record. None when it cannot be had offline (sd-vae without
    ``source``)."""
    store = LatentStore.open(store_dir)
    name = store.codec["name"]
    folder = Path(store_dir) / "codec"
    if source is None and (folder / CODEC_RECORD).exists():
        source = str(folder)
    if source is None:
        return None
    codec = load_codec(name, source, device=device)
    if codec.info()["config_hash"] != store.codec["config_hash"]:
        raise MajorTomGenError(f"codec {source} ({codec.info()['config_hash'][:12]}) is not the one that made the store's "
                               f"latents ({store.codec['config_hash'][:12]})")
    return codec


def fragment_georef(store: LatentStore, cells: Sequence[str], frags: Sequence[int]) -> dict[str, np.ndarray]:
    """Where each fragment lies, for the sample run to carry: ``utm_crs`` (str, e.g.
    ``EPSG:32633``), ``utm_transform`` float64 ``(N, 6)`` (the affine ``a, b, c, d, e, f`` of
    its 256 x 256 window of the 10 m product grid, metres) and ``source_product_ids`` (a JSON
    object per fragment: modality -> product id)."""
    geo = store.lookup(cells=sorted(set(cells))).set_index(["grid_cell", "fragment_index"])
    rows = geo.loc[list(zip(cells, frags))]
    id_cols = [c for c in geo.columns if c.endswith("_product_id")]
    products = [json.dumps({c.removesuffix("_product_id"): r[c] for c in id_cols if r[c]}) for _, r in rows.iterrows()]
    return {"utm_crs": np.asarray(rows["utm_crs"].tolist(), dtype=str),
            "utm_transform": np.asarray([list(t)[:6] for t in rows["utm_transform"]], np.float64).reshape(-1, 6),
            "source_product_ids": np.asarray(products, dtype=str)}


def fragment_seed(seed: int, cell: str, fragment: int, sample: int, modality: str = "") -> int:
    """A stable 63-bit seed for one fragment sample (and modality: generated modalities
    start from independent noise)."""
    digest = hashlib.sha256(f"{seed}|{cell}|{fragment}|{sample}|{modality}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fragment_noise(cells: Sequence[str], frags: Sequence[int], n_samples: int, modalities: Sequence[str], seed: int,
                   shape: tuple[int, ...], tag: str = "") -> dict[str, torch.Tensor]:
    """Standard normal noise ``(len(cells) * n_samples, *shape)`` per modality, each fragment
    sample drawn from its own seed (seed, cell, fragment, sample, tag + modality): independent
    of which other fragments are in the batch."""
    return {m: torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(fragment_seed(seed, c, f, s, tag + m)))
                            for c, f in zip(cells, frags) for s in range(n_samples)]) for m in modalities}


def condition_latents(moments: dict[str, torch.Tensor], norms: dict[str, LatentNorm], cells: Sequence[str],
                      frags: Sequence[int], seed: int, deterministic: bool, n_samples: int = 1) -> dict[str, torch.Tensor]:
    """The condition latents of every fragment sample, in the network's space: from stored
    moments ``(B, 8, H, W)`` per modality, ``(B * n_samples, 4, H, W)`` (the samples of a
    fragment are consecutive rows). Sample s of a fragment gets its own posterior draw, seeded
    from (seed, cell, fragment, s, "condition:" + modality), so it does not depend on the other
    fragments of the batch; with ``deterministic`` every sample gets the mean."""
    if deterministic:
        return {m: norms[m].to_network(mom[:, :4]).repeat_interleave(n_samples, dim=0)
                for m, mom in moments.items()}
    out = {}
    for m, mom in moments.items():
        tag = "condition:" + m
        draws = [sample_latents(mom[i:i + 1], 1.0, torch.Generator().manual_seed(fragment_seed(seed, c, f, s, tag)))
                 for i, (c, f) in enumerate(zip(cells, frags)) for s in range(n_samples)]
        out[m] = norms[m].to_network(torch.cat(draws) if draws else mom[:0, :4])
    return out


_NETS: dict[tuple[str, str], MultiModalUViT] = {}


def _network(model_dir: str, device: str) -> MultiModalUViT:
    """The model, loaded once per process and device (Dask workers keep it between tasks)."""
    key = (str(model_dir), device)
    if key not in _NETS:
        _NETS[key] = MultiModalUViT.from_pretrained(model_dir).eval().to(device)
    return _NETS[key]


def device_problem(value: str) -> str | None:
    """Why torch cannot use the device ``value`` on this machine (``cuda``/``cuda:N`` without
    CUDA, ``mps`` without MPS, not a device name), or None when it can."""
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        return f"{value!r} is not a torch device ({exc})"
    if device.type == "cuda" and not torch.cuda.is_available():
        return (f"device {value!r}: no CUDA device is available (torch {torch.__version__}); use --device cpu, "
                "or leave --device out")
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"device {value!r}: MPS is not available on this machine"
    return None


def _worker_device(device: str | None) -> str:
    """On a Dask worker with GPUs: one GPU per worker (by worker index); else the given device."""
    if device not in (None, "cuda") or not torch.cuda.is_available():
        return device or "cpu"
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def sample_chunk(model_dir: str, device: str | None, cells: Sequence[str], frags: Sequence[int],
                 cond: dict[str, torch.Tensor], generate_modalities: Sequence[str], n_samples: int, steps: int, seed: int,
                 batch_size: int) -> dict[str, np.ndarray]:
    """Generate ``n_samples`` samples of each fragment of one chunk (a Dask task or an in-process
    call). ``cond`` holds one row per fragment sample, ``(len(cells) * n_samples, C, H, W)`` per
    condition (see :func:`condition_latents`); returns float16 latents of the same rows for the
    generated modalities and the conditions (as given)."""
    rows = len(cells) * n_samples
    wrong = {m: tuple(v.shape) for m, v in cond.items() if v.shape[0] != rows}
    if wrong:
        raise ValueError(f"conditions need one row per fragment sample ({len(cells)} x {n_samples} = {rows}); got {wrong}")
    dev = _worker_device(device)
    net = _network(model_dir, dev)
    shape = (net.config.in_chans, net.config.img_size, net.config.img_size)
    free = [m for m in net.modalities if m not in cond and m not in generate_modalities]
    result = generate(net, cond, list(generate_modalities), n_samples=1, steps=steps, seed=seed,  # a row per sample
                      initial_noise=fragment_noise(cells, frags, n_samples, generate_modalities, seed, shape),
                      marginal_noise=fragment_noise(cells, frags, n_samples, free, seed, shape, tag="marginal:"),
                      batch_size=batch_size)
    return {m: v.cpu().numpy().astype(np.float16) for m, v in result.items()}


def sample_fragments(model_dir: str, cells: Sequence[str], frags: Sequence[int], cond: dict[str, torch.Tensor],
                     generate_modalities: Sequence[str], *, n_samples: int = 1, steps: int = 50, seed: int = 0,
                     batch_size: int = 64, device: str | None = None, workers: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Sample every fragment in chunks of ``batch_size`` fragments: in this process, or with
    ``workers`` > 1 on a local Dask cluster (default: one worker per GPU when there are several;
    each worker holds the model once and uses its own GPU). ``cond`` holds one row per fragment
    sample, ``(len(cells) * n_samples, C, H, W)`` per condition (:func:`condition_latents`);
    returns ``(len(cells) * n_samples, C, H, W)`` float16 latents per generated modality and
    condition, the samples of a fragment consecutive. The result does not depend on the
    chunking or the number of workers (per-fragment noise)."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() and device in (None, "cuda") else 0
    workers = workers if workers is not None else (n_gpus if n_gpus > 1 else 1)
    chunks = [slice(i, min(i + batch_size, len(cells))) for i in range(0, len(cells), batch_size)]
    rows = [slice(c.start * n_samples, c.stop * n_samples) for c in chunks]  # the chunks' fragment samples
    args = [(str(model_dir), device, cells[c], frags[c], {m: v[r] for m, v in cond.items()}, list(generate_modalities),
             n_samples, steps, seed, batch_size * n_samples) for c, r in zip(chunks, rows)]
    parts: list[dict[str, np.ndarray] | None] = [None] * len(chunks)
    done = 0
    if workers <= 1:
        for i, a in enumerate(args):
            parts[i] = sample_chunk(*a)
            done += chunks[i].stop - chunks[i].start
            if progress:
                progress(done, len(cells))
    else:
        from distributed import Client, LocalCluster, as_completed

        threads = max((os.cpu_count() or 1) // workers, 1)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          env={"OMP_NUM_THREADS": str(threads)}) as cluster, Client(cluster) as client:
            futures = {client.submit(sample_chunk, *a, pure=False): i for i, a in enumerate(args)}
            for fut in as_completed(futures):
                i = futures[fut]
                parts[i] = fut.result()
                done += chunks[i].stop - chunks[i].start
                if progress:
                    progress(done, len(cells))
    return {m: np.concatenate([p[m] for p in parts]) for m in parts[0]}


def sample_store(model_dir: str | os.PathLike, store_dir: str | os.PathLike, cells: Sequence[str], condition: Sequence[str],
                 generate_modalities: Sequence[str], out: str | os.PathLike, *, n_samples: int = 1, steps: int = 50,
                 seed: int = 0, deterministic_conditions: bool = False, batch_size: int = 64,
                 device: str | None = None, workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None, codec_source: str | None = None,
                 overwrite: bool = False) -> SampleResult:
    """Sample ``generate_modalities`` given ``condition`` for the stored fragments of ``cells``
    and write ``out`` (see the module docstring). ``model_dir`` may be a ``train`` run folder;
    it must fit the store's codec (:func:`pipelines.model_folder.open_model_for_store`)."""
    check_output(out, overwrite=overwrite, inputs=(model_dir, store_dir, *local_paths(codec_source)))
    model_dir = open_model_for_store(model_dir, store_dir)
    modalities = list(MultiModalUViT.load_config(model_dir)["modalities"])
    store = LatentStore.open(store_dir)
    norms = latent_norms(store.codec, modalities)
    for m in list(condition) + list(generate_modalities):
        if m not in modalities:
            raise MajorTomGenError(f"the model does not know modality {m!r}; it models {modalities}")
    missing_in_store = [m for m in condition if m not in store.modalities]
    if missing_in_store:
        raise MajorTomGenError(f"the store has no {missing_in_store} to condition on")
    real_cols = [m for m in generate_modalities if m in store.modalities]
    table = store.table(["grid_cell", "fragment_index"] + list(dict.fromkeys(list(condition) + real_cols)), cells=cells)
    table = complete_rows(table, condition, f"the {len(cells)} selected cells")
    cell_ids = table.column("grid_cell").to_pylist()
    frag_ids = table.column("fragment_index").to_pylist()
    moments = {m: torch.from_numpy(moment_array(table, m, np.float32)) for m in condition}
    cond = condition_latents(moments, norms, cell_ids, frag_ids, seed, deterministic_conditions, n_samples)
    arrays = sample_fragments(str(model_dir), cell_ids, frag_ids, cond, generate_modalities, n_samples=n_samples,
                              steps=steps, seed=seed, batch_size=batch_size, device=device, workers=workers,
                              progress=progress)
    result = {m: torch.from_numpy(a) for m, a in arrays.items()}
    final = Path(out)
    with staged_folder(final, overwrite=overwrite, inputs=(model_dir, store_dir, *local_paths(codec_source)), kind="sample") as out:
        arrays = {f"latent_{m}": a for m, a in arrays.items()}
        np.savez_compressed(out / "samples.npz", grid_cell=np.repeat(np.asarray(cell_ids), n_samples),
                            fragment_index=np.repeat(np.asarray(frag_ids), n_samples),
                            sample=np.tile(np.arange(n_samples), len(cell_ids)),
                            **{k: np.repeat(v, n_samples, axis=0) for k, v in fragment_georef(store, cell_ids, frag_ids).items()},
                            **arrays)
        (out / "samples.json").write_text(json.dumps({
            "model": str(model_dir), "store": str(store_dir), "condition": list(condition), "generate": list(generate_modalities),
            "n_samples": n_samples, "steps": steps, "seed": seed, "deterministic_conditions": deterministic_conditions,
            "codec": store.codec["name"], "latent_norm": {m: norms[m].as_dict() for m in result},
            "latents": "the network's latents x; the codec's latents are z = x / scale + shift"}, indent=1))
        files = [out / "samples.npz", out / "samples.json"]
        codec = open_store_codec(store_dir, codec_source)
        if codec is not None:
            real = {}
            for m in real_cols:  # the store's own latents of the generated modalities, where it has them
                valid = table.column(m).is_valid().to_numpy(zero_copy_only=False)
                moms = np.zeros((table.num_rows,) + MOMENT_SHAPE, np.float32)
                if valid.any():
                    moms[valid] = moment_array(table.filter(pa.array(valid)), m, np.float32)
                real[m] = (valid, moms)
            files += _png_grids(codec, result, cell_ids, frag_ids, n_samples,
                                list(condition), list(generate_modalities), out, real)
    return SampleResult(final, len(cell_ids), [final / f.relative_to(out) for f in files])


def _png_grids(codec, result, cell_ids, frag_ids, n_samples, condition, generated, out: Path,
               real: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[Path]:
    """One quick-look PNG per cell (:mod:`pipelines.quicklook`): the cell's fragments in place;
    the conditions (the first sample's draw), then per generated modality the real one (where
    the store has it), the samples, and with several samples their mean and std."""
    from pipelines.quicklook import cell_rows, write_quicklook

    images = {m: from_unit_range(codec.decode_network(result[m].float(), m).numpy()) for m in result}  # (B*n, 256, 256, 3)
    real_images = {m: (valid, from_unit_range(codec.decode(torch.from_numpy(moms[:, :4])).numpy()))
                   for m, (valid, moms) in real.items()}
    cells = np.asarray(cell_ids)
    files = []
    for cell in dict.fromkeys(cell_ids):
        rows = np.flatnonzero(cells == cell)
        sample_rows = (rows[:, None] * n_samples + np.arange(n_samples)).ravel()
        panels = cell_rows([frag_ids[i] for i in rows],
                           {m: images[m][rows * n_samples] for m in condition},
                           {m: images[m][sample_rows] for m in generated},
                           {m: (valid[rows], imgs[rows]) for m, (valid, imgs) in real_images.items()}, n_samples)
        title = f"{cell}: {', '.join(generated)} generated from {', '.join(condition) or 'nothing (unconditional)'}"
        files.append(write_quicklook(out / f"{cell}.png", title, panels))
    return files


def chain_store(model_dir: str | os.PathLike, store_dir: str | os.PathLike, cells: Sequence[str], a: Sequence[str],
                b: Sequence[str], n: int, out: str | os.PathLike, *, steps: int = 50, seed: int = 0,
                batch_size: int = 64, device: str | None = None, codec_source: str | None = None,
                overwrite: bool = False) -> SampleResult:
    """The paper's looping experiment on stored fragments: generate ``b`` from the real ``a``,
    then ``a`` from the generated ``b``, ``n`` times (iteration i uses seed + i). Writes
    ``chain.npz`` (``latent_<M>_<i>`` for every iteration's output, float16), ``chain.json``
    and, with an offline codec, one PNG per cell: rows = fragments, columns = real a, real b,
    then each iteration's output."""
    if n < 1:
        raise MajorTomGenError(f"--n must be >= 1, got {n}")
    overlap = set(a) & set(b)
    if overlap or not a or not b:
        raise MajorTomGenError(f"the two sides of a chain must be non-empty and disjoint; got {list(a)} and {list(b)}")
    check_output(out, overwrite=overwrite, inputs=(model_dir, store_dir, *local_paths(codec_source)))
    model_dir = open_model_for_store(model_dir, store_dir)
    modalities = list(MultiModalUViT.load_config(model_dir)["modalities"])
    unknown = [m for m in list(a) + list(b) if m not in modalities]
    if unknown:
        raise MajorTomGenError(f"the model does not know modality {unknown}; it models {modalities}")
    store = LatentStore.open(store_dir)
    norms = latent_norms(store.codec, modalities)
    absent = [m for m in list(a) + list(b) if m not in store.modalities]
    if absent:
        raise MajorTomGenError(f"the store has no {absent}")
    table = store.table(["grid_cell", "fragment_index"] + list(a) + list(b), cells=cells)
    table = complete_rows(table, list(a) + list(b), f"the {len(cells)} selected cells")
    cell_ids = table.column("grid_cell").to_pylist()
    frag_ids = table.column("fragment_index").to_pylist()
    real = {m: norms[m].to_network(torch.from_numpy(moment_array(table, m, np.float32))[:, :4]) for m in list(a) + list(b)}
    current = {m: real[m] for m in a}
    src, dst = list(a), list(b)
    outputs: dict[str, np.ndarray] = {}
    order = []
    for i in range(n):
        parts = [sample_chunk(str(model_dir), device, cell_ids[c], frag_ids[c], {m: current[m][c] for m in src}, dst, 1,
                              steps, seed + i, batch_size) for c in
                 (slice(j, min(j + batch_size, len(cell_ids))) for j in range(0, len(cell_ids), batch_size))]
        generated = {m: np.concatenate([p[m] for p in parts]) for m in dst}
        for m, v in generated.items():
            outputs[f"latent_{m}_{i + 1}"] = v
            order.append((m, i + 1))
        current = {m: torch.from_numpy(v).float() for m, v in generated.items()}
        src, dst = dst, src
    final = Path(out)
    with staged_folder(final, overwrite=overwrite, inputs=(model_dir, store_dir, *local_paths(codec_source)), kind="chain") as tmp:
        np.savez_compressed(tmp / "chain.npz", grid_cell=np.asarray(cell_ids), fragment_index=np.asarray(frag_ids),
                            **{f"real_{m}": v.numpy().astype(np.float16) for m, v in real.items()}, **outputs)
        (tmp / "chain.json").write_text(json.dumps({"model": str(model_dir), "store": str(store_dir), "a": list(a),
                                                    "b": list(b), "n": n, "steps": steps, "seed": seed,
                                                    "outputs": [f"latent_{m}_{i}" for m, i in order]}, indent=1))
        files = [tmp / "chain.npz", tmp / "chain.json"]
        codec = open_store_codec(store_dir, codec_source)
        if codec is not None:
            columns = [(real[m], m) for m in list(a) + list(b)] + [(torch.from_numpy(outputs[f"latent_{m}_{i}"]).float(), m)
                                                                   for m, i in order]
            images = [from_unit_range(codec.decode_network(c, m).numpy()) for c, m in columns]
            for cell in dict.fromkeys(cell_ids):
                rows = [np.concatenate([im[j][::2, ::2] for im in images], axis=1)
                        for j, c in enumerate(cell_ids) if c == cell]
                Image.fromarray(np.concatenate(rows, axis=0)).save(tmp / f"{cell}.png")
                files.append(tmp / f"{cell}.png")
    return SampleResult(final, len(cell_ids), [final / f.relative_to(tmp) for f in files])
