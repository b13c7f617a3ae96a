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

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from majortom_gen.errors import MajorTomGenError
from majortom_gen.fragments import GRID_SIDE
from majortom_gen.staging import check_output, local_paths, staged_folder
from majortom_gen.store import MOMENT_SHAPE, LatentStore, complete_rows, moment_array
from model.codecs import LatentNorm, moment_means, sample_latents
from model.sample import chain, generate
from model.uvit import MultiModalUViT
from pipelines.cell_canvas import FRAGMENTS_PER_CELL, canvas_groups, tile, untile
from pipelines.guidance import GUIDANCE_DEFAULT, GUIDANCE_MIN_SIGMA
from pipelines.model_folder import ModelOnStore


@dataclass
class SampleResult:
    out: Path
    fragments: int
    files: list[Path]


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample, for every command that samples (sample, chain, generate, evaluate).

    ``n_samples`` per fragment; ``steps`` of DPM-Solver++; ``seed``: every draw of a fragment
    sample derives from (seed, cell, fragment, sample, modality); ``deterministic_conditions``:
    condition on the stored latent means instead of a posterior draw per sample;
    ``batch_size``: fragments per network batch; ``device``: cpu, cuda, cuda:N (None: CUDA
    when available); ``workers``: local Dask workers (None: one per GPU when there are
    several); ``codec_source``: the VAE of an sd-vae store (None: the store's own codec);
    ``seamless``: a cell whose 16 fragments are all sampled is generated as one canvas of
    overlapping windows (:mod:`model.canvas`), so its fragments agree at their borders (False:
    every fragment on its own); ``canvas_stride``: latent pixels between window starts (None:
    3/4 of a window, 24 of 32); ``resample``: gap filling only, RePaint's jumps back per noisy
    step (:func:`model.sample.generate`), their noise drawn per fragment sample (or canvas);
    ``strength``: gap filling only, 1: the gaps start from pure noise; below 1 they start from
    the given latents (an interpolation) noised to the level of the last ``strength`` share
    of the steps, and the steps before are skipped (SDEdit, diffusers' inpainting strength);
    ``guidance``: classifier-free guidance weight w on the conditions together (0: none):
    ``e_unc + (1 + w)(e_c - e_unc)`` on the noisy steps (:mod:`pipelines.guidance`), one more
    network call per step; the dropped conditions' noise is drawn per fragment sample (or canvas)."""

    n_samples: int = 1
    steps: int = 50
    seed: int = 0
    deterministic_conditions: bool = False
    batch_size: int = 64
    device: str | None = None
    workers: int | None = None
    codec_source: str | None = None
    seamless: bool = True
    canvas_stride: int | None = None
    resample: int = 0
    strength: float = 1.0
    guidance: float = GUIDANCE_DEFAULT


def guidance_weights(options: SamplingOptions, conditions: Sequence[str]) -> dict[tuple[str, ...], float] | None:
    """``options.guidance`` as :func:`model.sample.generate` takes it: the conditions dropped
    together (one extra network call per guided step), or None."""
    return {tuple(conditions): float(options.guidance)} if options.guidance and conditions else None


@dataclass
class FragmentBatch:
    """Fragments to sample: ``cells[i]``, ``frags[i]``, and ``cond``: the condition latents in
    the network's space, one row per fragment sample (``(len(cells) * n_samples, C, H, W)``
    per condition, the samples of a fragment consecutive; see :func:`condition_latents`)."""

    cells: list[str]
    frags: list[int]
    cond: dict[str, torch.Tensor]
    canvas: bool = False  # whole cells, each sampled as one canvas (see :func:`sample_chunk`)
    # gap filling: {generated modality: (known latents, keep mask)}, rows like ``cond``:
    # ``(rows, C, H, W)`` and ``(rows, 1, H, W)`` (1 = known; see :func:`model.sample.generate`)
    known: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def take(self, rows: Sequence[int], n_samples: int, canvas: bool = False) -> "FragmentBatch":
        """The fragments ``rows`` (in that order) with their condition (and known) rows."""
        index = torch.as_tensor([r * n_samples + s for r in rows for s in range(n_samples)], dtype=torch.long)
        return FragmentBatch([self.cells[r] for r in rows], [self.frags[r] for r in rows],
                             {m: v[index] for m, v in self.cond.items()}, canvas,
                             {m: (x[index], k[index]) for m, (x, k) in self.known.items()})


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
        return {m: norms[m].to_network(moment_means(mom)).repeat_interleave(n_samples, dim=0)
                for m, mom in moments.items()}
    out = {}
    for m, mom in moments.items():
        tag = "condition:" + m
        draws = [sample_latents(mom[i:i + 1], 1.0, torch.Generator().manual_seed(fragment_seed(seed, c, f, s, tag)))
                 for i, (c, f) in enumerate(zip(cells, frags)) for s in range(n_samples)]
        out[m] = norms[m].to_network(torch.cat(draws) if draws else moment_means(mom[:0]))
    return out


_NETS: dict[tuple[str, str], MultiModalUViT] = {}


def _network(model_dir: str, device: str) -> MultiModalUViT:
    """The network, loaded once per process and device (Dask workers keep it between tasks)."""
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


def sample_chunk(model_dir: str | os.PathLike, batch: FragmentBatch, generate_modalities: Sequence[str],
                 options: SamplingOptions) -> dict[str, np.ndarray]:
    """Generate ``options.n_samples`` samples of each fragment of ``batch`` (a Dask task or an
    in-process call); returns float16 latents ``(len(batch.cells) * n_samples, C, H, W)`` for
    the generated modalities and the conditions (as given)."""
    n_samples = options.n_samples
    rows = len(batch.cells) * n_samples
    wrong = {m: tuple(v.shape) for m, v in batch.cond.items() if v.shape[0] != rows}
    if wrong:
        raise ValueError(f"conditions need one row per fragment sample ({len(batch.cells)} x {n_samples} = {rows}); got {wrong}")
    net = _network(str(model_dir), _worker_device(options.device))
    if batch.canvas:
        return _sample_canvases(net, batch, generate_modalities, options)
    shape = net.latent_shape()
    noise = functools.partial(fragment_noise, batch.cells, batch.frags, n_samples, seed=options.seed, shape=shape)
    result = _generate_rows(net, batch.cond, generate_modalities, options, noise, known=batch.known,
                            batch_size=options.batch_size * n_samples)  # a row per fragment sample
    return {m: v.cpu().numpy().astype(np.float16) for m, v in result.items()}


def _generate_rows(net: MultiModalUViT, cond: dict[str, torch.Tensor], generate_modalities: Sequence[str],
                   options: SamplingOptions, noise: Callable[..., dict[str, torch.Tensor]], *,
                   known: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                   stride: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`model.sample.generate` on one row per fragment sample (or canvas), every draw
    from ``noise(modalities, tag=...)`` (per row): the starting noise, the noise of the
    marginalised modalities and of the conditions dropped for guidance, the resampling noise."""
    guidance = guidance_weights(options, cond)
    free = [m for m in net.modalities if (m not in cond and m not in generate_modalities) or (guidance and m in cond)]
    return generate(net, cond, list(generate_modalities), n_samples=1, steps=options.steps, seed=options.seed,
                    initial_noise=noise(generate_modalities), marginal_noise=noise(free, tag="marginal:"),
                    guidance=guidance, guidance_min_sigma=GUIDANCE_MIN_SIGMA, batch_size=batch_size, stride=stride,
                    known=known or None, resample=options.resample, strength=options.strength,
                    resample_noise=lambda i: noise(generate_modalities, tag=f"resample{i}:"))


def _sample_canvases(net: MultiModalUViT, batch: FragmentBatch, generate_modalities: Sequence[str],
                     options: SamplingOptions) -> dict[str, np.ndarray]:
    """:func:`sample_chunk` for whole cells: each (cell, sample) is one ``(C, 128, 128)``
    canvas (its conditions tiled from its fragments' rows) denoised as overlapping windows.
    Its starting noise and marginal noise are drawn for the canvas from (seed, cell,
    "canvas", sample, modality), so a cell's result does not depend on the other cells."""
    n = options.n_samples
    groups, rest = canvas_groups(batch.cells, batch.frags)
    if rest:
        raise ValueError(f"a canvas chunk holds incomplete cells: {sorted({batch.cells[r] for r in rest})}")
    # canvas row (g, s) is made of the condition rows r * n + s of group g's fragments r
    sample_rows = [[r * n + s for r in rows] for rows in groups for s in range(n)]
    cond = {m: torch.cat([tile(v[idx]) for idx in sample_rows]) for m, v in batch.cond.items()}
    known = {m: tuple(torch.cat([tile(v[idx]) for idx in sample_rows]) for v in pair) for m, pair in batch.known.items()}
    cells = [batch.cells[rows[0]] for rows in groups]
    c, h, w = net.latent_shape()
    shape = (c, GRID_SIDE * h, GRID_SIDE * w)
    noise = functools.partial(fragment_noise, cells, ["canvas"] * len(cells), n, seed=options.seed, shape=shape)
    result = _generate_rows(net, cond, generate_modalities, options, noise, known=known,
                            batch_size=options.batch_size * n, stride=options.canvas_stride)
    out = {}
    for m, v in result.items():
        frags = untile(v.cpu().float())  # rows (g, s, fragment index)
        rows = torch.empty_like(frags)
        rows[torch.as_tensor([i for idx in sample_rows for i in idx])] = frags
        out[m] = rows.numpy().astype(np.float16)
    return out


def sample_fragments(model_dir: str | os.PathLike, batch: FragmentBatch, generate_modalities: Sequence[str],
                     options: SamplingOptions, progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Sample every fragment of ``batch`` in chunks of ``options.batch_size`` fragments: in
    this process, or with ``workers`` > 1 on a local Dask cluster (default: one worker per GPU
    when there are several; each worker holds the network once and uses its own GPU). Returns
    ``(len(batch.cells) * n_samples, C, H, W)`` float16 latents per generated modality and
    condition. The result does not depend on the chunking or the number of workers."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() and options.device in (None, "cuda") else 0
    workers = options.workers if options.workers is not None else (n_gpus if n_gpus > 1 else 1)
    n, total = options.n_samples, len(batch.cells)
    plan = _chunk_rows(batch, options)
    chunks = [batch.take(rows, n, canvas) for rows, canvas in plan]
    out: dict[str, np.ndarray] = {}
    done = 0
    for i, part in _run_chunks(model_dir, chunks, generate_modalities, options, workers):
        index = np.asarray([r * n + s for r in plan[i][0] for s in range(n)])
        for m, v in part.items():
            out.setdefault(m, np.zeros((total * n, *v.shape[1:]), v.dtype))[index] = v
        done += len(chunks[i].cells)
        if progress:
            progress(done, total)
    return out


def _chunk_rows(batch: FragmentBatch, options: SamplingOptions) -> list[tuple[list[int], bool]]:
    """``(rows, canvas)`` per chunk: with ``seamless``, complete cells as canvases, a whole
    number of cells (about ``batch_size`` fragments) per chunk; the other fragments in chunks
    of ``batch_size``."""
    size = options.batch_size
    groups, rest = canvas_groups(batch.cells, batch.frags) if options.seamless else ([], list(range(len(batch.cells))))
    per_chunk = max(size // FRAGMENTS_PER_CELL, 1)
    plan = [([r for rows in groups[i:i + per_chunk] for r in rows], True) for i in range(0, len(groups), per_chunk)]
    return plan + [(rest[i:i + size], False) for i in range(0, len(rest), size)]


def _run_chunks(model_dir, chunks: list[FragmentBatch], generate_modalities, options: SamplingOptions, workers: int):
    """Yield ``(chunk index, result)`` as the chunks finish, in process or on local Dask workers."""
    if workers <= 1:
        for i, chunk in enumerate(chunks):
            yield i, sample_chunk(model_dir, chunk, generate_modalities, options)
        return
    from distributed import Client, as_completed

    from pipelines.local_cluster import local_cluster

    threads = max((os.cpu_count() or 1) // workers, 1)
    with local_cluster(workers, env={"OMP_NUM_THREADS": str(threads)}) as cluster, Client(cluster) as client:
        futures = {client.submit(sample_chunk, str(model_dir), c, list(generate_modalities), options, pure=False): i
                   for i, c in enumerate(chunks)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


def _fragment_table(store: LatentStore, cells: Sequence[str], complete: Sequence[str], other: Sequence[str] = ()) -> pa.Table:
    """The stored fragments of ``cells`` having all of ``complete`` (an error naming the
    selection when none has), with those latent columns and ``other``."""
    columns = list(dict.fromkeys(list(complete) + list(other)))
    table = store.table(["grid_cell", "fragment_index"] + columns, cells=cells)
    return complete_rows(table, complete, f"the {len(cells)} selected cells")


def _stored_moments(table: pa.Table, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """``(valid (N,) bool, moments (N, 8, 32, 32) float32)`` of a column that may have gaps (zeros there)."""
    valid = table.column(modality).is_valid().to_numpy(zero_copy_only=False)
    moms = np.zeros((table.num_rows,) + MOMENT_SHAPE, np.float32)
    if valid.any():
        moms[valid] = moment_array(table.filter(pa.array(valid)), modality, np.float32)
    return valid, moms


def sample_store(model_dir: str | os.PathLike, store_dir: str | os.PathLike, cells: Sequence[str], condition: Sequence[str],
                 generate_modalities: Sequence[str], out: str | os.PathLike, options: SamplingOptions = SamplingOptions(), *,
                 progress: Callable[[int, int], None] | None = None, overwrite: bool = False,
                 known: Callable[[list[str], list[int]], dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
                 ) -> SampleResult:
    """Sample ``generate_modalities`` given ``condition`` for the stored fragments of ``cells``
    and write ``out`` (see the module docstring). ``model_dir`` may be a ``train`` run folder;
    it must fit the store's codec (:class:`pipelines.model_folder.ModelOnStore`). ``known(cells,
    frags)``, when given, returns latents to keep (:attr:`FragmentBatch.known`) for the rows of
    those fragments, e.g. what generated neighbours make known (:mod:`pipelines.cell_join`)."""
    inputs = (model_dir, store_dir, *local_paths(options.codec_source))
    check_output(out, overwrite=overwrite, inputs=inputs)
    bound = ModelOnStore.open(model_dir, store_dir, device=options.device, codec_source=options.codec_source)
    bound.check(list(condition) + list(generate_modalities), in_store=condition)
    real_cols = [m for m in generate_modalities if m in bound.store.modalities]
    table = _fragment_table(bound.store, cells, condition, real_cols)
    batch = FragmentBatch(table.column("grid_cell").to_pylist(), table.column("fragment_index").to_pylist(), {})
    moments = {m: torch.from_numpy(moment_array(table, m, np.float32)) for m in condition}
    batch.cond = condition_latents(moments, bound.norms, batch.cells, batch.frags, options.seed,
                                   options.deterministic_conditions, options.n_samples)
    if known is not None:
        batch.known = known(batch.cells, batch.frags)
    arrays = sample_fragments(bound.model_dir, batch, generate_modalities, options, progress)
    with staged_folder(out, overwrite=overwrite, inputs=inputs, kind="sample") as tmp:
        files = _write_samples(tmp, bound, batch, arrays, condition, generate_modalities, options)
        if bound.codec is not None:
            # the store's own: the real generated modalities where it has them, the conditions' means
            real = {m: _stored_moments(table, m) for m in dict.fromkeys(real_cols + list(condition))}
            files += _png_grids(bound, arrays, batch, options.n_samples, list(condition), list(generate_modalities),
                                tmp, real, options.seamless)
    return SampleResult(Path(out), len(batch.cells), [Path(out) / f.relative_to(tmp) for f in files])


def _write_samples(folder: Path, bound: ModelOnStore, batch: FragmentBatch, arrays: dict[str, np.ndarray],
                   condition: Sequence[str], generate_modalities: Sequence[str], options: SamplingOptions) -> list[Path]:
    """``samples.npz``: per fragment sample its cell, fragment, sample number, georeferencing
    (:func:`fragment_georef`) and float16 latents ``latent_<M>``; ``samples.json``: the settings."""
    n = options.n_samples
    georef = fragment_georef(bound.store, batch.cells, batch.frags)
    np.savez_compressed(folder / "samples.npz", grid_cell=np.repeat(np.asarray(batch.cells), n),
                        fragment_index=np.repeat(np.asarray(batch.frags), n), sample=np.tile(np.arange(n), len(batch.cells)),
                        **{k: np.repeat(v, n, axis=0) for k, v in georef.items()},
                        **{f"latent_{m}": a for m, a in arrays.items()})
    (folder / "samples.json").write_text(json.dumps({
        "model": str(bound.model_dir), "store": str(bound.store_dir), "condition": list(condition),
        "generate": list(generate_modalities), "n_samples": n, "steps": options.steps, "seed": options.seed,
        "deterministic_conditions": options.deterministic_conditions, "seamless": options.seamless,
        "canvas_stride": options.canvas_stride, "codec": bound.store.codec["name"],
        "latent_norm": {m: bound.norms[m].as_dict() for m in arrays},
        "latents": "the network's latents x; the codec's latents are z = x / scale + shift"}, indent=1))
    return [folder / "samples.npz", folder / "samples.json"]


def sample_rows_of(cells: Sequence[str], frags: Sequence[int], n_samples: int) -> dict[str, list]:
    """``cells``, ``frags`` and ``samples`` of every row of a sample run (the samples of a
    fragment consecutive), as :meth:`ModelOnStore.pictures` takes them to decode whole cells."""
    return {"cells": np.repeat(cells, n_samples).tolist(), "frags": np.repeat(frags, n_samples).tolist(),
            "samples": np.tile(np.arange(n_samples), len(cells)).tolist()}


def _png_grids(bound: ModelOnStore, arrays: dict[str, np.ndarray], batch: FragmentBatch, n_samples: int,
               condition: list[str], generated: list[str], out: Path,
               real: dict[str, tuple[np.ndarray, np.ndarray]], seamless: bool) -> list[Path]:
    """One quick-look PNG per cell (:mod:`pipelines.quicklook`): the cell's fragments in place;
    the conditions as stored (their latent means; each sample was conditioned on its own
    posterior draw around them), then per generated modality the real one (where the store has
    it), the samples, and with several samples their mean and std. Stored latents are decoded
    fragment by fragment, as they were encoded; generated canvases whole."""
    from pipelines.quicklook import cell_rows, write_quicklook

    rows_of = sample_rows_of(batch.cells, batch.frags, n_samples) if seamless else {}
    images = {m: bound.pictures(arrays[m], m, **rows_of) for m in generated}  # (B * n, 256, 256, 3)
    real_images = {m: (valid, bound.pictures(moment_means(torch.from_numpy(moms)))) for m, (valid, moms) in real.items()}
    cells = np.asarray(batch.cells)
    files = []
    for cell in dict.fromkeys(batch.cells):
        rows = np.flatnonzero(cells == cell)
        sample_rows = (rows[:, None] * n_samples + np.arange(n_samples)).ravel()
        panels = cell_rows([batch.frags[i] for i in rows],
                           {m: real_images[m][1][rows] for m in condition},
                           {m: images[m][sample_rows] for m in generated},
                           {m: (valid[rows], imgs[rows]) for m, (valid, imgs) in real_images.items() if m in generated},
                           n_samples)
        title = f"{cell}: {', '.join(generated)} generated from {', '.join(condition) or 'nothing (unconditional)'}"
        files.append(write_quicklook(out / f"{cell}.png", title, panels))
    return files


def chain_store(model_dir: str | os.PathLike, store_dir: str | os.PathLike, cells: Sequence[str], a: Sequence[str],
                b: Sequence[str], n: int, out: str | os.PathLike, options: SamplingOptions = SamplingOptions(), *,
                overwrite: bool = False) -> SampleResult:
    """The paper's looping experiment on stored fragments (:func:`model.sample.chain`): generate
    ``b`` from the real ``a`` (their latent means), then ``a`` from the generated ``b``, ``n``
    times (iteration i uses seed + i, one sample per fragment). Writes ``chain.npz``
    (``real_<M>`` and ``latent_<M>_<i>`` for every iteration's output, float16),
    ``chain.json`` and, with an offline codec, one PNG per cell: rows = fragments, columns =
    real a, real b, then each iteration's output."""
    if n < 1:
        raise MajorTomGenError(f"--n must be >= 1, got {n}")
    if set(a) & set(b) or not a or not b:
        raise MajorTomGenError(f"the two sides of a chain must be non-empty and disjoint; got {list(a)} and {list(b)}")
    inputs = (model_dir, store_dir, *local_paths(options.codec_source))
    check_output(out, overwrite=overwrite, inputs=inputs)
    bound = ModelOnStore.open(model_dir, store_dir, device=options.device, codec_source=options.codec_source)
    bound.check(list(a) + list(b), in_store=list(a) + list(b))
    table = _fragment_table(bound.store, cells, list(a) + list(b))
    cell_ids, frag_ids = table.column("grid_cell").to_pylist(), table.column("fragment_index").to_pylist()
    real = {m: bound.network_means(moment_array(table, m, np.float32), m) for m in list(a) + list(b)}
    once = replace(options, n_samples=1)

    def step(condition: dict[str, torch.Tensor], generate_modalities: list[str], iteration: int) -> dict[str, torch.Tensor]:
        arrays = sample_fragments(bound.model_dir, FragmentBatch(cell_ids, frag_ids, condition), generate_modalities,
                                  replace(once, seed=options.seed + iteration))
        return {m: torch.from_numpy(arrays[m]).float() for m in generate_modalities}

    outputs = {f"latent_{m}_{i + 1}": v for i, generated in enumerate(chain(step, {m: real[m] for m in a}, a, b, n))
               for m, v in generated.items()}
    with staged_folder(out, overwrite=overwrite, inputs=inputs, kind="chain") as tmp:
        np.savez_compressed(tmp / "chain.npz", grid_cell=np.asarray(cell_ids), fragment_index=np.asarray(frag_ids),
                            **{f"{k}": v.numpy().astype(np.float16) for k, v in
                               {**{f"real_{m}": x for m, x in real.items()}, **outputs}.items()})
        (tmp / "chain.json").write_text(json.dumps({"model": str(bound.model_dir), "store": str(store_dir), "a": list(a),
                                                    "b": list(b), "n": n, "steps": options.steps, "seed": options.seed,
                                                    "outputs": list(outputs)}, indent=1))
        files = [tmp / "chain.npz", tmp / "chain.json"]
        if bound.codec is not None:
            columns = [(real[m], m) for m in list(a) + list(b)] + [(v, key.split("_")[1]) for key, v in outputs.items()]
            whole = {"cells": cell_ids, "frags": frag_ids} if options.seamless else {}  # generated columns: as made
            files += _chain_pngs(tmp, [bound.pictures(x, m, **(whole if i >= len(real) else {}))
                                       for i, (x, m) in enumerate(columns)], cell_ids)
    return SampleResult(Path(out), len(cell_ids), [Path(out) / f.relative_to(tmp) for f in files])


def _chain_pngs(folder: Path, images: list[np.ndarray], cell_ids: list[str]) -> list[Path]:
    """One PNG per cell: a row per fragment, a column per image set (at half resolution)."""
    files = []
    for cell in dict.fromkeys(cell_ids):
        rows = [np.concatenate([im[j][::2, ::2] for im in images], axis=1) for j, c in enumerate(cell_ids) if c == cell]
        Image.fromarray(np.concatenate(rows, axis=0)).save(folder / f"{cell}.png")
        files.append(folder / f"{cell}.png")
    return files
