"""Evaluate a model on a store's held-out cells the way the COP-GEN-Beta paper does (Table 1).

For every condition set (``none`` = unconditional, ``S1RTC``, ``S2L1C+S2L2A``, ...) the model
generates every other modality for each test fragment; generated and real images are
decoded with the store's codec to 256x256 RGB thumbnails and compared:

- distribution metrics per generated modality: FID on Inception-v3 pool3 features,
  improved precision / recall (k-NN manifolds, ``k``) and their F-score on DINOv2 features,
  with the first sample of each fragment against the real images of all test fragments;
- paired metrics: PSNR, SSIM and MAE of the first sample against the fragment's real image,
  the best PSNR of the ``n_samples`` samples and their spread (per-pixel standard deviation
  across samples, mean over the image, in 8-bit units); for the unconditional row too, so
  that each conditional row reports what its conditions buy (``mae_change``, ``psnr_gain``:
  relative MAE change and PSNR difference against the unconditional samples of the same
  fragments), and ``gradient_ratio``: the mean absolute gradient (roughness: speckle, blocks)
  of the first samples over that of the real images (1 = as smooth as the real data);
- seams, on the cells whose 16 fragments are all evaluated: the pixel and tone seam ratios
  (:func:`model.metrics.seam_ratio`) of the cells' mosaics of first samples, beside those of
  the real mosaics (about 1: no visible fragment borders; the codec's reconstructions, decoded
  fragment by fragment, carry its edge effects at every border: compare with ``real_source``).

Generated images are decoded as they were made: with ``seamless`` (the default, as
``generate``) a whole cell is one canvas, generated and decoded whole; otherwise fragment by
fragment. Note that a seamless cell is one draw, not 16: its fragments share their tone, so
comparisons of paired metrics between the two modes need many cells.

"Real" images are by default the codec's reconstruction of each fragment's stored latent
mean (the store keeps latents, not pixels), so the metrics measure the generative model, not
the codec (the codec's own PSNR is reported by ``ingest`` and in the store manifest). With
``real_source`` they are the thumbnail fragments read straight from the Major TOM shards, as
the paper compares them (the FID Inception resizes with TF1's bilinear rule, as
torch-fidelity does). Every table states N (fragments and samples).

Test cells: the model's held-out cells (its ``training_data.json``); when its training cells
are unknown (converted published weights without ``--training-cells``) every store cell is
used and every output says so loudly; ``exclude_cells`` removes known training cells (e.g.
the official ``train_metadata.parquet``).

Features and paired metrics of each image set are cached under ``cache_dir`` by a key of
everything that determines them (model weights, codec, fragments, seed, steps, extractor
fingerprint), so a killed evaluation resumes where it stopped and gives the same numbers.
Outputs (``metrics.csv``, ``table1.md``, ``metrics.json``, ``plots/``) are staged and moved
into place complete.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from majortom_gen.errors import MajorTomGenError
from majortom_gen.modalities import parse_modalities
from majortom_gen.staging import atomic_path, check_output, local_paths, staged_folder
from majortom_gen.store import LatentStore, load_aligned
from model import metrics
from model.codecs import Codec, moment_means
from model.features import DINOV2_DEFAULT, INCEPTION_DEFAULT, FeatureExtractor, load_extractor
from pipelines.cell_canvas import canvas_groups, tile
from pipelines.guidance import GUIDANCE_DEFAULT, GUIDANCE_MIN_SIGMA
from pipelines.model_folder import ModelOnStore, model_record
from pipelines.sample import FragmentBatch, SamplingOptions, condition_latents, sample_fragments, sample_rows_of

DISTRIBUTION_METRICS = ("fid", "precision", "recall", "f_score")
PAIRED_METRICS = ("psnr", "ssim", "mae", "psnr_best", "spread", "gradient_ratio")
CONDITIONING_METRICS = ("mae_change", "psnr_gain")  # against the unconditional row
# borders between fragments in the mosaics of whole cells (first samples), generated vs real
SEAM_METRICS = ("seam_ratio", "seam_ratio_real", "tone_seam_ratio", "tone_seam_ratio_real")
TONE_SEAM_PX = 8  # strip width of the tone seam (one latent pixel)
LOWER_IS_BETTER = {"fid", "mae", "mae_change"}


@dataclass
class EvalOptions:
    conditions: tuple[tuple[str, ...], ...] = ((), ("DEM",), ("S1RTC",), ("S2L1C",), ("S2L2A",))
    generate: tuple[str, ...] | None = None  # modalities to generate and score; default: all but the condition's
    split: str = "test"  # 'test' | 'train' | 'all'
    n_samples: int = 1
    steps: int = 50
    guidance: float = GUIDANCE_DEFAULT  # classifier-free guidance weight on the conditions
    seed: int = 0
    k: int = 3
    max_fragments: int | None = None
    batch_size: int = 32
    fid_extractor: str = INCEPTION_DEFAULT
    pr_extractor: str = DINOV2_DEFAULT
    codec: str | None = None  # codec name; default: the store's
    codec_source: str | None = None  # default: STORE/codec for patch-pca
    deterministic_conditions: bool = False
    cache_dir: str | None = None  # default: STORE/cache/eval
    device: str | None = None
    exclude_cells: tuple[str, ...] = ()  # never evaluated on (e.g. the published weights' training cells)
    real_source: str | None = None  # real images straight from these Major TOM shards (default: codec reconstruction)
    seamless: bool = True  # whole cells generated (and decoded) as one canvas; False: fragment by fragment
    overwrite: bool = False  # replace an earlier evaluation in ``out``

    def sampling(self, device: str) -> SamplingOptions:
        """The sampling settings of the generated sets."""
        return SamplingOptions(n_samples=self.n_samples, steps=self.steps, guidance=self.guidance, seed=self.seed,
                               deterministic_conditions=self.deterministic_conditions, batch_size=self.batch_size,
                               device=device, codec_source=self.codec_source, seamless=self.seamless)


@dataclass
class EvalResult:
    out: Path
    rows: list[dict]
    fragments: int
    files: list[Path] = field(default_factory=list)


def offline_extractors(folder: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Randomly initialised extractors saved under ``folder`` (no network): for demos and
    tests only; their numbers compare runs with the same extractors, nothing else."""
    from model.features import save_random_extractors

    return save_random_extractors(folder, seed=seed)


def parse_conditions(text: str | Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """``"none,DEM,S2L1C+S2L2A"`` -> ``((), ("DEM",), ("S2L1C", "S2L2A"))``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        out.append(() if item.lower() in ("none", "unconditional") else tuple(parse_modalities(item.replace("+", ","))))
    if not out:
        raise MajorTomGenError("no condition sets given (e.g. --conditions none,S1RTC,S2L1C+S2L2A)")
    return tuple(dict.fromkeys(out))


def condition_name(cond: Sequence[str]) -> str:
    return "+".join(cond) if cond else "none"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:20]


def _open_codec(bound: ModelOnStore, options: EvalOptions) -> Codec:
    """The codec that made the store's latents (:func:`pipelines.codec.open_store_codec`)."""
    if options.codec and options.codec != bound.store.codec["name"]:
        raise MajorTomGenError(f"the store's latents were made by {bound.store.codec['name']}, not {options.codec}")
    return bound.require_codec()


UNKNOWN_TRAINING_CELLS = ("the training cells of {model} are unknown (e.g. the published weights), so every store cell not "
                          "given to --exclude-cells is evaluated and some may have been seen in training. For the "
                          "published weights pass --exclude-cells train_metadata.parquet (written by the official data "
                          "preparation), or record it with convert-weights --training-cells.")


class TrainingCellsWarning(UserWarning):
    """The evaluated model does not record its training cells."""


def _source_images(source: str, store: LatentStore, cells: list[str], frags: list[int],
                   modalities: list[str]) -> dict[str, np.ndarray]:
    """The real thumbnail fragments of (``cells[i]``, ``frags[i]``) read from the Major TOM
    shards under ``source`` (uint8 ``(N, 256, 256, 3)`` per modality), checking that the source
    chooses the same products as the store holds."""
    from majortom_gen.selection import select
    from pipelines.ingest import read_fragments

    unique = sorted(set(cells))
    selection = select(source, unique, tuple(modalities))
    chosen = {(r.grid_cell, r.modality): r.product_id for r in selection.products.itertuples()}
    stored = store.table(["grid_cell"] + [f"{m}_product_id" for m in modalities], cells=unique).to_pandas()
    stored = stored.drop_duplicates("grid_cell").set_index("grid_cell")
    differ = [f"{c} {m}" for c in unique for m in modalities
              if chosen.get((c, m)) is not None and chosen.get((c, m)) != stored.at[c, f"{m}_product_id"]]
    if differ:
        raise MajorTomGenError(f"--real-source {source}: its default product choice differs from the store's for "
                               f"{len(differ)} cell/modality pair(s) (first: {differ[:3]}); give the source the store was "
                               "ingested from")
    images = read_fragments(selection, unique, store.manifest["fragment_mode"])
    out = {}
    for m in modalities:
        lacking = [c for c in unique if c not in images.get(m, {})]
        if lacking:
            raise MajorTomGenError(f"--real-source {source}: no readable {m} thumbnail for {lacking[:5]}")
        out[m] = np.stack([images[m][c][f] for c, f in zip(cells, frags)])
    return out


class _Cache:
    """npz files keyed by content digests under one folder; writes are atomic."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``; None when absent or unreadable (a truncated or
        corrupt entry is removed and counts as a miss)."""
        path = self.folder / f"{key}.npz"
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            warnings.warn(f"evaluation cache entry {path} is unreadable ({exc}); recomputing it", stacklevel=2)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        with atomic_path(self.folder / f"{key}.npz") as tmp:
            np.savez(tmp, **arrays)


@dataclass
class EvalFragments:
    """The fragments evaluated: ``cells[i]``, ``frags[i]``, their stored moments ``(N, 8, 32,
    32)`` per modality, the cells left out, and the split they come from."""

    cells: list[str]
    frags: list[int]
    moments: dict[str, torch.Tensor]
    left_out: set[str]
    training_cells_known: bool
    test_fraction: float
    split_seed: int


def evaluate(model_dir: str | os.PathLike, store_dir: str | os.PathLike, out: str | os.PathLike,
             options: EvalOptions | None = None,
             progress: Callable[[int, int, str], None] | None = None) -> EvalResult:
    """Run the Table-1 evaluation and write ``out/{metrics.csv, table1.md, metrics.json, plots/}``.
    ``progress(done, total, note)`` is called after each batch of generated fragments."""
    opts = options or EvalOptions()
    inputs = (model_dir, store_dir, opts.cache_dir, *local_paths(opts.codec_source, opts.real_source))
    check_output(out, overwrite=opts.overwrite, inputs=inputs)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bound = ModelOnStore.open(model_dir, store_dir, device=str(device), codec_source=opts.codec_source)
    modalities = [m for m in bound.modalities if m in bound.store.modalities]
    targets = _check_request(bound, modalities, opts)
    chosen = _evaluation_fragments(bound, modalities, opts)
    codec = _open_codec(bound, opts)
    extractors = {"fid": load_extractor("inception", opts.fid_extractor, device),
                  "pr": load_extractor("dinov2", opts.pr_extractor, device)}
    cache = _Cache(Path(opts.cache_dir) if opts.cache_dir else bound.store_dir / "cache" / "eval")
    base_key = (codec.info()["config_hash"], codec.source, bound.store.manifest["shards"], str(device), chosen.cells,
                chosen.frags, {m: n.as_dict() for m, n in bound.norms.items()},
                extractors["fid"].fingerprint, extractors["pr"].fingerprint,
                opts.real_source or "codec reconstruction, fragment by fragment")  # the real images' definition: both keys
    real = _real_set(bound, chosen, targets, extractors, cache, base_key, opts)
    rows = _score_conditions(bound, chosen, targets, extractors, real, cache, base_key, opts, progress)
    settings = {**asdict(opts), "conditions": [condition_name(c) for c in opts.conditions], "model": str(bound.model_dir),
                "store": str(bound.store_dir), "codec": codec.info()["name"], "fragments": len(chosen.cells),
                "cells": sorted(set(chosen.cells)), "test_fraction": chosen.test_fraction, "split_seed": chosen.split_seed,
                "device": str(device),
                "extractors": {k: {"kind": e.kind, "source": e.source, "fingerprint": e.fingerprint} for k, e in extractors.items()},
                "real_images": (f"thumbnail fragments read from the shards under {opts.real_source}" if opts.real_source
                                else "codec reconstruction of each fragment's stored latent mean"),
                "training_cells": "recorded with the model" if chosen.training_cells_known else "unknown",
                "excluded_cells": sorted(chosen.left_out)}
    with staged_folder(out, overwrite=opts.overwrite, inputs=inputs, kind="evaluate") as tmp:
        files = write_outputs(tmp, rows, settings)
    out = Path(out)
    return EvalResult(out, rows, len(chosen.cells), [out / f.relative_to(tmp) for f in files])


def _check_request(bound: ModelOnStore, modalities: list[str], opts: EvalOptions) -> list[str]:
    """Refuse conditions and modalities the model or the store lacks; returns the modalities to score."""
    unknown = [m for m in opts.generate or () if m not in modalities]
    if unknown:
        raise MajorTomGenError(f"--generate {','.join(unknown)}: not a modality of both the model ({bound.modalities}) "
                               f"and the store ({sorted(bound.store.modalities)})")
    targets = [m for m in modalities if opts.generate is None or m in opts.generate]
    for cond in opts.conditions:
        unknown = [m for m in cond if m not in bound.modalities]
        if unknown:
            raise MajorTomGenError(f"condition {condition_name(cond)}: the model does not know {unknown}; it models {bound.modalities}")
        absent = [m for m in cond if m not in modalities]
        if absent:
            raise MajorTomGenError(f"condition {condition_name(cond)}: the store has no {absent}")
        if not [m for m in targets if m not in cond]:
            raise MajorTomGenError(f"condition {condition_name(cond)} leaves nothing to generate (of {targets})")
    if opts.split not in ("test", "train", "all"):
        raise MajorTomGenError(f"split must be test, train or all; got {opts.split!r}")
    return targets


def _evaluation_fragments(bound: ModelOnStore, modalities: list[str], opts: EvalOptions) -> EvalFragments:
    """The fragments of the split having every modality, less the model's training cells
    (for the test split) and ``exclude_cells``; warns when the training cells are unknown."""
    record = model_record(bound.model_dir)  # the test fraction and split seed it was trained with: its held-out cells
    test_fraction, split_seed = float(record.get("test_fraction", 0.05)), int(record.get("split_seed", 0))
    train_cells = record.get("train_cells")
    known = train_cells is not None and record.get("train_cells_complete", not record.get("init_from"))
    if opts.split == "train" and "split_seed" not in record:
        raise MajorTomGenError(f"--split train: the model {bound.model_dir} was not trained here, its training split of "
                               "this store is unknown; use --split test (every cell, with --exclude-cells) or all")
    if "split_seed" in record or opts.split != "test":  # trained here: its held-out cells
        arrays = load_aligned(bound.store, modalities, split=None if opts.split == "all" else opts.split,
                              test_fraction=test_fraction, seed=split_seed)
    else:  # converted weights: no split of this store means anything, use every cell
        arrays = load_aligned(bound.store, modalities)
    if not known:
        warnings.warn(UNKNOWN_TRAINING_CELLS.format(model=bound.model_dir), TrainingCellsWarning, stacklevel=3)
    leave_out = set(opts.exclude_cells) | (set(train_cells or ()) if opts.split == "test" else set())
    leave_out &= set(arrays.grid_cell.tolist())  # (recorded: the ones this store has)
    keep = ~np.isin(arrays.grid_cell, sorted(leave_out))
    n = int(keep.sum()) if opts.max_fragments is None else min(int(keep.sum()), opts.max_fragments)
    if n <= opts.k:
        raise MajorTomGenError(f"{bound.store_dir}: the {opts.split} split has {int(keep.sum())} fragment(s) with all of "
                               f"{modalities}; precision/recall with k={opts.k} needs more than {opts.k}")
    rows = np.flatnonzero(keep)[:n]
    return EvalFragments([str(c) for c in arrays.grid_cell[rows]], [int(f) for f in arrays.fragment_index[rows]],
                         {m: torch.from_numpy(np.asarray(arrays.moments[m][rows], np.float32)) for m in modalities},
                         leave_out, known, test_fraction, split_seed)


def _real_set(bound: ModelOnStore, chosen: EvalFragments, targets: list[str], extractors, cache: "_Cache", base_key,
              opts: EvalOptions) -> dict[str, np.ndarray]:
    """The real images of every target (the codec's reconstruction of each stored latent mean,
    or the shards' thumbnails) and their features, cached."""
    key = _digest("real", "seams", bound.store.manifest["shards"], targets, *base_key)
    real = cache.get(key)
    if real is not None:
        return real
    real = {}
    source = (_source_images(opts.real_source, bound.store, chosen.cells, chosen.frags, targets)
              if opts.real_source else {})
    for m in targets:
        images = source[m] if opts.real_source else bound.pictures(moment_means(chosen.moments[m]))
        real[f"images_{m}"] = images
        real[f"fid_{m}"] = extractors["fid"](images, opts.batch_size)
        real[f"pr_{m}"] = extractors["pr"](images, opts.batch_size)
        real[f"seams_{m}"] = cell_seams(images, chosen.cells, chosen.frags)
    cache.put(key, real)
    return real


def _score_conditions(bound: ModelOnStore, chosen: EvalFragments, targets: list[str], extractors, real, cache: "_Cache",
                      base_key, opts: EvalOptions, progress) -> list[dict]:
    """One metrics row per condition set and generated modality (generated sets cached)."""
    model_digest = _folder_digest(bound.model_dir)
    n, total, done, rows = len(chosen.cells), len(chosen.cells) * len(opts.conditions), 0, []
    for cond in opts.conditions:
        generated = [m for m in targets if m not in cond]
        key = _digest("generated", "per-sample condition draws", "gradient", "canvas decode", "seams", opts.seamless, model_digest, condition_name(cond), generated, opts.seed,
                      opts.steps, opts.n_samples, opts.deterministic_conditions, *base_key,
                      *(("guidance", opts.guidance, GUIDANCE_MIN_SIGMA) if opts.guidance and cond else ()))
        result = cache.get(key)
        if result is None:
            tick = (lambda k, done=done, cond=cond: progress(done + k, total, condition_name(cond))) if progress else None
            result = _generate_set(bound, extractors, chosen, real, cond, generated, opts, tick)
            cache.put(key, result)
        done += n
        if progress:
            progress(done, total, condition_name(cond))
        rows += [_metrics_row(cond, m, real, result, opts.k, opts.n_samples) for m in generated]
    add_conditioning_gains(rows)
    return rows


def _generate_set(bound: ModelOnStore, extractors: dict[str, FeatureExtractor], chosen: EvalFragments, real,
                  cond, generated, opts: EvalOptions, tick) -> dict[str, np.ndarray]:
    """Generate ``generated`` given ``cond`` for every fragment, exactly as ``majortom-gen
    sample`` does (the same per-fragment-sample draws: each sample its own condition draw;
    whole cells on one canvas unless ``seamless`` is off); returns per modality the features
    of the first samples and the per-fragment paired metrics."""
    n, total = opts.n_samples, len(chosen.cells)
    condition = condition_latents({m: chosen.moments[m] for m in cond}, bound.norms, chosen.cells, chosen.frags,
                                  opts.seed, opts.deterministic_conditions, n)
    out = sample_fragments(bound.model_dir, FragmentBatch(chosen.cells, chosen.frags, condition), generated,
                           opts.sampling(bound.device), progress=(lambda done, _: tick(done)) if tick else None)
    rows_of = sample_rows_of(chosen.cells, chosen.frags, n) if opts.seamless else {}  # decoded as generated
    parts: dict[str, list[np.ndarray]] = {}
    for m in generated:
        images = bound.pictures(out[m], m, **rows_of).reshape(total, n, 256, 256, 3)
        for start in range(0, total, opts.batch_size):
            stop = min(start + opts.batch_size, total)
            for k, v in _paired_values(m, images[start:stop], real[f"images_{m}"][start:stop], extractors,
                                       opts.batch_size).items():
                parts.setdefault(k, []).append(v)
        parts[f"seams_{m}"] = [cell_seams(images[:, 0], chosen.cells, chosen.frags)]
        del images
    return {k: np.concatenate(v) for k, v in parts.items()}


def cell_seams(images: np.ndarray, cells: Sequence[str], frags: Sequence[int]) -> np.ndarray:
    """``[pixel seam ratio, tone seam ratio]`` (:func:`model.metrics.seam_ratio`, tone strips of
    :data:`TONE_SEAM_PX`) of the mosaics of the complete cells among fragment pictures ``images``
    ``(N, 256, 256, 3)`` (rows ``cells[i]``, ``frags[i]``); NaN when no cell is complete."""
    groups, _ = canvas_groups(cells, frags)
    if not groups:
        return np.full(2, np.nan)
    mosaics = np.stack([tile(torch.from_numpy(images[rows]).permute(0, 3, 1, 2))[0].permute(1, 2, 0).numpy()
                        for rows in groups])
    return np.array([metrics.seam_ratio(mosaics), metrics.seam_ratio(mosaics, width=TONE_SEAM_PX)])


def _paired_values(m: str, images: np.ndarray, reference: np.ndarray, extractors, batch: int) -> dict[str, np.ndarray]:
    """Features of the first samples and the paired metrics of ``images`` ``(b, n_samples,
    256, 256, 3)`` against ``reference`` ``(b, 256, 256, 3)``, per fragment."""
    first = images[:, 0]
    psnrs = np.stack([metrics.psnr(images[:, s], reference) for s in range(images.shape[1])], axis=1)
    return {f"fid_{m}": extractors["fid"](first, batch), f"pr_{m}": extractors["pr"](first, batch),
            f"psnr_{m}": psnrs[:, 0], f"ssim_{m}": metrics.ssim(first, reference), f"mae_{m}": metrics.mae(first, reference),
            f"psnr_best_{m}": psnrs.max(axis=1), f"spread_{m}": images.astype(np.float32).std(axis=1).mean(axis=(1, 2, 3)),
            f"gradient_{m}": np.array([metrics.mean_abs_gradient(image) for image in first])}


def _finite_mean(values: np.ndarray) -> float:
    v = np.asarray(values, np.float64)
    v = np.where(np.isinf(v), 100.0, v)  # identical images: cap PSNR at 100 dB
    return float(v.mean())


def _metrics_row(cond, m, real, result, k: int, n_samples: int) -> dict:
    precision, recall = metrics.precision_recall(real[f"pr_{m}"], result[f"pr_{m}"], k=k)
    row = {"condition": condition_name(cond), "modality": m, "n": int(len(result[f"fid_{m}"])),
           "fid": metrics.fid_from_features(real[f"fid_{m}"], result[f"fid_{m}"]),
           "precision": precision, "recall": recall, "f_score": metrics.f_score(precision, recall)}
    for name in PAIRED_METRICS[:-1]:
        applies = n_samples > 1 or name not in ("psnr_best", "spread")
        row[name] = _finite_mean(result[f"{name}_{m}"]) if applies else math.nan
    real_roughness = metrics.mean_abs_gradient(real[f"images_{m}"])
    row["gradient_ratio"] = float(result[f"gradient_{m}"].mean()) / real_roughness if real_roughness > 0 else math.nan
    (row["seam_ratio"], row["tone_seam_ratio"]), (row["seam_ratio_real"], row["tone_seam_ratio_real"]) = (
        result[f"seams_{m}"].tolist(), real[f"seams_{m}"].tolist())
    return row


def add_conditioning_gains(rows: list[dict]) -> None:
    """What conditioning buys, on every row: ``mae_change`` = relative change of the paired
    MAE against the unconditional row of the same modality (-0.3 = 30% lower), ``psnr_gain``
    = PSNR difference in dB (NaN without an unconditional row)."""
    none = {r["modality"]: r for r in rows if r["condition"] == "none"}
    for r in rows:
        base = none.get(r["modality"])
        r["mae_change"] = (r["mae"] - base["mae"]) / base["mae"] if base and base["mae"] > 0 else math.nan
        r["psnr_gain"] = r["psnr"] - base["psnr"] if base else math.nan


def _fmt(value: float, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if metric == "mae_change":
        return f"{100 * value:+.1f}%"
    if metric == "psnr_gain":
        return f"{value:+.2f}"
    return (f"{value:.2f}" if metric in ("fid", "psnr", "psnr_best", "mae", "spread", "gradient_ratio", *SEAM_METRICS)
            else f"{value:.3f}")


def _direction(metric: str) -> str:
    return "≈1" if metric == "gradient_ratio" or metric in SEAM_METRICS else "↓" if metric in LOWER_IS_BETTER else "↑"


def table_markdown(rows: list[dict], metrics_shown: Sequence[str], modalities: Sequence[str]) -> str:
    """Rows: condition; columns: modality x metric ('—' where the modality is a condition)."""
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    by = {(r["condition"], r["modality"]): r for r in rows}
    head = ["condition"] + [f"{m} {name.upper() if name == 'fid' else name}{_direction(name)}"
                            for m in modalities for name in metrics_shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in conditions:
        cells = [c]
        for m in modalities:
            row = by.get((c, m))
            cells += [_fmt(row[name], name) if row else "—" for name in metrics_shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _guidance_words(w: float) -> str:
    return (f"classifier-free guidance {w:g} on the conditions (noise levels sigma >= {GUIDANCE_MIN_SIGMA:g})" if w
            else "no guidance")


def write_outputs(folder: Path, rows: list[dict], settings: dict) -> list[Path]:
    """``metrics.csv`` (one row per condition and modality), ``table1.md``, ``metrics.json``
    and one bar chart per metric under ``plots/``."""
    modalities = list(dict.fromkeys(r["modality"] for r in sorted(rows, key=lambda r: r["modality"])))
    columns = ["condition", "modality", "n", *DISTRIBUTION_METRICS, *PAIRED_METRICS, *CONDITIONING_METRICS, *SEAM_METRICS]
    csv_path = folder / "metrics.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in columns})
    count = f"N = {settings['fragments']} fragments, {settings['n_samples']} sample(s) each"
    warning = ([f"**Warning**: {UNKNOWN_TRAINING_CELLS.format(model=settings['model'])}", ""]
               if settings.get("training_cells") == "unknown" else [])
    extractor_note = ("Feature extractors: " + "; ".join(f"{k}: {e['kind']} from {e['source']}" for k, e in settings["extractors"].items()))
    md = [f"# Evaluation: {settings['model']}", "",
          f"{settings['fragments']} fragments of {len(settings['cells'])} {settings['split']} cell(s); "
          f"{settings['n_samples']} sample(s) per fragment, {settings['steps']} DPM-Solver++ steps, "
          f"{_guidance_words(settings.get('guidance', 0.0))}, seed {settings['seed']}.",
          f"Real images: {settings['real_images']}.", extractor_note, "", *warning,
          f"## Generative metrics (FID on Inception features; precision, recall, F-score on DINOv2 features, "
          f"k={settings['k']}; {count}, the first sample of each scored)", "",
          table_markdown(rows, DISTRIBUTION_METRICS, modalities), "",
          f"## Paired metrics against the real fragment of the same place (spread in 8-bit units; gradient_ratio: "
          f"roughness of the samples over the real images'; {count})", "",
          table_markdown(rows, PAIRED_METRICS, modalities), "",
          "## What conditioning buys: paired MAE change and PSNR gain against the unconditional samples "
          f"of the same fragments ({count})", "", table_markdown([r for r in rows if r["condition"] != "none"], CONDITIONING_METRICS,
                                                     modalities), "",
          "## Seams: fragment borders in the mosaics of whole cells (pixel seam: |difference| across a border over "
          f"one pixel inside; tone seam: the same for the means of {TONE_SEAM_PX} px strips, over {4 * TONE_SEAM_PX} px "
          "inside; about 1 = no visible border; generated first samples beside the real mosaics)", "",
          table_markdown(rows, SEAM_METRICS, modalities), ""]
    md_path = folder / "table1.md"
    md_path.write_text("\n".join(md))
    json_path = folder / "metrics.json"
    json_path.write_text(json.dumps({"settings": settings, "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                                     for k, v in r.items()} for r in rows]}, indent=1))
    return [csv_path, md_path, json_path] + _plots(folder / "plots", rows, modalities)


def _plots(folder: Path, rows: list[dict], modalities: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    by = {(r["condition"], r["modality"]): r for r in rows}
    files = []
    width = 0.8 / max(len(conditions), 1)
    for name in DISTRIBUTION_METRICS + PAIRED_METRICS:
        fig, ax = plt.subplots(figsize=(1.8 * len(modalities) + 2, 3.5))
        for i, c in enumerate(conditions):
            values = [by[(c, m)][name] if (c, m) in by else math.nan for m in modalities]
            ax.bar(np.arange(len(modalities)) + i * width, values, width, label=c)
        ax.set_xticks(np.arange(len(modalities)) + width * (len(conditions) - 1) / 2, modalities)
        ax.set_ylabel(name + (" (lower is better)" if name in LOWER_IS_BETTER else ""))
        ax.legend(title="condition", fontsize=7)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files
