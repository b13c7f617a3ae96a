"""Issue #12 (trust): multi-condition classifier-free guidance is composed the standard way,
and each generated sample gets its own posterior draw of its conditions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from model.codecs import LatentNorm
from model.diffusion import NOISE_TIMESTEP, sampling_scheduler
from model.sample import generate
from model.uvit import MultiModalUViT
from pipelines.guidance import GUIDANCE_MIN_SIGMA
from pipelines.sample import (FragmentBatch, SamplingOptions, condition_latents, fragment_noise, sample_chunk,
                              sample_fragments, sample_store)

from conftest import WORLD_CELLS

SMALL = dict(img_size=8, in_chans=4, patch_size=2, embed_dim=32, depth=2, num_heads=4)
SHAPE = (4, 8, 8)


def tiny_net(modalities=("A", "B", "C", "D"), seed=0, **kw):
    torch.manual_seed(seed)
    return MultiModalUViT(modalities=modalities, **{**SMALL, **kw}).eval()


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- guidance
@torch.no_grad()
def hand_sample(net, cond, gen, steps, start, noise, combine, guide_from_sigma=0.0, groups=None):
    """DPM-Solver++ written out with direct network calls. ``combine(e_c, dropped)`` makes the
    guided prediction from the fully conditional one and {condition: prediction with only that
    condition replaced by its noise at the final timestep}; each (B, C_gen, H, W)."""
    names = net.modalities
    sched = sampling_scheduler(steps)
    x = torch.cat([start[m] for m in gen], dim=1)
    total, split = x.shape[0], [start[m].shape[1] for m in gen]

    def eps(xg, k, drop):
        lat, ts = {}, {}
        for m in names:
            if m in gen:
                lat[m], ts[m] = xg[m], torch.full((total,), float(k + 1))
            elif m in cond and m not in drop:
                lat[m], ts[m] = cond[m], torch.zeros(total)
            else:
                lat[m], ts[m] = noise[m], torch.full((total,), NOISE_TIMESTEP)
        out = net(lat, ts)
        return torch.cat([out[m] for m in gen], dim=1)

    for i, k in enumerate(sched.timesteps):
        k = int(k)
        xg = dict(zip(gen, x.split(split, dim=1)))
        e_c = eps(xg, k, ())
        dropped = {m: eps(xg, k, (m,)) for m in cond} if groups is None else {g: eps(xg, k, g) for g in groups}
        guided = combine(e_c, dropped) if sched.sigmas[i] >= guide_from_sigma else e_c
        x = sched.step(guided, k, x).prev_sample
    return dict(zip(gen, x.split(split, dim=1)))


def _setup(b=2):
    """A net over A..D; conditions A and B, C generated, D marginalised; fixed noise."""
    net = tiny_net()
    cond = {"A": randn(b, *SHAPE, seed=1), "B": randn(b, *SHAPE, seed=2)}
    start = {"C": randn(b, *SHAPE, seed=3)}
    noise = {m: randn(b, *SHAPE, seed=4 + i) for i, m in enumerate("ABD")}
    return net, cond, start, noise


def test_guidance__one_condition_is_the_usual_cfg():
    """e = e_unc + (1 + w)(e_c - e_unc), unchanged from before the fix."""
    net, cond, start, noise = _setup()
    w = 2.0
    got = generate(net, cond, ["C"], steps=4, guidance={"A": w}, initial_noise=start, marginal_noise=noise)["C"]
    want = hand_sample(net, cond, ["C"], 4, start, noise,
                       lambda e_c, dropped: dropped["A"] + (1 + w) * (e_c - dropped["A"]))["C"]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_guidance__two_conditions_compose_without_cross_terms():
    """e = e_c + sum_m w_m (e_c - e_{-m}) (compositional CFG, Liu et al. 2022)."""
    net, cond, start, noise = _setup()
    weights = {"A": 1.0, "B": 2.0}
    got = generate(net, cond, ["C"], steps=4, guidance=weights, initial_noise=start, marginal_noise=noise)["C"]
    want = hand_sample(net, cond, ["C"], 4, start, noise,
                       lambda e_c, dropped: e_c + sum(w * (e_c - dropped[m]) for m, w in weights.items()))["C"]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_guidance__a_group_of_conditions_is_dropped_together():
    """{("A", "B"): w} is the usual CFG on both conditions at once: e_unc + (1 + w)(e_c - e_unc)."""
    net, cond, start, noise = _setup()
    w = 2.0
    got = generate(net, cond, ["C"], steps=4, guidance={("B", "A"): w}, initial_noise=start, marginal_noise=noise)["C"]
    want = hand_sample(net, cond, ["C"], 4, start, noise, lambda e_c, dropped: dropped[("A", "B")] + (1 + w) * (
        e_c - dropped[("A", "B")]), groups=[("A", "B")])["C"]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    with pytest.raises(ValueError, match="not conditions"):
        generate(net, cond, ["C"], steps=2, guidance={("A", "D"): w})


def test_guidance_interval__only_the_noisy_steps_are_guided():
    """With ``guidance_min_sigma`` the steps whose noise level is below it use the plain
    conditional prediction; above every level it is no guidance at all."""
    net, cond, start, noise = _setup()
    w, steps = 2.0, 6
    sigmas = sampling_scheduler(steps).sigmas[:steps]
    cut = float((sigmas[2] + sigmas[3]) / 2)  # the 3 noisiest steps guided
    kw = dict(steps=steps, initial_noise=start, marginal_noise=noise)
    got = generate(net, cond, ["C"], guidance={"A": w}, guidance_min_sigma=cut, **kw)["C"]
    want = hand_sample(net, cond, ["C"], steps, start, noise,
                       lambda e_c, dropped: dropped["A"] + (1 + w) * (e_c - dropped["A"]), guide_from_sigma=cut)["C"]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    full = generate(net, cond, ["C"], guidance={"A": w}, **kw)["C"]
    none = generate(net, cond, ["C"], **kw)["C"]
    assert not torch.allclose(got, full, atol=1e-4) and not torch.allclose(got, none, atol=1e-4)
    above = generate(net, cond, ["C"], guidance={"A": w}, guidance_min_sigma=float(sigmas[0]) + 1, **kw)["C"]
    assert torch.allclose(above, none, atol=1e-6)


def test_guidance__does_not_depend_on_the_order_of_the_conditions():
    net, cond, _, _ = _setup()
    ab = generate(net, cond, ["C"], n_samples=2, steps=4, seed=3, guidance={"A": 1.0, "B": 2.0})
    ba = generate(net, cond, ["C"], n_samples=2, steps=4, seed=3, guidance={"B": 2.0, "A": 1.0})
    assert torch.equal(ab["C"], ba["C"])


# ----------------------------------------------------------------------------- per-sample condition draws
IDENTITY = {m: LatentNorm((0.0,) * 4, 1.0) for m in "ABCD"}


def _moments(b, seed=0):
    """(b, 8, 8, 8) moments with unit posterior variance, so that draws clearly differ."""
    return torch.cat([randn(b, *SHAPE, seed=seed), torch.zeros(b, *SHAPE)], dim=1)


def test_condition_latents__one_draw_per_sample_whatever_the_batch():
    cells, frags = ["c1", "c1", "c2"], [0, 1, 0]
    mom = {"A": _moments(3)}
    drawn = condition_latents(mom, IDENTITY, cells, frags, seed=5, deterministic=False, n_samples=3)["A"]
    assert drawn.shape == (9, *SHAPE)
    per_fragment = drawn.reshape(3, 3, *SHAPE)
    for f in range(3):  # the 3 samples of a fragment have 3 different draws
        s = per_fragment[f]
        assert not torch.equal(s[0], s[1]) and not torch.equal(s[0], s[2]) and not torch.equal(s[1], s[2])
    alone = condition_latents({"A": mom["A"][2:]}, IDENTITY, cells[2:], frags[2:], seed=5, deterministic=False,
                              n_samples=3)["A"]
    assert torch.equal(alone, drawn[6:9])
    again = condition_latents(mom, IDENTITY, cells, frags, seed=5, deterministic=False, n_samples=3)["A"]
    other = condition_latents(mom, IDENTITY, cells, frags, seed=6, deterministic=False, n_samples=3)["A"]
    assert torch.equal(again, drawn) and not torch.equal(other, drawn)
    mean = condition_latents(mom, IDENTITY, cells, frags, seed=5, deterministic=True, n_samples=3)["A"]
    assert torch.equal(mean, mom["A"][:, :4].repeat_interleave(3, dim=0))  # the mean, repeated


def test_sample_fragments__samples_use_their_own_condition_draws(tmp_path):
    net = tiny_net(("A", "B", "C"))
    net.save_pretrained(tmp_path / "model")
    cells, frags, n = ["c1", "c1", "c2", "c2"], [0, 1, 0, 1], 3
    mom = {"A": _moments(4)}
    cond = condition_latents(mom, IDENTITY, cells, frags, seed=7, deterministic=False, n_samples=n)
    options = SamplingOptions(n_samples=n, steps=2, seed=7, batch_size=3, device="cpu", guidance=1.0)
    out = sample_fragments(tmp_path / "model", FragmentBatch(cells, frags, cond), ["B"], options)
    assert out["A"].shape == (12, *SHAPE) and out["B"].shape == (12, *SHAPE)
    assert np.array_equal(out["A"], cond["A"].numpy().astype(np.float16))  # the per-sample draws are returned
    # ... and are what the network was given: the same as generate() fed those rows directly
    noise = fragment_noise(cells, frags, n, ["B"], 7, SHAPE)
    # (with guidance: the dropped condition A stands on its per-fragment noise too)
    marginal = fragment_noise(cells, frags, n, ["A", "C"], 7, SHAPE, tag="marginal:")
    direct = generate(net, cond, ["B"], steps=2, initial_noise=noise, marginal_noise=marginal,
                      guidance={"A": 1.0}, guidance_min_sigma=GUIDANCE_MIN_SIGMA)["B"]
    assert np.array_equal(out["B"], direct.numpy().astype(np.float16))
    # one fragment alone gets the same draws and samples as inside the bigger, differently chunked batch
    one = condition_latents({"A": mom["A"][3:]}, IDENTITY, cells[3:], frags[3:], seed=7, deterministic=False,
                            n_samples=n)
    alone = sample_fragments(tmp_path / "model", FragmentBatch(cells[3:], frags[3:], one), ["B"],
                             replace(options, batch_size=1))
    assert np.array_equal(alone["A"], out["A"][9:]) and np.array_equal(alone["B"], out["B"][9:])
    with pytest.raises(ValueError, match="one row per fragment sample"):  # a row per fragment is not enough
        sample_chunk(tmp_path / "model", FragmentBatch(cells, frags, {"A": mom["A"][:, :4]}), ["B"], options)


def test_sample_store__each_sample_has_its_own_condition_draw(store, tmp_path):
    """End to end on a store: the conditions written with the 3 samples of a fragment are 3
    posterior draws, and the same cell sampled alone or with another gives the same ones."""
    torch.manual_seed(0)
    MultiModalUViT(modalities=("DEM", "S1RTC", "S2L1C", "S2L2A"), **{**SMALL, "img_size": 32, "patch_size": 8}
                   ).eval().save_pretrained(tmp_path / "model")
    kwargs = dict(condition=("S2L1C",), generate_modalities=("DEM",))
    options = SamplingOptions(steps=2, n_samples=3, seed=5, device="cpu")
    alone = np.load(sample_store(tmp_path / "model", store, [WORLD_CELLS[0]], out=tmp_path / "alone", options=options,
                                 **kwargs).out / "samples.npz")
    both = np.load(sample_store(tmp_path / "model", store, list(WORLD_CELLS[:2]), out=tmp_path / "both",
                                options=replace(options, batch_size=5), **kwargs).out / "samples.npz")
    cond = alone["latent_S2L1C"].reshape(-1, 3, 4, 32, 32)
    for f in range(cond.shape[0]):
        assert not np.array_equal(cond[f, 0], cond[f, 1]) and not np.array_equal(cond[f, 1], cond[f, 2])
    first = both["grid_cell"] == WORLD_CELLS[0]
    assert np.array_equal(both["latent_S2L1C"][first], alone["latent_S2L1C"])
    assert np.array_equal(both["latent_DEM"][first], alone["latent_DEM"])
