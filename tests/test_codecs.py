"""Latent codecs: shapes, save/load round trips, the LDM state-dict path, honesty of PSNR."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from model.codecs import Codec, fit_patch_pca, load_codec, reconstruction_psnr, sample_latents, vae_from_ldm_state_dict

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                block_out_channels=[8, 16, 16, 16], norm_num_groups=4, act_fn="silu",
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def smooth_images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(256, 256), mode="bilinear", align_corners=False)


def test_patch_pca__shapes_psnr_and_roundtrip(tmp_path):
    x = smooth_images()
    codec, psnr = fit_patch_pca(x)
    assert psnr > 30  # smooth images are nearly linear in 8x8 blocks
    noise = torch.rand(4, 3, 256, 256) * 2 - 1
    assert reconstruction_psnr(codec.model, noise) < 15  # and it says so on white noise
    m = codec.encode_moments(x[:4])
    assert m.shape == (4, 8, 32, 32) and torch.all(m[:, 4:] == codec.model.config.logvar)
    z = codec.sample(m, torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 32, 32) and 0.3 < z.std().item() < 3  # scaled to about unit variance
    rec = codec.decode(z)
    assert rec.shape == (4, 3, 256, 256) and rec.min() >= -1 and rec.max() <= 1
    codec.save(tmp_path / "pca")
    again = load_codec("patch-pca", str(tmp_path / "pca"))
    assert again.info() == codec.info()
    assert torch.equal(again.encode_moments(x[:2]), codec.encode_moments(x[:2]))


def test_sample_latents__uses_logvar():
    m = torch.zeros(1000, 8, 2, 2)
    m[:, 4:] = 2 * np.log(3.0)  # std 3
    z = sample_latents(m, 0.5, torch.Generator().manual_seed(0))
    assert abs(z.std().item() - 1.5) < 0.1


def test_sd_vae__from_pretrained_folder(tmp_path):
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    codec = load_codec("sd-vae", str(tmp_path / "vae"))
    x = smooth_images(2)
    m = codec.encode_moments(x)
    assert m.shape == (2, 8, 32, 32)  # kl-f8: 4 blocks, 3 downsamplings
    rec = codec.decode(codec.sample(m))
    assert rec.shape == (2, 3, 256, 256)
    assert codec.scale_factor == pytest.approx(0.18215)


def _to_ldm(state: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> the original LDM/U-ViT keys (the inverse of diffusers'
    converter), written out here to make a state dict in the published format."""
    out = {}
    for k, v in state.items():
        k2 = k
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k2)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                    lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                    lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample", k2)
        k2 = re.sub(r"(encoder|decoder)\.mid_block\.resnets\.(\d)", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}", k2)
        k2 = k2.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k2 = k2.replace(f"mid_block.attentions.0.{a}", f"mid.attn_1.{b}")
        k2 = k2.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".mid.attn_1." in k2 and k2.endswith("weight") and "norm" not in k2:
            v = v[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        out[k2] = v
    return out


def test_sd_vae__from_ldm_state_dict_file(tmp_path):
    torch.manual_seed(1)
    ref = AutoencoderKL(**TINY_VAE).eval()
    state = _to_ldm(ref.state_dict(), len(TINY_VAE["block_out_channels"]))
    assert any(k.startswith("encoder.down.0.block.0") for k in state)
    torch.save(state, tmp_path / "autoencoder_kl_ema.pth")
    loaded = vae_from_ldm_state_dict(torch.load(tmp_path / "autoencoder_kl_ema.pth", weights_only=True), TINY_VAE).eval()
    x = smooth_images(1)
    with torch.no_grad():
        a = ref.encode(x).latent_dist.parameters
        b = loaded.encode(x).latent_dist.parameters
    assert torch.allclose(a, b, atol=1e-5)


def test_codec__unknown_names():
    with pytest.raises(ValueError, match="valid codecs: patch-pca, sd-vae"):
        load_codec("vqgan", "x")
    with pytest.raises(ValueError, match="valid codecs"):
        Codec("vqgan", torch.nn.Linear(1, 1))
