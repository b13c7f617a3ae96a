"""The multimodal U-ViT, the schedule, sampling, the converter and training."""

from __future__ import annotations

import json

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.codecs import LatentNorm
from model.config import load_config
from model.convert import from_cop_gen, from_cop_gen_beta
from model.diffusion import NOISE_TIMESTEP, alphas_cumprod, draw_timesteps, noisy_inputs, predict_x0, sampling_scheduler
from model.sample import chain, generate, network_step
from model.train import train
from model.uvit import MultiModalUViT

SMALL = dict(img_size=8, in_chans=4, patch_size=2, embed_dim=32, depth=2, num_heads=4)


def net_of(modalities=("A", "B"), seed=0, **kw):
    torch.manual_seed(seed)
    return MultiModalUViT(modalities=modalities, **{**SMALL, **kw}).eval()


def inputs(net, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, s = net.config.in_chans, net.config.img_size
    lat = {m: torch.randn(b, c, s, s, generator=g) for m in net.modalities}
    ts = {m: torch.randint(0, 1001, (b,), generator=g).float() for m in net.modalities}
    return lat, ts


@pytest.mark.parametrize("mods", [("DEM",), ("DEM", "S1RTC"), ("DEM", "S1RTC", "S2L1C", "S2L2A")])
def test_uvit__shapes_for_any_modality_count(mods):
    net = net_of(mods)
    lat, ts = inputs(net)
    out = net(lat, ts)
    assert set(out) == set(mods) and all(out[m].shape == lat[m].shape for m in mods)


def test_uvit__validates_config_and_inputs():
    with pytest.raises(ValueError, match="distinct"):
        MultiModalUViT(modalities=("A", "A"), **SMALL)
    with pytest.raises(ValueError, match="depth must be even"):
        MultiModalUViT(modalities=("A",), **{**SMALL, "depth": 3})
    net = net_of()
    lat, ts = inputs(net)
    with pytest.raises(ValueError, match=r"missing latents/timesteps for \['B'\]"):
        net({"A": lat["A"]}, {"A": ts["A"]})


def test_uvit__gradients_reach_every_parameter():
    net = net_of(mlp_time_embed=True).train()
    lat, ts = inputs(net)
    out = net(lat, ts)
    sum((o**2).mean() for o in out.values()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_uvit__gradient_checkpointing_same_result():
    net = net_of().train()
    lat, ts = inputs(net)
    a = net(lat, ts)["A"]
    net.enable_gradient_checkpointing()
    b = net(lat, ts)["A"]
    assert torch.allclose(a, b, atol=1e-6)


def test_uvit__save_load_roundtrip(tmp_path):
    net = net_of()
    net.save_pretrained(tmp_path / "m")
    again = MultiModalUViT.from_pretrained(tmp_path / "m").eval()
    lat, ts = inputs(net)
    assert again.modalities == ["A", "B"]
    assert torch.equal(net(lat, ts)["B"], again(lat, ts)["B"])


# ----------------------------------------------------------------------------- converter
def official_state_dict(n_mod, embed_dim, depth, num_heads, patch_size, img_size, in_chans, qkv_bias, seed=0):
    """A random state dict with the published COP-GEN-Beta checkpoint's key names and shapes."""
    return official_state_dict_per_modality([(in_chans, patch_size, (img_size // patch_size) ** 2)] * n_mod,
                                            embed_dim, depth, qkv_bias, seed)


def official_state_dict_per_modality(specs, embed_dim, depth, qkv_bias, seed=0):
    """A random state dict with the official key names and shapes; ``specs``: one
    (latent channels, patch size, number of tokens) per modality (COP-GEN: they differ)."""
    g = torch.Generator().manual_seed(seed)
    d, hid = embed_dim, 4 * embed_dim
    n_tok = len(specs) + sum(n for _, _, n in specs)
    shapes = {"pos_embed": (1, n_tok, d), "norm.weight": (d,), "norm.bias": (d,)}
    for i, (c, p, _) in enumerate(specs):
        shapes[f"patch_embeds.{i}.proj.weight"] = (d, c, p, p)
        shapes[f"patch_embeds.{i}.proj.bias"] = (d,)
        shapes[f"decoder_preds.{i}.weight"] = (p * p * c, d)
        shapes[f"decoder_preds.{i}.bias"] = (p * p * c,)

    def block(prefix, skip):
        for ln in ("norm2", "norm3") + (("norm1",) if skip else ()):
            shapes[f"{prefix}.{ln}.weight"] = shapes[f"{prefix}.{ln}.bias"] = (d,)
        shapes[f"{prefix}.attn.qkv.weight"] = (3 * d, d)
        if qkv_bias:
            shapes[f"{prefix}.attn.qkv.bias"] = (3 * d,)
        shapes[f"{prefix}.attn.proj.weight"], shapes[f"{prefix}.attn.proj.bias"] = (d, d), (d,)
        shapes[f"{prefix}.mlp.fc1.weight"], shapes[f"{prefix}.mlp.fc1.bias"] = (hid, d), (hid,)
        shapes[f"{prefix}.mlp.fc2.weight"], shapes[f"{prefix}.mlp.fc2.bias"] = (d, hid), (d,)
        if skip:
            shapes[f"{prefix}.skip_linear.weight"], shapes[f"{prefix}.skip_linear.bias"] = (d, 2 * d), (d,)

    for k in range(depth // 2):
        block(f"in_blocks.{k}", False)
        block(f"out_blocks.{k}", True)
    block("mid_block", False)
    return {k: torch.randn(s, generator=g) * 0.1 + (1.0 if k.endswith("norm2.weight") else 0.0) for k, s in shapes.items()}


def reference_forward(sd, imgs, ts, embed_dim, depth, num_heads, patch_size, in_chans, scalar=()):
    """The published network's computation, written out from the paper's description.
    ``patch_size``/``in_chans``: one value, or one per modality; modality i in ``scalar`` is a
    (B, C, 1, N) token row (patch 1) whose output is (B, C, 1, N), as COP-GEN's scalars."""
    d, n_mod = embed_dim, len(imgs)
    ps = patch_size if isinstance(patch_size, (list, tuple)) else [patch_size] * n_mod
    cs = in_chans if isinstance(in_chans, (list, tuple)) else [in_chans] * n_mod
    half = d // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    tok_t = [torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)[:, None] for t in ts]
    for i, emb in enumerate(tok_t):  # mlp_time_embed: Linear(D, 4D), SiLU, Linear(4D, D) per modality
        if f"time_img_embeds.{i}.0.weight" in sd:
            hidden = F.silu(F.linear(emb, sd[f"time_img_embeds.{i}.0.weight"], sd[f"time_img_embeds.{i}.0.bias"]))
            tok_t[i] = F.linear(hidden, sd[f"time_img_embeds.{i}.2.weight"], sd[f"time_img_embeds.{i}.2.bias"])
    tok_p = [F.conv2d(x, sd[f"patch_embeds.{i}.proj.weight"], sd[f"patch_embeds.{i}.proj.bias"], stride=ps[i])
             .flatten(2).transpose(1, 2) for i, x in enumerate(imgs)]
    x = torch.cat(tok_t + tok_p, 1) + sd["pos_embed"]

    def ln(x, p):
        return F.layer_norm(x, (d,), sd[f"{p}.weight"], sd[f"{p}.bias"])

    def block(p, x, skip=None):
        if skip is not None:
            x = ln(F.linear(torch.cat([x, skip], -1), sd[f"{p}.skip_linear.weight"], sd[f"{p}.skip_linear.bias"]), f"{p}.norm1")
        b, l, _ = x.shape
        qkv = F.linear(x, sd[f"{p}.attn.qkv.weight"], sd.get(f"{p}.attn.qkv.bias"))
        q, k, v = qkv.reshape(b, l, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // num_heads), -1) @ v
        x = ln(x + F.linear(att.transpose(1, 2).reshape(b, l, d), sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"]), f"{p}.norm2")
        h = F.linear(F.gelu(F.linear(x, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])), sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
        return ln(x + h, f"{p}.norm3")

    skips = []
    for k in range(depth // 2):
        x = block(f"in_blocks.{k}", x)
        skips.append(x)
    x = block("mid_block", x)
    for k in range(depth // 2):
        x = block(f"out_blocks.{k}", x, skips.pop())
    x = ln(x, "norm")
    outs, start = [], n_mod
    for i in range(n_mod):
        n, p, c = tok_p[i].shape[1], ps[i], cs[i]
        vec = F.linear(x[:, start:start + n], sd[f"decoder_preds.{i}.weight"], sd[f"decoder_preds.{i}.bias"])
        start += n
        if i in scalar:  # (B, N, C) -> (B, C, 1, N)
            outs.append(vec.transpose(1, 2).unsqueeze(2))
            continue
        side = int(math.isqrt(n))
        img = torch.zeros(vec.shape[0], c, side * p, side * p)
        for hi in range(side):  # patch vectors are ordered (p1, p2, C)
            for wi in range(side):
                for p1 in range(p):
                    for p2 in range(p):
                        for ci in range(c):
                            img[:, ci, hi * p + p1, wi * p + p2] = vec[:, hi * side + wi, (p1 * p + p2) * c + ci]
        outs.append(img)
    return outs


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_converter__identical_outputs(qkv_bias):
    cfg = dict(embed_dim=32, depth=4, num_heads=4, patch_size=2, img_size=8, in_chans=4, qkv_bias=qkv_bias)
    sd = official_state_dict(4, **cfg)
    sd = {f"module.{k}": v for k, v in sd.items()}  # as saved from a DataParallel/accelerate wrapper
    net = from_cop_gen_beta(sd, **cfg, mlp_time_embed=False)
    g = torch.Generator().manual_seed(3)
    imgs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(4)]
    ts = [torch.tensor([0.0, 1000.0]), torch.tensor([1.0, 500.0]), torch.tensor([999.0, 3.0]), torch.tensor([250.0, 0.0])]
    ref = reference_forward({k.removeprefix("module."): v for k, v in sd.items()}, imgs, ts,
                            cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"], cfg["in_chans"])
    with torch.no_grad():
        out = net(dict(zip(net.modalities, imgs)), dict(zip(net.modalities, ts)))
    for i, m in enumerate(("DEM", "S1RTC", "S2L1C", "S2L2A")):
        assert torch.allclose(out[m], ref[i], atol=1e-5), m


def test_converter__mismatch_is_explained():
    sd = official_state_dict(4, embed_dim=32, depth=4, num_heads=4, patch_size=2, img_size=8, in_chans=4, qkv_bias=False)
    with pytest.raises(ValueError, match="wrong shapes"):
        from_cop_gen_beta(sd, embed_dim=32, depth=4, num_heads=4, patch_size=2, img_size=16, in_chans=4)
    with pytest.raises(ValueError, match="4 modalities but 2 names"):
        from_cop_gen_beta(sd, modalities=("A", "B"), embed_dim=32, depth=4, num_heads=4, patch_size=2, img_size=8)


# COP-GEN base's modality kinds at toy sizes: two scalars, then image groups of three latent sizes
COP_GEN_TOY = {
    "3d_cartesian_lat_lon": {"modality_type": "scalar", "latent_channels": 1, "latent_input_resolution": (1, 3), "patch_size": 1},
    "mean_timestamps": {"modality_type": "scalar", "latent_channels": 1, "latent_input_resolution": (1, 3), "patch_size": 1},
    "DEM_DEM": {"modality_type": "image", "latent_channels": 8, "latent_input_resolution": (4, 4), "patch_size": 2},
    "S2L2A_B02_B03_B04_B08": {"modality_type": "image", "latent_channels": 8, "latent_input_resolution": (6, 6), "patch_size": 2},
    "S2L2A_B01_B09": {"modality_type": "image", "latent_channels": 8, "latent_input_resolution": (2, 2), "patch_size": 1},
}


@pytest.mark.parametrize("mlp_time_embed", [False, True])
def test_cop_gen_converter__identical_outputs(mlp_time_embed):
    specs = [(s["latent_channels"], s["patch_size"],
              s["latent_input_resolution"][1] if s["modality_type"] == "scalar"
              else (s["latent_input_resolution"][0] // s["patch_size"]) ** 2) for s in COP_GEN_TOY.values()]
    sd = official_state_dict_per_modality(specs, embed_dim=32, depth=4, qkv_bias=False, seed=5)
    if mlp_time_embed:  # the official time MLP per modality: Linear(D, 4D), SiLU, Linear(4D, D)
        g = torch.Generator().manual_seed(6)
        for i in range(len(specs)):
            sd[f"time_img_embeds.{i}.0.weight"] = torch.randn(128, 32, generator=g) * 0.1
            sd[f"time_img_embeds.{i}.0.bias"] = torch.randn(128, generator=g) * 0.1
            sd[f"time_img_embeds.{i}.2.weight"] = torch.randn(32, 128, generator=g) * 0.1
            sd[f"time_img_embeds.{i}.2.bias"] = torch.randn(32, generator=g) * 0.1
    net = from_cop_gen(sd, COP_GEN_TOY, embed_dim=32, depth=4, num_heads=4, mlp_time_embed=mlp_time_embed)
    g = torch.Generator().manual_seed(3)
    shapes = {m: (s["latent_channels"], *s["latent_input_resolution"]) for m, s in COP_GEN_TOY.items()}
    imgs = [torch.randn(2, *shapes[m], generator=g) for m in COP_GEN_TOY]
    ts = [torch.tensor([0.0, 1000.0]), torch.tensor([1.0, 500.0]), torch.tensor([999.0, 3.0]),
          torch.tensor([250.0, 0.0]), torch.tensor([7.0, 70.0])]
    with torch.no_grad():
        out = net(dict(zip(net.modalities, imgs)), dict(zip(net.modalities, ts)))
    ref = reference_forward(sd, imgs, ts, 32, 4, 4, [s["patch_size"] for s in COP_GEN_TOY.values()],
                            [s["latent_channels"] for s in COP_GEN_TOY.values()], scalar=(0, 1))
    for i, m in enumerate(COP_GEN_TOY):
        assert out[m].shape == (2, *shapes[m]), m
        assert torch.allclose(out[m], ref[i], atol=1e-5), m


def test_cop_gen_converter__wrong_specs_are_explained():
    specs = [(1, 1, 3), (8, 2, 4)]
    sd = official_state_dict_per_modality(specs, embed_dim=32, depth=2, qkv_bias=False)
    toy = {k: COP_GEN_TOY[k] for k in ("3d_cartesian_lat_lon", "DEM_DEM")}
    net = from_cop_gen(sd, toy, embed_dim=32, depth=2, num_heads=4)
    assert net.latent_shape("3d_cartesian_lat_lon") == (1, 1, 3) and net.latent_shape("DEM_DEM") == (8, 4, 4)
    with pytest.raises(ValueError, match="different latent shapes"):
        net.latent_shape()
    wrong = {**toy, "DEM_DEM": {**toy["DEM_DEM"], "latent_input_resolution": (8, 8)}}
    with pytest.raises(ValueError, match="wrong shapes"):
        from_cop_gen(sd, wrong, embed_dim=32, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="modality_type"):
        from_cop_gen(sd, {**toy, "DEM_DEM": {**toy["DEM_DEM"], "modality_type": "video"}}, embed_dim=32, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="wrong shape"):
        net({m: torch.zeros(1, 8, 8, 8) for m in net.modalities}, {m: torch.zeros(1) for m in net.modalities})


# ----------------------------------------------------------------------------- schedule
def test_schedule__scaled_linear_and_timestep_convention():
    abar = alphas_cumprod()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(abar, torch.cumprod(1 - betas, 0))
    x0 = {"A": torch.ones(3, 1, 2, 2)}
    steps = {"A": torch.tensor([-1, 0, 999])}
    noise = {"A": torch.zeros(3, 1, 2, 2)}
    xs, ts = noisy_inputs(x0, steps, noise)
    assert ts["A"].tolist() == [0.0, 1.0, 1000.0]  # network timesteps: 0 clean, k + 1 noisy
    assert xs["A"][0].eq(1).all() and torch.allclose(xs["A"][2], abar[999].sqrt().float() * torch.ones(1, 2, 2))
    drawn = draw_timesteps(20000, ["A"], p_clean=0.1, p_drop=0.2, generator=torch.Generator().manual_seed(0))["A"]
    assert abs((drawn == -1).float().mean() - 0.1) < 0.01 and (drawn == 999).float().mean() > 0.19


def test_zero_terminal_snr_schedule__last_step_is_pure_noise_and_sampling_starts_there():
    abar = alphas_cumprod(zero_terminal_snr=True)
    assert abar[-1] == 0 and abar[0] > 0.99 and alphas_cumprod()[-1] > 0.004  # the released one keeps signal
    x0, noise = {"A": torch.ones(1, 1, 2, 2)}, {"A": torch.full((1, 1, 2, 2), 0.5)}
    xs, _ = noisy_inputs(x0, {"A": torch.tensor([999])}, noise, zero_terminal_snr=True)
    assert torch.equal(xs["A"], noise["A"])  # no leftover of the clean latent
    with pytest.raises(ValueError, match="needs prediction 'v'"):
        net_of(zero_terminal_snr=True)
    net = net_of(prediction="v", zero_terminal_snr=True)
    lat = {m: torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) for m in net.modalities}
    ts = {m: torch.full((2,), NOISE_TIMESTEP) for m in net.modalities}
    with torch.no_grad():
        v, x0_hat = net(lat, ts), predict_x0(net, lat, ts)
    assert all(torch.allclose(x0_hat[m], -v[m]) for m in net.modalities)  # x0 = sqrt(abar) x - sqrt(1 - abar) v
    released, zero = sampling_scheduler(25), sampling_scheduler(25, zero_terminal_snr=True, prediction="v")
    assert zero.timesteps.tolist() == released.timesteps.tolist() and zero.timesteps[0] == 999
    assert zero.sigmas[0] > 1000 > released.sigmas[0]  # the first step is taken from pure noise
    out = generate(net, {"B": lat["B"]}, ["A"], steps=4, seed=0)
    assert torch.isfinite(out["A"]).all() and out["A"].std() > 0.1


# ----------------------------------------------------------------------------- sampling
class Spy(torch.nn.Module):
    """Wraps a network and records what each call received."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    @property
    def config(self):
        return self.net.config

    def forward(self, lat, ts):
        self.calls.append(({m: v.clone() for m, v in lat.items()}, {m: v.clone() for m, v in ts.items()}))
        return self.net(lat, ts)


def test_generate__conditions_clean_marginals_fixed_noise():
    spy = Spy(net_of(("A", "B", "C")))
    cond = {"A": torch.randn(2, 4, 8, 8)}
    before = cond["A"].clone()
    out = generate(spy, cond, ["B"], n_samples=2, steps=6, seed=0)
    assert torch.equal(cond["A"], before) and torch.equal(out["A"], before.repeat_interleave(2, 0))
    assert out["B"].shape == (4, 4, 8, 8)
    first_c = spy.calls[0][0]["C"]
    for lat, ts in spy.calls:
        assert torch.equal(lat["A"], before.repeat_interleave(2, 0)) and (ts["A"] == 0).all()
        assert torch.equal(lat["C"], first_c) and (ts["C"] == NOISE_TIMESTEP).all()  # one fixed draw, final timestep
    assert len({float(ts["B"][0]) for _, ts in spy.calls}) == 6


def test_generate__seeded_and_initial_noise():
    net = net_of()
    cond = {"A": torch.randn(2, 4, 8, 8)}
    a = generate(net, cond, ["B"], steps=5, seed=1)["B"]
    b = generate(net, cond, ["B"], steps=5, seed=1)["B"]
    c = generate(net, cond, ["B"], steps=5, seed=2)["B"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(2, 4, 8, 8)
    d = generate(net, cond, ["B"], steps=5, seed=1, initial_noise={"B": noise})["B"]
    e = generate(net, cond, ["B"], steps=5, seed=9, initial_noise={"B": noise})["B"]
    assert torch.equal(d, e)


def test_generate__guidance_unconditional_and_errors():
    net = net_of(("A", "B", "C"))
    cond = {"A": torch.randn(1, 4, 8, 8)}
    plain = generate(net, cond, ["B", "C"], steps=4, seed=0)
    guided = generate(net, cond, ["B", "C"], steps=4, seed=0, guidance={"A": 2.0})
    assert not torch.allclose(plain["B"], guided["B"])
    uncond = generate(net, {}, ["A"], n_samples=3, steps=4, seed=0)
    assert uncond["A"].shape == (3, 4, 8, 8)
    with pytest.raises(ValueError, match="both conditions and generated"):
        generate(net, cond, ["A"])
    with pytest.raises(ValueError, match="unknown modalities"):
        generate(net, cond, ["Z"])
    with pytest.raises(ValueError, match="not conditions"):
        generate(net, cond, ["B"], guidance={"C": 1.0})
    loops = chain(network_step(net, seed=0, steps=3), {"A": cond["A"]}, ["A"], ["B"], 3)
    assert [sorted(x) for x in loops] == [["B"], ["A"], ["B"]]  # each iteration's generated side
    assert torch.equal(loops[0]["B"], generate(net, cond, ["B"], steps=3, seed=0)["B"])
    assert torch.equal(loops[1]["A"], generate(net, loops[0], ["A"], steps=3, seed=1)["A"])  # seed + iteration


def test_chain__alternates_sides_and_counts_iterations():
    calls = []

    def step(condition, modalities, iteration):
        calls.append((sorted(condition), modalities, iteration))
        return {m: sum(condition.values()) + 1 for m in modalities}

    out = chain(step, {"A": torch.zeros(1), "C": torch.zeros(1), "X": torch.ones(1)}, ["A", "C"], ["B"], 3)
    assert calls == [(["A", "C"], ["B"], 0), (["B"], ["A", "C"], 1), (["A", "C"], ["B"], 2)]
    assert [{m: float(v) for m, v in x.items()} for x in out] == [{"B": 1.0}, {"A": 2.0, "C": 2.0}, {"B": 5.0}]
    with pytest.raises(ValueError, match="non-empty and disjoint"):
        chain(step, {"A": torch.zeros(1)}, ["A"], ["A"], 1)
    with pytest.raises(ValueError, match="start lacks"):
        chain(step, {}, ["A"], ["B"], 1)
    with pytest.raises(ValueError, match="not all of"):
        chain(lambda c, g, i: {}, {"A": torch.zeros(1)}, ["A"], ["B"], 1)


# ----------------------------------------------------------------------------- training
def _pairs(n=2048, seed=0, side=4):
    """Latent pairs where B is a fixed function of A: A is white noise (so B alone is as hard
    to denoise as noise gets) and B = -A (so given A, B is known exactly)."""
    a = torch.randn(n, 4, side, side, generator=torch.Generator().manual_seed(seed))
    b = -a
    moments = lambda x: np.concatenate([x.numpy(), np.full_like(x.numpy(), -30.0)], axis=1)  # noqa: E731
    return moments(a), moments(b), a, b


IDENTITY = {m: LatentNorm((0.0,) * 4, 1.0) for m in ("A", "B")}


def tiny_cfg(**train):
    cfg = load_config("tiny")
    nnet = dict(modalities=["A", "B"], img_size=4, in_chans=4, patch_size=4, embed_dim=64, depth=2, num_heads=4)
    from dataclasses import replace

    cfg = replace(cfg, nnet=nnet, optimizer=replace(cfg.optimizer, lr=2e-3, warmup_steps=10))
    return cfg.with_train(**{"batch_size": 64, "p_clean": 0.3, "p_drop": 0.1, "ema_decay": 0.9, "checkpoint_every": 3,
                             "log_every": 1, **train})


def test_train__resume_equals_uninterrupted(tmp_path):
    ma, mb, _, _ = _pairs(256)
    cfg = tiny_cfg()
    full = train(cfg, {"A": ma, "B": mb}, tmp_path / "full", norms=IDENTITY, max_steps=6)
    train(cfg, {"A": ma, "B": mb}, tmp_path / "part", norms=IDENTITY, max_steps=3)
    with open(tmp_path / "part" / "log.jsonl", "a") as log:  # logged after the checkpoint, then killed
        log.write(json.dumps({"step": 4, "loss": 9.0}) + "\n")
    resumed = train(cfg, {"A": ma, "B": mb}, tmp_path / "part", norms=IDENTITY, max_steps=6, resume=True)
    assert resumed.losses == full.losses[3:]
    assert (tmp_path / "part" / "log.jsonl").read_text() == (tmp_path / "full" / "log.jsonl").read_text()
    a = MultiModalUViT.from_pretrained(tmp_path / "full" / "model")
    b = MultiModalUViT.from_pretrained(tmp_path / "part" / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="pass --resume"):
        train(cfg, {"A": ma, "B": mb}, tmp_path / "full", norms=IDENTITY, max_steps=6)


def test_train__cosine_schedule_decays_to_zero_at_max_steps(tmp_path):
    """``optimizer.schedule: cosine`` warms up, then decays the learning rate to 0 at the run's
    last step (the logged lr); an unknown schedule is refused by name."""
    from dataclasses import replace

    ma, mb, _, _ = _pairs(64)
    cfg = tiny_cfg(log_every=1)
    cfg = replace(cfg, optimizer=replace(cfg.optimizer, warmup_steps=2, schedule="cosine"))
    train(cfg, {"A": ma, "B": mb}, tmp_path / "run", norms=IDENTITY, max_steps=8)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    peak = cfg.optimizer.lr
    assert lrs[1] == pytest.approx(peak) and all(b < a for a, b in zip(lrs[1:], lrs[2:])), lrs
    assert lrs[-1] < 0.05 * peak, lrs
    with pytest.raises(ValueError, match="optimizer.schedule: unknown 'step'"):
        replace(cfg.optimizer, schedule="step")


def test_train__learns_a_conditional(tmp_path):
    """800 CPU steps on pairs (A, B = -A): the denoiser predicts B from A clearly better than
    without A. Measured here: x0-prediction MSE with A about 0.12 / 0.26 / 0.63 at steps
    200 / 400 / 600 against 0.30 / 0.66 / 1.12 without (A replaced by noise at t=1000), a
    margin of about 2x; the test asks for 1.5x. (Sampling B from A is still poor after so few
    steps: the high-noise end needs far more training.)"""
    ma, mb, _, _ = _pairs(4096)
    res = train(tiny_cfg(ema_decay=0.95, checkpoint_every=10_000, log_every=50, p_clean=0.5), {"A": ma, "B": mb},
                tmp_path, norms=IDENTITY, max_steps=800)
    assert np.mean(res.losses[-50:]) < 0.7 * np.mean(res.losses[:50])
    net = MultiModalUViT.from_pretrained(res.model_dir).eval()
    _, _, a, b = _pairs(256, seed=5)
    abar = alphas_cumprod().float()
    g = torch.Generator().manual_seed(0)
    cond_err, uncond_err = [], []
    for k in (200, 400, 600):
        eps = torch.randn(b.shape, generator=g)
        xb = abar[k].sqrt() * b + (1 - abar[k]).sqrt() * eps
        t_b = torch.full((256,), k + 1.0)
        with torch.no_grad():
            e_c = net({"A": a, "B": xb}, {"A": torch.zeros(256), "B": t_b})["B"]
            e_u = net({"A": torch.randn(a.shape, generator=g), "B": xb}, {"A": torch.full((256,), NOISE_TIMESTEP), "B": t_b})["B"]
        x0 = lambda e: (xb - (1 - abar[k]).sqrt() * e) / abar[k].sqrt()  # noqa: E731
        cond_err.append(float(((x0(e_c) - b) ** 2).mean()))
        uncond_err.append(float(((x0(e_u) - b) ** 2).mean()))
    assert all(c < u / 1.5 for c, u in zip(cond_err, uncond_err)), (cond_err, uncond_err)
    sampled = generate(net, {"A": a[:8]}, ["B"], steps=10, seed=0)
    assert sampled["B"].shape == b[:8].shape and torch.isfinite(sampled["B"]).all()


def test_train__flip_moves_all_modalities_together(tmp_path, monkeypatch):
    """The paper's augmentation: a tuple is mirrored left-right as a whole, never one modality
    alone (the pairs stay aligned)."""
    import model.train as mt

    seen = []
    real_loss = mt.diffusion_loss

    def spy(net, x0, steps, **kw):
        seen.append({m: x.clone() for m, x in x0.items()})
        return real_loss(net, x0, steps, **kw)

    monkeypatch.setattr(mt, "diffusion_loss", spy)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 4, 4, 4, generator=g)
    mom = lambda x: np.concatenate([x.numpy(), np.full_like(x.numpy(), -30.0)], axis=1)  # noqa: E731
    train(tiny_cfg(batch_size=64, checkpoint_every=100), {"A": mom(a), "B": mom(-a)}, tmp_path, norms=IDENTITY, max_steps=3)
    kinds = []
    for batch in seen:
        assert torch.allclose(batch["B"], -batch["A"], atol=1e-3)  # still a pair, whichever way
        for x in batch["A"]:
            d_same = (a - x).abs().amax(dim=(1, 2, 3)).min()
            d_flip = (a.flip(-1) - x).abs().amax(dim=(1, 2, 3)).min()
            assert min(d_same, d_flip) < 1e-3  # every row is a source row, mirrored or not
            kinds.append(bool(d_flip < d_same))
    assert len(seen) == 3 and 0.3 < np.mean(kinds) < 0.7  # about half the tuples are mirrored


def test_train__init_from_starts_from_the_given_weights(tmp_path):
    ma, mb, _, _ = _pairs(64)
    first = train(tiny_cfg(), {"A": ma, "B": mb}, tmp_path / "a", norms=IDENTITY, max_steps=3)
    tuned = train(tiny_cfg(), {"A": ma, "B": mb}, tmp_path / "b", norms=IDENTITY, max_steps=1, init_from=first.model_dir)
    fresh = train(tiny_cfg(), {"A": ma, "B": mb}, tmp_path / "c", norms=IDENTITY, max_steps=1)
    start = MultiModalUViT.from_pretrained(first.model_dir).state_dict()
    after = MultiModalUViT.from_pretrained(tuned.model_dir).state_dict()
    scratch = MultiModalUViT.from_pretrained(fresh.model_dir).state_dict()
    near = lambda s: sum(float((s[k] - start[k]).abs().sum()) for k in start)  # noqa: E731
    assert near(after) < 0.5 * near(scratch)  # one step from the given weights, not from a fresh init
    other = tiny_cfg()
    from dataclasses import replace

    other = replace(other, nnet={**other.nnet, "embed_dim": 32})
    with pytest.raises(ValueError, match="its network differs"):
        train(other, {"A": ma, "B": mb}, tmp_path / "d", norms=IDENTITY, max_steps=1, init_from=first.model_dir)
