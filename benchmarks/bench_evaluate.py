"""Evaluation benchmarks, figures as ratios to baselines measured in the same run.

    python benchmarks/bench_evaluate.py [--images 64] [--fragments 1000] [--quick]

1. Feature extraction, images/s, on the CPU (and the GPU when present): the FID
   Inception-v3 (full architecture) and DINOv2 ViT-S/14 (full architecture; random weights,
   the speed is the same), batched, against one image at a time (the baseline).
2. Metric arithmetic: FID on 2048-d features through symmetric eigendecompositions, against
   ``scipy.linalg.sqrtm`` (the standard implementation); precision/recall on 1,000 x 1,000
   384-d features.
3. A projection of a full Table-1 evaluation (5 condition sets, 4 modalities, 1,000 test
   fragments: 4,000 real and 16,000 generated images) from the measured rates, sampling
   excluded (see benchmarks/bench_network.py for sampling rates).

``--quick`` (CI: every section runs and prints, in seconds): 2 images in batches of 2 against
1 at a time, the metric arithmetic on 200 features of 64 dimensions, a 10-fragment projection.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model import metrics
from model.features import DinoV2Features, FeatureExtractor, FIDInceptionV3


def _dinov2_vits14() -> DinoV2Features:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                          patch_size=14, image_size=518)
    return DinoV2Features(Dinov2Model(config)).eval()


def _rate(extractor: FeatureExtractor, images: np.ndarray, batch: int) -> float:
    extractor(images[:batch], batch)  # warm-up
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    extractor(images, batch)
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def _timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per extraction timing")
    parser.add_argument("--fragments", type=int, default=1000, help="test fragments of the projected Table-1 run")
    parser.add_argument("--quick", action="store_true",
                        help="2 images, batches of 2, metrics on 200 x 64-d features, 10 fragments (CI)")
    args = parser.parse_args()
    # full: batches of 32 (128 on a GPU), FID on 1000 x 2048-d, precision/recall on 1000 x 384-d
    cpu_batch, gpu_batch, n_feat, fid_dim, pr_dim = 32, 128, 1000, 2048, 384
    if args.quick:
        args.images, args.fragments = 2, 10
        cpu_batch, gpu_batch, n_feat, fid_dim, pr_dim = 2, 2, 200, 64, 64
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 256, 256, 3), dtype=np.uint8)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rates: dict[tuple[str, str], float] = {}
    print(f"1. feature extraction, {args.images} images of 256x256 ({torch.get_num_threads()} CPU threads)")
    for device in devices:
        for kind, build, batch in (("inception", FIDInceptionV3, cpu_batch), ("dinov2 ViT-S/14", _dinov2_vits14, cpu_batch)):
            net = build().eval().to(device)
            ex = FeatureExtractor(kind, net, "random", torch.device(device), "")
            if device == "cuda":
                batch = gpu_batch
            batched = _rate(ex, images, batch)
            single = _rate(ex, images[: 1 if args.quick else max(8, args.images // 8)], 1)
            rates[(device, kind)] = batched
            print(f"   {device:4s} {kind:16s} {batched:8.1f} images/s batched ({batch}), "
                  f"{batched / single:5.2f}x one-at-a-time ({single:.1f}/s)")
    print("2. metric arithmetic")
    real = rng.normal(size=(n_feat, fid_dim)) * rng.uniform(0.2, 2, fid_dim)
    fake = rng.normal(size=(n_feat, fid_dim)) + 0.05
    from scipy import linalg

    mu1, s1 = metrics.gaussian_moments(real)
    mu2, s2 = metrics.gaussian_moments(fake)
    ours = _timed(lambda: metrics.frechet_distance(mu1, s1, mu2, s2))
    scipy_time = _timed(lambda: linalg.sqrtm(s1 @ s2))
    print(f"   FID {fid_dim}-d: {ours:.2f} s, {scipy_time / ours:.2f}x faster than scipy.linalg.sqrtm ({scipy_time:.2f} s)")
    pr_real, pr_fake = rng.normal(size=(n_feat, pr_dim)), rng.normal(size=(n_feat, pr_dim)) + 0.1
    pr = _timed(lambda: metrics.precision_recall(pr_real, pr_fake, device="cpu"))
    print(f"   precision/recall {n_feat}x{n_feat} {pr_dim}-d (k=3): {pr:.2f} s")
    n_real, n_gen = 4 * args.fragments, 16 * args.fragments
    print(f"3. projected Table-1 evaluation of {args.fragments} fragments ({n_real} real + {n_gen} generated images), "
          "sampling excluded:")
    for device in devices:
        per_image = 1 / rates[(device, "inception")] + 1 / rates[(device, "dinov2 ViT-S/14")]
        total = (n_real + n_gen) * per_image + 16 * (ours + pr)
        print(f"   {device}: {total / 60:.1f} min of features and metrics")


if __name__ == "__main__":
    main()
