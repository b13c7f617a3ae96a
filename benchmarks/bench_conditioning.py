"""What conditioning on S2L2A buys the shipped demo model over a whole region it never saw.

    python benchmarks/bench_conditioning.py [--cells 16] [--every 2] [--seed 0] [--guidance 0] [--model DIR] [--quick]

The demo's own evaluation scores two held-out cells, which happen to be among the flattest of
its region; this scores the cells of the whole demo region (rows 500-503 U, columns 58-62 R; the
demo model was trained on rows 490-498). For each cell it takes every ``--every``-th thumbnail
fragment, encodes S2L2A, DEM and S1RTC with the shipped small-vae, generates DEM and S1RTC from
S2L2A and unconditionally from the same starting noise (25 DPM-Solver++ steps), decodes them
and prints, per modality, the paired MAE (8-bit units) against the real thumbnails as the codec
reconstructs them (as ``evaluate`` does: the decoder's smoothing is not the model's) with and
without the condition, the relative change (issue #11's bar: -30%) and the roughness (mean
absolute gradient) of each over the real ones' (bar: within 1.5x); then the same per
cell. No times: it measures what the model learnt, not speed.
``--quick`` (CI): 1 cell, 4 fragments, 2 steps; figures meaningless.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learnability import network_latents  # noqa: E402

from majortom_gen.synth import SynthOptions, write_world  # noqa: E402
from model.codecs import load_codec  # noqa: E402
from model.metrics import mean_abs_gradient  # noqa: E402
from model.sample import generate  # noqa: E402
from model.train import SHIPPED_DEMO_MODEL  # noqa: E402
from model.uvit import MultiModalUViT  # noqa: E402
from pipelines.codec import decode_images, source_fragments  # noqa: E402
from pipelines.guidance import GUIDANCE_MIN_SIGMA  # noqa: E402

DEMO_REGION = [f"{r}U_{c}R" for r in range(500, 504) for c in range(58, 63)][:16]  # the demo's 16 cells
TARGETS = ("DEM", "S1RTC")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=16)
    ap.add_argument("--every", type=int, default=2, help="take every n-th fragment of a cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--model", default=str(SHIPPED_DEMO_MODEL))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 25
    if args.quick:
        args.cells, args.every, steps = 1, 4, 2
    torch.set_num_threads(2)
    cells = DEMO_REGION[: args.cells]
    with tempfile.TemporaryDirectory() as tmp:
        write_world(cells, Path(tmp) / "world", SynthOptions(seed=0, workers=2))
        per_cell = [source_fragments(Path(tmp) / "world", [c], ("S2L2A",) + TARGETS) for c in cells]
    names, frags = [], {m: [] for m in ("S2L2A",) + TARGETS}
    for cell, got in zip(cells, per_cell):
        n = min(len(got[m]) for m in frags)  # a cell's fragments in the same order for every modality
        keep = np.arange(0, n, args.every)
        names += [cell] * len(keep)
        for m in frags:
            frags[m].append(got[m][keep])
    frags = {m: np.concatenate(v) for m, v in frags.items()}
    names = np.array(names)
    print(f"[data] {len(names)} fragments of {len(cells)} demo-region cells; model {args.model}; seed {args.seed}, "
          f"guidance {args.guidance:g}, {steps} steps", flush=True)
    codec = load_codec("small-vae")
    lat = network_latents(codec, frags, ("S2L2A",) + TARGETS)
    net = MultiModalUViT.from_pretrained(args.model).eval()
    gen = torch.Generator().manual_seed(args.seed)
    noise = {m: torch.randn(lat[m].shape, generator=gen) for m in TARGETS}
    guidance = {"S2L2A": args.guidance} if args.guidance else None
    cond = generate(net, {"S2L2A": lat["S2L2A"]}, list(TARGETS), steps=steps, seed=args.seed, initial_noise=noise,
                    guidance=guidance, guidance_min_sigma=GUIDANCE_MIN_SIGMA)
    free = generate(net, {}, list(TARGETS), n_samples=len(names), steps=steps, seed=args.seed, initial_noise=noise)
    for m in TARGETS:
        real = decode_images(codec, lat[m], m).astype(np.float32)  # as evaluate: the codec's reconstruction
        made = {k: decode_images(codec, out[m], m).astype(np.float32) for k, out in (("cond", cond), ("free", free))}
        mae = {k: np.abs(v - real).mean(axis=(1, 2, 3)) for k, v in made.items()}
        rough = {k: np.array([mean_abs_gradient(i) for i in v]) for k, v in made.items()}
        rough_real = np.array([mean_abs_gradient(i) for i in real])
        print(f"[{m} from S2L2A] paired MAE {mae['cond'].mean():.1f} with, {mae['free'].mean():.1f} without "
              f"({100 * (mae['cond'].mean() / mae['free'].mean() - 1):+.1f}%); roughness over the real "
              f"{rough['cond'].mean() / rough_real.mean():.2f}x with, {rough['free'].mean() / rough_real.mean():.2f}x "
              f"without", flush=True)
        for cell in cells:
            k = names == cell
            print(f"    {cell}: {100 * (mae['cond'][k].mean() / mae['free'][k].mean() - 1):+.0f}% at "
                  f"{rough['cond'][k].mean() / max(rough_real[k].mean(), 1e-6):.2f}x (real roughness "
                  f"{rough_real[k].mean():.2f})", flush=True)


if __name__ == "__main__":
    main()
