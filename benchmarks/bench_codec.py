"""Codec benchmark: the shipped learned codec (small-vae) against patch-pca, measured in one run.

    python benchmarks/bench_codec.py [--cells 3] [--quick]

1. Reconstruction PSNR (dB, 8-bit scale, decode of the mean latent) per modality on held-out
   synthetic fragments (cells of the demo region, which the shipped codec never saw; patch-pca
   is fitted on those very fragments, its best case) and on the four real fragments in
   ../shared/data/real-fragments (when present).
2. How latent errors decode: the same small latent perturbation (Gaussian, std 0.1 of the
   network's unit-variance latents) decoded by each codec; the mean absolute difference of
   neighbouring pixels across 8 px block borders divided by the same inside blocks (patch-pca's
   blocks show as a ratio well above 1).
3. The shipped small-vae's tuned decoder (`codec tune-decoder`: trained to decode noisy
   latents, as generated latents are) against its original decoder: PSNR per modality from
   clean latents and from latents with noise of std 0.3 (network units), and the roughness
   (mean absolute gradient) of the noisy decodes over the clean reconstruction's.
4. Speed on this machine: encode and decode fragments/s for small-vae and patch-pca, and
   for the full-size SD VAE architecture (random weights) as the baseline the offline codec
   replaces; ratios to the SD VAE.

``--quick`` (CI: every section runs and prints, in seconds): one held-out cell, 2 fragments
per modality for the PSNR and the latent-error figures, one timing repeat, and the speed
figures on 64x64 crops (the ratios are not those of 256x256 fragments).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from majortom_gen.fragments import to_unit_range
from majortom_gen.synth import SynthOptions, write_world
from model.codecs import (
    SD_VAE_CONFIG,
    Codec,
    fit_patch_pca,
    load_codec,
    reconstruction_psnr,
)
from pipelines.codec import psnr_by_modality, source_fragments

HELD_OUT = ["501U_60R", "502U_58R", "503U_61R", "500U_62R", "503U_59R"]  # demo-region cells
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-fragments"
QUICK_FRAGMENTS = 2  # per modality, --quick
QUICK_SPEED_SIZE = 64  # px, --quick
REAL_FILES = {"DEM": "dem.webp", "S1RTC": "s1rtc.webp", "S2L1C": "s2l1c.webp", "S2L2A": "s2l2a.webp"}


def timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def block_border_ratio(images: torch.Tensor) -> float:
    """Mean |difference| of neighbouring pixels across 8 px block borders / inside blocks."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs()
    cols = torch.arange(dx.shape[-1])
    border = (cols % 8) == 7
    return float(dx[..., border].mean() / dx[..., ~border].mean())


def tuned_decoder_section(small: Codec, frags: dict[str, np.ndarray], n: int, std: float = 0.3) -> None:
    """Section 3: the tuned decoder against the original, on ``n`` fragments per modality."""
    import copy

    from model.metrics import mean_abs_gradient

    if small.decoder is None:
        print("[decoder] the shipped small-vae has no tuned decoder")
        return
    original = copy.copy(small)
    original.decoder = None
    print(f"[decoder] tuned ({small.decoder_record['command']}) vs original decoder, {n} fragments per modality; "
          f"noisy: latent noise std {std} (network units); roughness: the noisy decode's over the clean reconstruction's")
    for m, a in frags.items():
        x = torch.from_numpy(to_unit_range(a[:n]))
        base = small.to_network(small.encode_moments(x), m, sample=False)
        noisy = base + std * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
        row = []
        for name, codec in (("original", original), ("tuned", small)):
            clean, rough = codec.decode_network(base, m), codec.decode_network(noisy, m)
            psnr = [float(10 * torch.log10(4.0 / ((y - x) ** 2).mean())) for y in (clean, rough)]
            ratio = mean_abs_gradient(rough.permute(0, 2, 3, 1).numpy()) / mean_abs_gradient(clean.permute(0, 2, 3, 1).numpy())
            row.append(f"{name} {psnr[0]:5.2f} / {psnr[1]:5.2f} dB, roughness {ratio:4.2f}")
        print(f"  {m:6s} " + "   ".join(row) + "  (clean / noisy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=3, help="held-out synthetic cells (16 fragments each)")
    parser.add_argument("--quick", action="store_true",
                        help="one cell, 2 fragments per modality, one timing repeat, 64x64 speed crops (CI)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cells = HELD_OUT[: 1 if args.quick else args.cells]
    small = load_codec("small-vae")
    with tempfile.TemporaryDirectory() as tmp:
        write_world(cells, Path(tmp), SynthOptions(seed=0, workers=1))
        frags = source_fragments(tmp, cells)
    if args.quick:
        frags = {m: a[:QUICK_FRAGMENTS] for m, a in frags.items()}
    pca, _ = fit_patch_pca({m: torch.from_numpy(to_unit_range(a)) for m, a in frags.items()})

    print(f"[psnr] held-out synthetic fragments ({len(cells)} cells of the demo region, "
          f"{sum(len(a) for a in frags.values())} fragments); patch-pca fitted on them:")
    p_small, p_pca = psnr_by_modality(small, frags), psnr_by_modality(pca, frags)
    for m in frags:
        print(f"  {m:6s} small-vae {p_small[m]:6.2f} dB   patch-pca {p_pca[m]:6.2f} dB   "
              f"difference {p_small[m] - p_pca[m]:+.2f} dB")
    if REAL.is_dir():
        print("[psnr] the real fragments in ../shared/data/real-fragments (patch-pca as fitted above):")
        for m, name in REAL_FILES.items():
            x = torch.from_numpy(to_unit_range(np.asarray(Image.open(REAL / name).convert("RGB"))[None]))
            a, b = reconstruction_psnr(small, x), reconstruction_psnr(pca, x)
            print(f"  {m:6s} small-vae {a:6.2f} dB   patch-pca {b:6.2f} dB   difference {a - b:+.2f} dB")
    else:
        print(f"[psnr] {REAL} not found: real fragments skipped")

    x = torch.from_numpy(to_unit_range(frags["DEM"][:QUICK_FRAGMENTS if args.quick else 8]))
    print("[blocks] a latent error of std 0.1 (network units), decoded; border/inside gradient ratio (1 = no blocks):")
    for name, codec in (("small-vae", small), ("patch-pca", pca)):
        base = codec.to_network(codec.encode_moments(x), "DEM", sample=False)
        noise = 0.1 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
        diff = codec.decode_network(base + noise, "DEM") - codec.decode_network(base, "DEM")
        print(f"  {name:9s} {block_border_ratio(diff):.2f}")

    tuned_decoder_section(small, frags, 2 if args.quick else 16)

    repeat = 1 if args.quick else 3
    batch = torch.from_numpy(to_unit_range(np.concatenate([a[:4] for a in frags.values()])))[:16]
    size = 256
    if args.quick:  # 64x64 crops: every codec runs at any multiple of 8 px
        size, batch = QUICK_SPEED_SIZE, batch[:4, :, :QUICK_SPEED_SIZE, :QUICK_SPEED_SIZE]
    sd = Codec("sd-vae", __import__("diffusers").AutoencoderKL(**SD_VAE_CONFIG))
    sd_batch = batch[:1 if args.quick else 2]
    rates = {}
    for name, codec, xb in (("sd-vae (full size, random weights)", sd, sd_batch), ("small-vae", small, batch),
                            ("patch-pca", pca, batch)):
        z = codec.encode_moments(xb)[:, :4]
        rates[name] = (len(xb) / timed(lambda codec=codec, xb=xb: codec.encode_moments(xb), repeat),
                       len(xb) / timed(lambda codec=codec, z=z: codec.decode(z), repeat))
    base_enc, base_dec = rates["sd-vae (full size, random weights)"]
    print(f"[speed] CPU, {torch.get_num_threads()} threads, {size}x{size} fragments/s (x the SD VAE):")
    for name, (enc, dec) in rates.items():
        print(f"  {name:36s} encode {enc:8.1f} ({enc / base_enc:6.1f}x)   decode {dec:8.1f} ({dec / base_dec:6.1f}x)")
    n = sum(p.numel() for p in small.model.parameters())
    print(f"[size] small-vae {n / 1e6:.2f} M parameters; SD VAE {sum(p.numel() for p in sd.model.parameters()) / 1e6:.1f} M")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
