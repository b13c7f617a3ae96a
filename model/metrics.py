"""Generative and per-pixel metrics, as in the COP-GEN-Beta paper's Table 1.

Distribution metrics work on feature arrays ``(N, D)`` so they apply to any extractor:

- :func:`fid_from_features`: the Fréchet distance between Gaussians fitted to the two
  sets (Heusel et al. 2017): float64 moments as the standard implementation, the trace of
  the matrix square root through symmetric eigendecompositions;
- :func:`precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019) with
  k-nearest-neighbour hyperspheres, ``k=3`` as in the reference implementation;
- :func:`f_score`: their harmonic mean.

Per-pixel metrics compare paired images ``(N, H, W, C)`` (uint8, or float with
``data_range``) and return one value per image: :func:`psnr`, :func:`ssim` (Gaussian
window 11, sigma 1.5, as Wang et al. 2004; through torchmetrics) and :func:`mae`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def gaussian_moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, float64) of features ``(N, D)``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D); got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     ) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` for two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"moment shapes differ: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S1 S2)^(1/2))`` for symmetric positive semi-definite ``S1``, ``S2``.

    ``S1 S2`` is similar to the symmetric ``S1^(1/2) S2 S1^(1/2)``, so the trace is the sum
    of the square roots of that matrix's eigenvalues: two symmetric eigendecompositions,
    several times faster than ``scipy.linalg.sqrtm`` on 2048x2048 and free of its complex
    round-off (tiny negative eigenvalues of rank-deficient covariances are clipped to 0)."""
    w, v = linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eig = linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets ``(N, D)`` and ``(M, D)`` (any extractor; with
    Inception pool3 features it is the standard FID)."""
    real, fake = np.asarray(real), np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D; got {real.shape} and {fake.shape}")
    (mu1, sigma1), (mu2, sigma2) = gaussian_moments(real), gaussian_moments(fake)
    n, m, d = len(real), len(fake), real.shape[1]
    if max(n, m) >= d:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    # Fewer samples than dimensions: with centred A (n, D), B (m, D), S1 S2 = A'A B'B / ((n-1)(m-1))
    # has the nonzero eigenvalues of (A B')(A B')', so tr((S1 S2)^1/2) is the nuclear norm of A B'
    # (an n x m matrix) -- exact, and far cheaper than D x D decompositions.
    a, b = real - mu1, fake - mu2
    trace_sqrt = linalg.svdvals(a @ b.T).sum() / np.sqrt((n - 1) * (m - 1))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    radii = []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start:start + chunk], x)
        # the k+1-th smallest distance, since each point is its own nearest neighbour (0)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each point, whether it lies inside any hypersphere (centre, radius)."""
    inside = []
    for start in range(0, points.shape[0], chunk):
        d = torch.cdist(points[start:start + chunk], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, *, chunk: int = 1024,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` (features ``(N, D)``).

    Precision: the share of fake samples inside the real manifold (the union of balls around
    each real sample reaching its k-th nearest real neighbour); recall: the share of real
    samples inside the fake manifold. Distances are Euclidean, computed in float64 on
    ``device`` (the GPU when available) in chunks of ``chunk`` rows."""
    real, fake = np.asarray(real), np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D; got {real.shape} and {fake.shape}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set "
                         f"(got {len(real)} real, {len(fake)} generated)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    r = torch.as_tensor(real, dtype=torch.float64, device=dev)
    f = torch.as_tensor(fake, dtype=torch.float64, device=dev)
    precision = _covered(f, r, _kth_neighbour_radii(r, k, chunk), chunk).double().mean().item()
    recall = _covered(r, f, _kth_neighbour_radii(f, k, chunk), chunk).double().mean().item()
    return precision, recall


def f_score(precision: float, recall: float, beta: float = 1.0) -> float:
    """The F-beta score of a precision and a recall (0 when both are 0)."""
    b2 = beta * beta
    denominator = b2 * precision + recall
    return float((1 + b2) * precision * recall / denominator) if denominator > 0 else 0.0


def _as_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C) or (N, H, W); got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).to(torch.float64)


def _check_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_nchw(a), _as_nchw(b)
    if x.shape != y.shape:
        raise ValueError(f"paired images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(images: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio (dB) of each image against its reference; ``(N,)``.
    Identical images give ``inf``."""
    x, y = _check_pair(images, reference)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return (10 * torch.log10(data_range**2 / mse)).numpy()


def mae(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean absolute error of each image against its reference, in pixel units; ``(N,)``."""
    x, y = _check_pair(images, reference)
    return (x - y).abs().mean(dim=(1, 2, 3)).numpy()


def ssim(images: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Structural similarity of each image against its reference (Wang et al. 2004:
    Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03), averaged over channels and the valid
    region (the 5-pixel border, where the window leaves the image, is excluded as in the
    original definition and scikit-image); ``(N,)``. Runs batched through torchmetrics."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _check_pair(images, reference)  # float32 is exact enough for 8-bit data and ~10x faster
    _, full = structural_similarity_index_measure(x.float(), y.float(), data_range=data_range, reduction="none",
                                                  return_full_image=True)
    border = 5
    return full[..., border:-border, border:-border].mean(dim=(1, 2, 3)).double().numpy()


def mean_abs_gradient(images: np.ndarray) -> float:
    """Mean |difference| of horizontally and vertically neighbouring pixels of uint8 images
    ``(..., H, W, C)``, in 8-bit units: how rough an image set is (speckle and blocks raise it)."""
    x = np.asarray(images, np.float32)
    return float((np.abs(np.diff(x, axis=-2)).mean() + np.abs(np.diff(x, axis=-3)).mean()) / 2)


def seam_ratio(mosaics: np.ndarray, tile: int = 256, width: int = 1) -> float:
    """How visible the borders between ``tile`` px tiles of mosaics ``(N, H, W, C)`` (or
    ``(N, H, W)``) are, channels averaged first.

    ``width=1`` (the pixel seam): the mean |difference| of the pixel pairs straddling every
    internal border (rows and columns), divided by the same statistic one pixel inside (the
    pairs just before and just after the border). ``width=w > 1`` (a tone seam): the mean
    |difference| between the means of the ``w`` px strips on either side of each border,
    divided by the same statistic across the lines ``4 w`` px inside the tiles. The pixel seam
    misses a step that a decoder has smoothed into a ramp a few pixels wide; the tone seam
    catches it. Both are about 1 for a real product cut into fragments, large when every
    tile was made on its own."""
    x = np.asarray(mosaics, np.float32)
    x = x.mean(axis=-1) if x.ndim == 4 else x
    inside = 1 if width == 1 else 4 * width
    if x.ndim != 3 or (x.shape[1] <= tile and x.shape[2] <= tile) or inside + width > tile // 2:
        raise ValueError(f"mosaics must be (N, H, W[, C]) larger than one {tile} px tile, with width {width} << tile; "
                         f"got shape {np.shape(mosaics)}")
    across, within = [], []
    for axis in (1, 2):
        def jump(line: int) -> float:  # between the strips [line - width, line) and [line, line + width)
            before = np.take(x, range(line - width, line), axis=axis).mean(axis=axis)
            after = np.take(x, range(line, line + width), axis=axis).mean(axis=axis)
            return float(np.abs(after - before).mean())
        for k in range(tile, x.shape[axis] - 1, tile):
            across.append(jump(k))
            within.append((jump(k - inside) + jump(k + inside)) / 2)
    return float(np.mean(across) / max(np.mean(within), 1e-12))


def border_seam_ratio(image: np.ndarray, owner: np.ndarray) -> float:
    """How visible the borders between the parts of a mosaic are when the parts do not lie on
    a regular tiling (e.g. neighbouring grid cells): ``image`` ``(H, W[, C])`` (channels
    averaged first), ``owner`` int ``(H, W)``, the part each pixel comes from (-1: none). The
    mean |difference| of the pixel pairs across a change of owner (rows and columns), divided
    by the same statistic of the pairs one pixel further on either side when those lie
    within one part. About 1 when the parts continue each other, large when they do not."""
    x = np.asarray(image, np.float32)
    x = x.mean(axis=-1) if x.ndim == 3 else x
    owner = np.asarray(owner)
    if x.shape != owner.shape or x.ndim != 2:
        raise ValueError(f"image {np.shape(image)} and owner {owner.shape} must be (H, W[, C]) and (H, W)")
    across, within = [], []
    for a in (x, x.T):
        o = owner if a is x else owner.T
        d = np.abs(np.diff(a, axis=1))  # pair (i, i + 1) along rows
        same = (o[:, 1:] == o[:, :-1]) & (o[:, 1:] >= 0)
        border = (o[:, 1:] != o[:, :-1]) & (o[:, 1:] >= 0) & (o[:, :-1] >= 0)
        across.append(d[border])
        before = np.zeros_like(border)
        before[:, 1:] = border[:, 1:] & same[:, :-1]  # pair (i - 1, i) before a border pair (i, i + 1)
        after = np.zeros_like(border)
        after[:, :-1] = border[:, :-1] & same[:, 1:]  # pair (i + 1, i + 2) after it
        within += [d[:, :-1][before[:, 1:]], d[:, 1:][after[:, :-1]]]
    across_all, within_all = np.concatenate(across), np.concatenate(within)
    if not len(across_all) or not len(within_all):
        raise ValueError("the mosaic has no border between two parts")
    return float(across_all.mean() / max(within_all.mean(), 1e-12))
