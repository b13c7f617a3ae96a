"""The sanity checks a diffusion engineer runs first, on the real pipeline (synthetic world ->
ingest with the shipped codec -> model -> sample -> decode), fast on a CPU:

- memorisation: a small model trained on one cell draws each of that cell's fragments' own
  relief from its S2L2A (closer to its own DEM than to the cell's other fragments'), and its
  denoiser uses the clean condition;
- the shipped demo model's S1RTC samples from S2L2A are closer to the real S1RTC than its
  unconditional samples, on cells it never saw;
- constant content stays constant (a flat-sea DEM, calm water in S1, generated flat): not
  met yet by the shipped model (issue #11), kept as a strict expected failure so that the
  day it holds the suite says so.

The cells here are of the demo region, which neither shipped model saw.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from majortom_gen.store import LatentStore, load_aligned
from majortom_gen.synth import SynthOptions, write_world
from model.codecs import latent_norms
from model.diffusion import NOISE_TIMESTEP, alphas_cumprod, predict_x0, zero_snr
from model.metrics import mean_abs_gradient
from model.sample import generate
from model.train import SHIPPED_DEMO_MODEL
from model.uvit import MultiModalUViT
from pipelines.ingest import IngestOptions, ingest
from pipelines.codec import decode_images, open_store_codec

SEA = "502U_58R"  # nearly all open sea (a headland in one corner): DEM 0 m, S1 calm water
LAND = "501U_62R"  # all land: hills, forest, fields
MODALITIES = ["DEM", "S1RTC", "S2L1C", "S2L2A"]
# ~70 s on one CPU thread. Measured on the hills of LAND (a high-contrast hillshade, unlike the
# near-flat grey DEM of the earlier world, where the same run reached 21.9 dB): PSNR 13.0 dB,
# MAE 42.8 against the fragment's own DEM, 75 against the cell's other fragments, 70 for
# unconditional samples. 2,000 steps reach 15.1 dB, and 2,000 steps on 4 fragments 18.9 dB.
MEMORISE_STEPS = 1000
MEMORISE_PSNR_DB = 12.0
# Measured on LAND alone over 3 draws: 0.78 (13.0 vs 16.7) for the 13,000-step model, 0.84 (13.7 vs 16.3)
# for the 10,500-step one, 0.87 (14.2 vs 16.3) for the 8,500-step one, 0.74 (14.0 vs 18.9) for the
# 5,000-step one (on the demo's held-out cells the cut grew, 26% -> 28% with guidance, then 21-27%
# over two seeds for the 10,500-step model and 22-26% over three for the 13,000-step one).
# The shipped 17,900-step zero-SNR model, on both cells (this test): 0.76 (14.9 vs 19.7); the
# 16,400-step one on LAND alone 0.90 (19.5 vs 21.5): S2 does not show the S1 orbit direction that decides which
# slopes are bright (README, "What the demo model can and cannot do").
SHIPPED_S1_MAE_RATIO = 0.9


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    write_world([SEA, LAND], root / "world", SynthOptions(seed=0, workers=1))
    ingest(root / "world", [SEA, LAND], root / "store", IngestOptions(scheduler="synchronous"))
    store = LatentStore.open(root / "store")
    arrays = load_aligned(store, MODALITIES)
    norms = latent_norms(store.codec, MODALITIES)
    x = {m: norms[m].to_network(torch.from_numpy(np.asarray(arrays.moments[m][:, :4], np.float32))) for m in MODALITIES}
    return root / "store", arrays, x


@pytest.fixture(scope="module")
def net():
    return MultiModalUViT.from_pretrained(SHIPPED_DEMO_MODEL).eval()


def x0_errors(net, x, target: str, condition: str, k: int, seed: int = 0) -> tuple[float, float]:
    """x0-prediction MSE of ``target`` noised to step ``k``, with ``condition`` clean (timestep 0)
    and with it marginalised (noise at timestep 1000); the other modalities marginalised."""
    g = torch.Generator().manual_seed(seed)
    n = len(x[target])
    abar = alphas_cumprod(zero_snr(net))[k].float()
    eps = torch.randn(x[target].shape, generator=g)
    noisy = abar.sqrt() * x[target] + (1 - abar).sqrt() * eps
    noise = {m: torch.randn(x[m].shape, generator=g) for m in x}
    errors = []
    for clean in (True, False):
        lat = {m: noise[m] for m in x}
        ts = {m: torch.full((n,), NOISE_TIMESTEP) for m in x}
        lat[target], ts[target] = noisy, torch.full((n,), float(k + 1))
        if clean:
            lat[condition], ts[condition] = x[condition], torch.zeros(n)
        with torch.no_grad():
            x0 = predict_x0(net, lat, ts)[target]
        errors.append(float(((x0 - x[target]) ** 2).mean()))
    return errors[0], errors[1]


def decode(codec, latents: torch.Tensor, modality: str) -> np.ndarray:
    return decode_images(codec, latents, modality)


@pytest.fixture(scope="module")
def memorised(held_out, tmp_path_factory):
    """A small v-prediction network trained on the LAND cell's 16 (DEM, S2L2A) pairs; returns
    the network and those pairs in network space."""
    from dataclasses import replace

    from model.config import load_config
    from model.train import train

    store, arrays, _ = held_out
    keep = arrays.grid_cell == LAND
    moments = {m: np.asarray(arrays.moments[m][keep], np.float32) for m in ("DEM", "S2L2A")}
    norms = latent_norms(LatentStore.open(store).codec, ["DEM", "S2L2A"])
    cfg = load_config("tiny")
    cfg = replace(cfg, nnet={**cfg.nnet, "modalities": ["DEM", "S2L2A"], "embed_dim": 64, "depth": 2, "prediction": "v"},
                  optimizer=replace(cfg.optimizer, lr=3e-3, warmup_steps=20))
    cfg = cfg.with_train(batch_size=16, p_clean=0.5, hflip=False, ema_decay=0.9, checkpoint_every=10_000, log_every=100)
    result = train(cfg, moments, tmp_path_factory.mktemp("memorise"), norms=norms, max_steps=MEMORISE_STEPS, device="cpu")
    net = MultiModalUViT.from_pretrained(result.model_dir).eval()
    return net, {m: norms[m].to_network(torch.from_numpy(moments[m][:, :4])) for m in moments}


def test_memorisation__one_cell_is_reproduced(held_out, memorised):
    """DEM generated from S2L2A for the training fragments is close to their own real DEM
    (PSNR, MAE), far closer than to the other fragments' DEM of the same cell (it is this pair,
    not this cell) and than unconditional samples are."""
    net, x = memorised
    codec = open_store_codec(held_out[0])
    real = decode(codec, x["DEM"], "DEM").astype(np.float32)
    cond = decode(codec, generate(net, {"S2L2A": x["S2L2A"]}, ["DEM"], steps=25, seed=0)["DEM"], "DEM")
    free = decode(codec, generate(net, {}, ["DEM"], n_samples=len(real), steps=25, seed=0)["DEM"], "DEM")
    mae_cond, mae_free = np.abs(cond - real).mean(), np.abs(free - real).mean()
    n = len(real)
    mae_other = np.mean([np.abs(cond[i] - real[j]).mean() for i in range(n) for j in range(n) if i != j])
    psnr = 10 * np.log10(255**2 / ((cond - real) ** 2).mean())
    print(f"memorised {LAND}: DEM from S2L2A {psnr:.1f} dB, MAE {mae_cond:.1f} (own pair), {mae_other:.1f} (other "
          f"fragments), {mae_free:.1f} (unconditional)")
    assert psnr > MEMORISE_PSNR_DB, (psnr, mae_cond, mae_other, mae_free)
    assert mae_cond < 0.7 * mae_other and mae_cond < 0.7 * mae_free, (psnr, mae_cond, mae_other, mae_free)


def test_denoiser_uses_its_conditions__memorised(memorised):
    """The memorised model's x0 prediction of DEM is better with the paired S2L2A clean than
    with it marginalised, at a middle and at a high noise level."""
    net, x = memorised
    for k, ratio in ((499, 1.0), (899, 0.85)):  # measured: 0.90 and 0.70
        cond, marg = x0_errors(net, x, "DEM", "S2L2A", k=k)
        assert cond < ratio * marg, (k, cond, marg)


def test_shipped_model__s2_conditioning_lowers_the_s1_error(held_out, net):
    """On two cells it never saw (open sea, and hills with forest and fields), the shipped demo
    model's S1RTC samples generated from the paired S2L2A are closer to the real S1RTC (paired
    MAE) than unconditional samples of the same fragments with the same noise (mean over three
    noise draws)."""
    store, arrays, x = held_out
    x = {m: x[m] for m in ("S1RTC", "S2L2A")}
    codec = open_store_codec(store)
    real = decode(codec, x["S1RTC"], "S1RTC").astype(np.float32)
    mae_cond, mae_free = 0.0, 0.0
    for draw in (1, 2, 3):  # one draw of unconditional samples of one cell varies by +-15%
        noise = {"S1RTC": torch.randn(x["S1RTC"].shape, generator=torch.Generator().manual_seed(draw))}
        cond = generate(net, {"S2L2A": x["S2L2A"]}, ["S1RTC"], steps=25, seed=0, initial_noise=noise)["S1RTC"]
        free = generate(net, {}, ["S1RTC"], n_samples=len(real), steps=25, seed=0, initial_noise=noise)["S1RTC"]
        mae_cond += np.abs(decode(codec, cond, "S1RTC") - real).mean() / 3
        mae_free += np.abs(decode(codec, free, "S1RTC") - real).mean() / 3
    print(f"shipped model, S1RTC paired MAE on {SEA} and {LAND}: from S2L2A {mae_cond:.2f}, unconditional {mae_free:.2f}")
    assert mae_cond < SHIPPED_S1_MAE_RATIO * mae_free, (mae_cond, mae_free)


@pytest.mark.xfail(strict=True, reason="issue #11: the shipped demo model still generates texture on open "
                                       "sea (gradients above 1.5x the real ones + 0.5)")
def test_constant_content_stays_constant(held_out, net):
    """Open sea: the real DEM is flat (0 m) and S1 is calm water; generated from the S2 of
    the same fragments they come out flat too, not as speckle or blocks."""
    store, arrays, x = held_out
    codec = open_store_codec(store)
    in_cell = np.flatnonzero(arrays.grid_cell == SEA)
    flat = np.ptp(decode(codec, x["DEM"][in_cell], "DEM").astype(np.float32), axis=(1, 2, 3)) < 12
    sea = torch.from_numpy(in_cell[flat])  # the fragments whose real DEM is flat: all sea
    assert len(sea) >= 8, len(sea)
    out = generate(net, {m: x[m][sea] for m in ("S2L1C", "S2L2A")}, ["DEM", "S1RTC"], steps=25, seed=0)
    for m in ("DEM", "S1RTC"):
        real = decode(codec, x[m][sea], m)
        generated = decode(codec, out[m], m)
        assert mean_abs_gradient(generated) < 1.5 * mean_abs_gradient(real) + 0.5, m
