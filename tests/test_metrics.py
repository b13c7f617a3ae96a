"""The public metric functions against closed forms, constructed answers and reference
implementations (torchmetrics, scikit-image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from model.metrics import f_score, fid_from_features, mae, precision_recall, psnr, ssim


def features_with_moments(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n points whose sample mean and (unbiased) covariance are exactly mu and cov."""
    x = np.random.default_rng(seed).normal(size=(n, len(mu)))
    x -= x.mean(axis=0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # exact identity covariance
    return x @ np.linalg.cholesky(cov).T + mu


def test_fid_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    real = features_with_moments(mu1, np.diag(a), 400, 1)
    fake = features_with_moments(mu2, np.diag(b), 300, 2)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid_from_features(real, fake) == pytest.approx(closed, rel=1e-3)


def test_fid_of_full_covariances_matches_the_frechet_distance():
    rng = np.random.default_rng(3)
    d = 24
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cov1, cov2 = m1 @ m1.T / d + 0.1 * np.eye(d), m2 @ m2.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 1
    real, fake = features_with_moments(mu1, cov1, 500, 4), features_with_moments(mu2, cov2, 500, 5)
    root = linalg.sqrtm(cov1)  # the textbook form: tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * linalg.sqrtm(root @ cov2 @ root).real)
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-3)


def test_fid_of_a_set_with_itself_is_zero_and_matches_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(6)
    real = rng.normal(size=(300, 64)) * rng.uniform(0.5, 2, 64)
    fake = rng.normal(size=(250, 64)) + 0.3
    assert abs(fid_from_features(real, real)) < 1e-6
    assert fid_from_features(real, fake) > 10
    r, f = torch.from_numpy(real), torch.from_numpy(fake)
    reference = _compute_fid(r.mean(0), torch.cov(r.T), f.mean(0), torch.cov(f.T)).item()
    assert fid_from_features(real, fake) == pytest.approx(reference, rel=1e-6)


def test_fid_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same D"):
        fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))


def test_precision_recall_on_constructed_clouds():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 1000.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # a tight subset of the real set: every fake point is real, most real points are not covered
    subset = real[np.argsort(np.linalg.norm(real, axis=1))[:40]]
    p, r = precision_recall(real, subset)
    assert p == 1.0 and r < 0.6


def test_precision_recall_known_answer_in_one_dimension():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = np.array([[0.5], [2.5], [6.0], [20.0]])
    # k=1 radii of real: 1, 1, 1, 1, 7 -> balls [-1,1], [0,2], [1,3], [2,4], [3,17]
    # fake inside: 0.5 yes, 2.5 yes, 6 yes (ball of 10), 20 no -> precision 3/4
    # k=1 radii of fake: 2, 2, 3.5, 14 -> balls [-1.5,2.5], [0.5,4.5], [2.5,9.5], [6,34]
    # real inside: 0,1,2,3 yes, 10 yes (ball of 20) -> recall 1
    assert precision_recall(real, fake, k=1) == (0.75, 1.0)
    with pytest.raises(ValueError, match="k=3 needs more than 3 samples"):
        precision_recall(real[:3], fake, k=3)


def test_f_score():
    assert f_score(1.0, 1.0) == 1.0
    assert f_score(0.0, 0.0) == 0.0
    assert f_score(0.5, 1.0) == pytest.approx(2 / 3)


def _pairs(n=6, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = (gaussian_filter(rng.uniform(0, 255, (n, 64, 64, 3)), (0, 3, 3, 0)) * 2 - 128).clip(0, 255).astype(np.uint8)
    y = (x.astype(float) * 0.8 + rng.normal(20, 12, x.shape)).clip(0, 255).astype(np.uint8)
    return x, y


def test_psnr_ssim_mae_agree_with_scikit_image():
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

    x, y = _pairs()
    ref_psnr = [peak_signal_noise_ratio(x[i], y[i], data_range=255) for i in range(len(x))]
    ref_ssim = [structural_similarity(x[i], y[i], channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=255) for i in range(len(x))]
    np.testing.assert_allclose(psnr(y, x), ref_psnr, rtol=1e-9)
    np.testing.assert_allclose(ssim(y, x), ref_ssim, atol=1e-5)
    np.testing.assert_allclose(mae(y, x), np.abs(x.astype(float) - y).mean(axis=(1, 2, 3)))
    assert mean_squared_error(x[0], y[0]) > 0
    assert np.isinf(psnr(x[:1], x[:1])[0]) and ssim(x[:2], x[:2]) == pytest.approx(1.0)
    grey_x, grey_y = x[..., 0], y[..., 0]  # (N, H, W) works too
    np.testing.assert_allclose(ssim(grey_y, grey_x), [structural_similarity(
        grey_x[i], grey_y[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
        for i in range(len(x))], atol=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(x[:2], x[:3])


def test_fid_with_fewer_samples_than_dimensions_takes_the_exact_shortcut():
    """With N < D the nuclear-norm path gives the same value as the D x D path."""
    from model.metrics import frechet_distance, gaussian_moments

    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(40, 256)), rng.normal(size=(30, 256)) * 1.3 + 0.2
    full = frechet_distance(*gaussian_moments(real), *gaussian_moments(fake))
    assert fid_from_features(real, fake) == pytest.approx(full, rel=1e-6)
