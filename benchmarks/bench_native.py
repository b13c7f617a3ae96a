"""The native family (issue #14): what cutting bands into COP-GEN patches, their band-group VAEs
and the COP-GEN network cost, as ratios to the thumbnail family measured in the same run.

    python benchmarks/bench_native.py [--quick]

1. **Patches.** One synthetic product per modality (the project's world, real Core schema):
   decode the band GeoTIFFs, cut each band group into its 6 x 6 patches and normalise them
   (``majortom_gen.native.cut_patches`` + ``to_model``), patches/s per group; baseline: the
   thumbnail path on the same product (decode the thumbnail, cut 16 fragments, scale to
   [-1, 1]), fragments/s.
2. **Band-group VAEs** (random weights, the official architecture: ch 128, ch_mult 1,2,4,4,
   z 8): encode+decode patches/s of the 10 m, 20 m, 60 m and DEM groups; baseline: the SD kl-f8
   VAE on a 256 px thumbnail fragment.
3. **Network**: sampling tuples/s (DPM-Solver++, every image group generated from nothing)
   of ``native-tiny`` and the forward time of ``copgen-base`` (834 tokens); baselines: the
   thumbnail ``tiny`` and ``release`` networks (4 modalities, 260 and 1028 tokens).

``--quick`` (CI, seconds): VAEs at ch 32 on small patches, 2 solver steps, the base networks
at depth 2 and width 256.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from majortom_gen.fragments import cut_fragments, to_unit_range
from majortom_gen.native import BAND_GROUPS, cut_patches, to_model
from majortom_gen.sources import dataset_root, decode_band, decode_product_thumbnail, read_metadata, read_product_of
from majortom_gen.synth import SynthOptions, write_world
from model.codecs import SD_VAE_CONFIG, ldm_vae_config
from model.config import load_config
from model.sample import generate
from model.uvit import MultiModalUViT

CELL = "501U_60R"


def timed(fn, repeats: int) -> float:
    """Best wall-clock seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_patches(world: Path, repeats: int) -> None:
    print("\n1. patches: decode bands, cut 6x6, normalise (per product)")
    products = {}
    for source in ("S2L2A", "S1RTC", "DEM"):
        row = read_metadata(dataset_root(source, world), source).iloc[0]
        products[source] = read_product_of(row)
        products[source]["_crs"] = row["crs"]

    def thumbnail_path() -> int:
        product = products["S2L2A"]
        thumb = decode_product_thumbnail(product)
        transform = decode_band(product, "B04").transform
        frags = cut_fragments(thumb, transform, product["_crs"])
        [to_unit_range(f.pixels) for f in frags]
        return len(frags)

    base = timed(thumbnail_path, repeats)
    n_frag = thumbnail_path()
    print(f"   baseline, S2L2A thumbnail -> 16 fragments: {n_frag / base:8.1f} fragments/s ({base * 1e3:.1f} ms)")
    for group in BAND_GROUPS.values():
        if group.is_scalar or group.source not in products:
            continue
        product = products[group.source]

        def native_path(g=group, product=product) -> int:
            rasters = [decode_band(product, b) for b in g.bands]
            stack = np.stack([r.array for r in rasters])
            patches = cut_patches(stack, g, rasters[0].transform, product["_crs"])
            [to_model(g, a) for _, a in patches]
            return len(patches)

        t = timed(native_path, repeats)
        n = native_path()
        print(f"   {group.name:32s} {n / t:8.1f} patches/s = {(n / t) / (n_frag / base):5.2f}x the fragments/s "
              f"({t * 1e3:.1f} ms for {n} patches of {group.patch_px} px x {len(group.bands)} bands)")


def bench_vaes(quick: bool, repeats: int) -> None:
    from diffusers import AutoencoderKL

    ch, shrink = (32, 4) if quick else (128, 1)
    print(f"\n2. band-group VAEs, random weights, ch {ch}: encode + decode one patch (CPU, float32)")
    torch.manual_seed(0)
    sd_config = dict(SD_VAE_CONFIG)
    if quick:
        sd_config["block_out_channels"] = [32, 64, 128, 128]
    sd = AutoencoderKL(**sd_config).eval()
    side = 256 // shrink
    x = torch.rand(1, 3, side, side) * 2 - 1

    def run(model, images):
        with torch.no_grad():
            model.decode(model.encode(images).latent_dist.mean).sample

    base = timed(lambda: run(sd, x), repeats)
    print(f"   baseline, SD kl-f8 on a {side} px RGB fragment: {1 / base:6.2f} patches/s ({base * 1e3:.0f} ms)")
    for name in ("S2L2A_B02_B03_B04_B08", "S2L2A_B05_B06_B07_B11_B12_B8A", "S2L2A_B01_B09", "DEM_DEM"):
        g = BAND_GROUPS[name]
        dd = {**g.vae_ddconfig(), "ch": ch}
        vae = AutoencoderKL(**ldm_vae_config(dd, g.vae_scale_factor)).eval()
        px = max(g.patch_px // shrink, 16)
        images = torch.rand(1, g.img_channels, px, px) * 2 - 1
        t = timed(lambda: run(vae, images), repeats)
        print(f"   {name:32s} {px:4d} px x {g.img_channels}: {1 / t:6.2f} patches/s = {base / t:5.2f}x the SD VAE's "
              f"({t * 1e3:.0f} ms)")


def tuples_per_s(nnet: dict, steps: int, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    net = MultiModalUViT(**nnet).eval()
    images = [m for m in net.modalities if net.latent_shape(m)[1] > 1]
    scalars = [m for m in net.modalities if m not in images]
    cond = {m: torch.zeros(batch, *net.latent_shape(m)) for m in scalars}
    t = timed(lambda: generate(net, cond, images, steps=steps, seed=0) if cond
              else generate(net, {}, images, n_samples=batch, steps=steps, seed=0), repeats)
    return batch / t


def forward_s(nnet: dict, repeats: int) -> tuple[float, int]:
    torch.manual_seed(0)
    net = MultiModalUViT(**nnet).eval()
    x = {m: torch.randn(1, *net.latent_shape(m)) for m in net.modalities}
    ts = {m: torch.full((1,), 500.0) for m in net.modalities}
    with torch.no_grad():
        t = timed(lambda: net(x, ts), repeats)
    return t, net.pos_embed.shape[1]


def bench_network(quick: bool, repeats: int) -> None:
    steps, batch = (2, 2) if quick else (25, 4)
    print(f"\n3. network on CPU: sampling {steps} steps, batch {batch}")
    thumb = tuples_per_s(load_config("tiny").nnet, steps, batch, repeats)
    native = tuples_per_s(load_config("native-tiny").nnet, steps, batch, repeats)
    print(f"   baseline, tiny (thumbnails, 4 modalities): {thumb:7.2f} tuples/s")
    print(f"   native-tiny (5 image groups + 2 scalars):  {native:7.2f} tuples/s = {native / thumb:5.2f}x")
    shrink = {"embed_dim": 256, "depth": 2, "num_heads": 4} if quick else {}
    release, n_release = forward_s({**load_config("release").nnet, **shrink}, repeats)
    base, n_base = forward_s({**load_config("copgen-base").nnet, **shrink}, repeats)
    what = "width 256, depth 2" if quick else "full size"
    print(f"   baseline, release (COP-GEN-Beta, {n_release} tokens, {what}): forward {release * 1e3:7.0f} ms")
    print(f"   copgen-base ({n_base} tokens, {what}):                 forward {base * 1e3:7.0f} ms = "
          f"{base / release:5.2f}x; one 50-step tuple about {50 * base:.0f} s on this CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: seconds, every section")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        write_world([CELL], world, SynthOptions(seed=3, workers=1))
        bench_patches(world, repeats)
    bench_vaes(args.quick, repeats)
    bench_network(args.quick, repeats)


if __name__ == "__main__":
    main()
