"""What S2 can tell about DEM and S1RTC in the synthetic world, and how much of it the model knows.

    python benchmarks/bench_learnability.py [--train-cells 24] [--steps 1500] [--model DIR] [--quick]

The issue-#11 bar asks conditional samples to cut the paired MAE of unconditional samples by
30%. How far any model can get depends on how much of the target the condition determines.
This measures it, on thumbnail fragments averaged to 32 x 32 px (8 px blocks: the codec's
latent pixel; the relief has no detail finer than that):

1. A direct regressor (a small dilated CNN, L1 loss) from the S2L2A thumbnail to the DEM / S1RTC
   thumbnail, trained on cells of the shipped demo model's training region, scored on demo-region
   cells it never saw: its MAE (an estimate of the conditional median's error), R^2, the MAE of
   the training set's median image (the best unconditional point guess) and the MAE between
   two different real fragments (what unconditional samples drawn from the data would score).
   ``sqrt(2) * regressor MAE / swap MAE`` estimates the best ratio of conditional to
   unconditional sample MAE (Gaussian residuals).
2. The shipped demo model on the same held-out fragments (encoded with the shipped small-vae):
   its x0 prediction at pure noise (timestep 1000) with S2L2A clean and with it marginalised,
   decoded: the model's own conditional and unconditional mean. When its conditional MAE is
   close to the regressor's, the model knows what S2 says and the samples are where it is lost.
   And the latent R^2 of that x0 prediction where sampling starts (pure noise) against where
   the model's training ended (its last training step, which on the released noise schedule
   keeps 6.8% of the real latent): a model that reads the layout from that leftover signal
   scores well at the second and near 0 at the first, however much S2 could tell it.

3. Where speckle comes from: the model's denoising of the held-out latents (network space,
   S2L2A clean, the rest marginalised) at low and middle noise: the x0 error per latent channel
   and the high-frequency energy (mean |x - its 3 x 3 box mean|) of the predicted x0 against
   the real latents'; and the same energy in latents it samples (25 DPM-Solver++ steps, the
   default guidance). A denoiser that passes noise through leaves more high-frequency energy
   than the real latents have, which the decoder shows as speckle and 8 px blocks.

``--model`` scores another model of the same codec (default: the shipped demo model).
``--quick`` (CI): 2 training cells, 1 held-out cell, 30 regressor steps; figures meaningless.
Times are not reported: this benchmark measures what can be learned, not speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import uniform_filter
from torch import nn

from majortom_gen.fragments import to_unit_range
from majortom_gen.synth import SynthOptions, write_world
from model.codecs import load_codec
from model.diffusion import NOISE_TIMESTEP, alphas_cumprod, predict_x0, zero_snr
from model.sample import generate
from model.train import SHIPPED_DEMO_MODEL
from model.uvit import MultiModalUViT
from pipelines.codec import source_fragments
from pipelines.guidance import GUIDANCE_DEFAULT, GUIDANCE_MIN_SIGMA

# the shipped model's training region: rows 490-498 U, columns 56-77 R (model/weights/README.md)
TRAIN_REGION = [f"{r}U_{c}R" for r in range(490, 499) for c in range(56, 78)]
HELD_OUT = ["501U_60R", "502U_58R", "503U_61R", "500U_62R", "503U_59R"]  # demo-region cells
TARGETS = ("DEM", "S1RTC")
SIDE = 32  # px of the averaged fragments


def averaged(frags: np.ndarray) -> np.ndarray:
    """uint8 (n, 256, 256, 3) -> float32 (n, 3, SIDE, SIDE) in 0..255, block means."""
    k = frags.shape[1] // SIDE
    n = len(frags)
    return frags.reshape(n, SIDE, k, SIDE, k, 3).mean((2, 4)).transpose(0, 3, 1, 2).astype(np.float32)


def regressor(channels_in: int, channels_out: int) -> nn.Module:
    def block(i: int, o: int, dilation: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=dilation, dilation=dilation), nn.GroupNorm(8, o), nn.SiLU())

    return nn.Sequential(block(channels_in, 48, 1), block(48, 48, 2), block(48, 48, 4), block(48, 48, 8),
                         block(48, 48, 1), nn.Conv2d(48, channels_out, 1))


def fit_regressor(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> nn.Module:
    """L1 regression of y from x (both in [-1, 1]), AdamW with a one-cycle schedule, flips."""
    torch.manual_seed(seed)
    net = regressor(x.shape[1], y.shape[1])
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        i = torch.randint(0, len(x), (32,), generator=g)
        xb, yb = x[i], y[i]
        if step % 2:
            xb, yb = xb.flip(-1), yb.flip(-1)
        loss = (net(xb) - yb).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def target_channels(a: np.ndarray, modality: str) -> np.ndarray:
    return a[:, :1] if modality == "DEM" else a  # the DEM thumbnail is grey: one channel


@torch.no_grad()
def network_latents(codec, frags: dict[str, np.ndarray], modalities) -> dict[str, torch.Tensor]:
    """Held-out fragments encoded with ``codec`` into the network's latents (moment means)."""
    return {m: codec.to_network(codec.encode_moments(torch.from_numpy(to_unit_range(frags[m]))), m, sample=False)
            for m in modalities}


@torch.no_grad()
def model_means(net: MultiModalUViT, codec, s2: torch.Tensor, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """The model's x0 prediction of ``modality`` at pure noise (the sampler's start), with S2L2A
    (``s2``, network latents) clean and marginalised (every other modality marginalised),
    decoded and averaged: (cond, uncond)."""
    names = list(net.config.modalities)
    n = len(s2)
    g = torch.Generator().manual_seed(0)
    noise = {m: torch.randn(s2.shape, generator=g) for m in names}
    out = []
    for clean in (True, False):
        lat = dict(noise)
        ts = {m: torch.full((n,), NOISE_TIMESTEP) for m in names}
        if clean:
            lat["S2L2A"], ts["S2L2A"] = s2, torch.zeros(n)
        x0 = predict_x0(net, lat, ts)[modality]
        img = (codec.decode_network(x0, modality).numpy().transpose(0, 2, 3, 1) + 1) * 127.5
        out.append(target_channels(averaged(np.clip(np.rint(img), 0, 255).astype(np.uint8)), modality))
    return out[0], out[1]


@torch.no_grad()
def start_r2(net: MultiModalUViT, lat: dict[str, torch.Tensor], modality: str) -> tuple[float, float]:
    """Latent R^2 of the model's x0 prediction of ``modality`` where sampling starts (pure noise)
    and where its training's last step is (the same noise plus what that step keeps of the
    real latent: sqrt(abar_999) = 0.068 on the released schedule, 0 on the zero-SNR one), S2L2A
    clean, the rest marginalised: ((start, training's last step), ...) for S2L2A clean and marginalised."""
    names = list(net.config.modalities)
    real = lat[modality]
    n = len(real)
    g = torch.Generator().manual_seed(0)
    noise = {m: torch.randn(real.shape, generator=g) for m in names}
    keep = float(alphas_cumprod(zero_snr(net))[-1].sqrt())
    var = float(((real - real.mean((0, 2, 3), keepdim=True)) ** 2).mean())
    out = []
    for clean in (True, False):
        for leak in (0.0, keep):
            x = dict(noise)
            ts = {m: torch.full((n,), NOISE_TIMESTEP) for m in names}
            x[modality] = leak * real + (1 - leak ** 2) ** 0.5 * noise[modality]
            if clean:
                x["S2L2A"], ts["S2L2A"] = lat["S2L2A"], torch.zeros(n)
            out.append(1 - float(((predict_x0(net, x, ts)[modality] - real) ** 2).mean()) / var)
    return (out[0], out[1]), (out[2], out[3])


def high_frequency(x: np.ndarray) -> np.ndarray:
    """(n, C, H, W) latents -> (C,) mean |x - its 3 x 3 box mean| per channel."""
    return np.abs(x - uniform_filter(x, size=(1, 1, 3, 3), mode="nearest")).mean((0, 2, 3))


@torch.no_grad()
def denoiser_report(net: MultiModalUViT, lat: dict[str, torch.Tensor], modality: str, sample_steps: int) -> None:
    """Section 3: x0 error and high-frequency energy of the model's denoising of real held-out
    latents ``lat`` (network space) at a few noise levels, and of its samples, against the real latents'."""
    names = list(net.config.modalities)
    real, cond = lat[modality], lat["S2L2A"]
    n = len(real)
    g = torch.Generator().manual_seed(0)
    fmt = lambda a: "/".join(f"{v:.3f}" for v in a)  # noqa: E731
    print(f"[{modality} denoiser] real latents: high-frequency energy per channel {fmt(high_frequency(real.numpy()))}",
          flush=True)
    for k in (20, 100, 300):
        abar = alphas_cumprod(zero_snr(net))[k].float()
        noisy = abar.sqrt() * real + (1 - abar).sqrt() * torch.randn(real.shape, generator=g)
        x = {m: torch.randn(real.shape, generator=g) for m in names}
        ts = {m: torch.full((n,), NOISE_TIMESTEP) for m in names}
        x[modality], ts[modality] = noisy, torch.full((n,), float(k + 1))
        x["S2L2A"], ts["S2L2A"] = cond, torch.zeros(n)
        x0 = predict_x0(net, x, ts)[modality].numpy()
        err = np.abs(x0 - real.numpy()).mean((0, 2, 3))
        print(f"[{modality} denoiser] step {k} (sigma {float(((1 - abar) / abar).sqrt()):.2f}): x0 error per channel "
              f"{fmt(err)}, predicted x0 high-frequency energy {fmt(high_frequency(x0))}", flush=True)
    out = generate(net, {"S2L2A": cond}, [modality], steps=sample_steps, seed=0,
                   guidance={"S2L2A": GUIDANCE_DEFAULT} if GUIDANCE_DEFAULT else None, guidance_min_sigma=GUIDANCE_MIN_SIGMA)
    print(f"[{modality} denoiser] samples from S2L2A ({sample_steps} steps, the default guidance): high-frequency energy "
          f"{fmt(high_frequency(out[modality].numpy()))}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-cells", type=int, default=24)
    ap.add_argument("--held-out", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--model", default=str(SHIPPED_DEMO_MODEL), help="model folder (small-vae latents)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sample_steps = 25
    if args.quick:
        args.train_cells, args.held_out, args.steps, sample_steps = 2, 1, 30, 2
    torch.set_num_threads(2)
    train_cells = TRAIN_REGION[:: max(1, len(TRAIN_REGION) // args.train_cells)][: args.train_cells]
    held = HELD_OUT[: args.held_out]
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        write_world(train_cells + held, world, SynthOptions(seed=0, workers=2))
        train = source_fragments(world, train_cells, ("S2L2A",) + TARGETS)
        test = source_fragments(world, held, ("S2L2A",) + TARGETS)
    print(f"[data] {len(train['S2L2A'])} training fragments ({len(train_cells)} cells of the demo model's training "
          f"region), {len(test['S2L2A'])} held-out fragments ({', '.join(held)}), averaged to {SIDE} px", flush=True)
    unit = lambda a: torch.from_numpy(a / 127.5 - 1)  # noqa: E731
    x_train, x_test = unit(averaged(train["S2L2A"])), unit(averaged(test["S2L2A"]))
    rng = np.random.default_rng(0)
    codec = load_codec("small-vae")
    uvit = MultiModalUViT.from_pretrained(args.model).eval()
    for m in TARGETS:
        y_train = target_channels(averaged(train[m]), m)
        real = target_channels(averaged(test[m]), m)
        net = fit_regressor(x_train, unit(y_train), args.steps)
        with torch.no_grad():
            pred = (net(x_test).numpy() + 1) * 127.5
        n = len(real)
        other = np.array([(i + 1 + rng.integers(n - 1)) % n for i in range(n)]) if n > 1 else np.zeros(1, int)
        mae_reg = float(np.abs(pred - real).mean())
        mae_median = float(np.abs(np.median(y_train, axis=0) - real).mean())
        mae_swap = float(np.abs(real[other] - real).mean())
        r2 = 1 - float(((pred - real) ** 2).mean() / max(((real - real.mean()) ** 2).mean(), 1e-9))
        lat = network_latents(codec, test, ("S2L2A", m))
        cond, uncond = model_means(uvit, codec, lat["S2L2A"], m)
        mae_cond, mae_uncond = float(np.abs(cond - real).mean()), float(np.abs(uncond - real).mean())
        print(f"[{m} from S2L2A] regressor MAE {mae_reg:.1f} (R^2 {r2:.2f}); median image {mae_median:.1f}; "
              f"another real fragment {mae_swap:.1f}; best sample ratio ~ sqrt(2) x {mae_reg:.1f} / {mae_swap:.1f} = "
              f"{np.sqrt(2) * mae_reg / max(mae_swap, 1e-9):.2f}", flush=True)
        print(f"[{m} from S2L2A] the model's mean (x0 at pure noise): MAE {mae_cond:.1f} with S2L2A, "
              f"{mae_uncond:.1f} without ({100 * (mae_cond / mae_uncond - 1):+.0f}%); regressor / model "
              f"{mae_reg / mae_cond:.2f}", flush=True)
        (c_start, c_last), (u_start, u_last) = start_r2(uvit, lat, m)
        print(f"[{m} from S2L2A] latent R^2 of the model's x0 at the sampler's start (pure noise): {c_start:.2f} with "
              f"S2L2A, {u_start:.2f} without; at its training's last step (the signal that step keeps): {c_last:.2f} "
              f"with, {u_last:.2f} without", flush=True)
        denoiser_report(uvit, lat, m, sample_steps)


if __name__ == "__main__":
    sys.exit(main())
