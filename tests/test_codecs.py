"""Latent codecs: shapes, save/load round trips, the LDM state-dict path, honesty of PSNR."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from model.codecs import (SHIPPED_CODEC, Codec, LatentNorm, fit_patch_pca, latent_norms, load_codec,
                          moment_means, reconstruction_psnr, sample_latents, vae_from_ldm_state_dict)
from majortom_gen.fragments import to_unit_range
from model.train import SHIPPED_DEMO_MODEL

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
    assert reconstruction_psnr(codec, noise) < 15  # and it says so on white noise
    m = codec.encode_moments(x[:4])
    assert m.shape == (4, 8, 32, 32) and torch.all(m[:, 4:] == codec.model.config.logvar)
    z = sample_latents(m, 1.0, torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 32, 32) and 0.3 < z.std().item() < 3  # whitened: about unit variance
    rec = codec.decode(z)
    assert rec.shape == (4, 3, 256, 256) and rec.min() >= -1 and rec.max() <= 1
    codec.save(tmp_path / "pca")
    again = load_codec(None, str(tmp_path / "pca"))  # codec.json names it
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
    rec = codec.decode(sample_latents(m, 1.0))
    assert rec.shape == (2, 3, 256, 256)
    # what the published COP-GEN-Beta weights expect: 0.18215 * z for every modality
    assert codec.norm("DEM") == LatentNorm((0.0,) * 4, 0.18215)
    assert torch.allclose(codec.to_network(m, "S1RTC", sample=False), 0.18215 * m[:, :4])


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
    with pytest.raises(ValueError, match="valid codecs: small-vae, patch-pca, sd-vae"):
        load_codec("vqgan", "x")
    with pytest.raises(ValueError, match="valid codecs"):
        Codec("vqgan", torch.nn.Linear(1, 1))
    with pytest.raises(TypeError, match="a patch-pca codec needs a PatchPCAAutoencoder, got AutoencoderKL"):
        Codec("patch-pca", AutoencoderKL(**TINY_VAE))


def test_patch_pca__has_the_autoencoder_kl_interface():
    """patch-pca answers like diffusers' AutoencoderKL: encode -> latent_dist (its parameters
    the moments), decode -> sample; return_dict=False gives tuples, as diffusers does."""
    x = smooth_images(4)
    model = fit_patch_pca(x)[0].model
    moments = model.encode(x).latent_dist.parameters
    assert moments.shape == (4, 8, 32, 32) and torch.equal(moments, model.encode_moments(x))
    assert torch.equal(model.encode(x, return_dict=False)[0].mean, moment_means(moments))
    images = model.decode(moment_means(moments)).sample
    assert images.shape == (4, 3, 256, 256) and torch.equal(images, model.decode(moment_means(moments), return_dict=False)[0])


def test_moment_means__first_half_of_the_channels():
    m = torch.arange(2 * 8 * 3 * 3, dtype=torch.float16).reshape(2, 8, 3, 3)
    assert torch.equal(moment_means(m), m[:, :4]) and moment_means(m).dtype == torch.float16
    assert moment_means(torch.zeros(1, 6, 2, 2)).shape == (1, 3, 2, 2)


def test_shipped_codec__identity_is_what_the_demo_model_records():
    """The shipped small-vae's hash is what the shipped demo model (and every store encoded
    with it) records: a change to how codecs are hashed would orphan them."""
    recorded = json.loads((SHIPPED_DEMO_MODEL / "training_data.json").read_text())["codec"]
    info = load_codec("small-vae").info()
    assert (info["name"], info["config_hash"]) == (recorded["name"], recorded["config_hash"])


def test_latent_norm__fit_round_trip_and_record():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 4, 8, 8, generator=g) * 3.0 + torch.tensor([1.0, -2.0, 0.5, 0.0]).view(1, 4, 1, 1)
    norm = LatentNorm.fit(z)
    x = norm.to_network(z)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3  # what the noise schedule assumes
    assert torch.allclose(norm.from_network(x), z, atol=1e-4)
    assert LatentNorm.from_dict(norm.as_dict()) == norm
    info = {"name": "small-vae", "config": {"latent_norm": {"DEM": norm.as_dict()}}}
    got = latent_norms(info, ["DEM", "S1RTC"])
    assert got["DEM"] == norm and got["S1RTC"] == LatentNorm((0.0,) * 4, 1.0)  # a modality without a fit: identity


def test_patch_pca__one_norm_per_modality(tmp_path):
    a, b = smooth_images(8, seed=1), smooth_images(8, seed=2) * 0.2  # b: a quarter of the contrast
    codec, _ = fit_patch_pca({"A": a, "B": b})
    assert set(codec.norms) == {"A", "B"} and codec.norm("B").scale > 2 * codec.norm("A").scale
    for m, x in (("A", a), ("B", b)):
        net = codec.to_network(codec.encode_moments(x), m, sample=False)
        assert abs(float(net.std()) - 1) < 0.05
    codec.save(tmp_path / "pca")
    again = load_codec("patch-pca", tmp_path / "pca")
    assert again.norms == codec.norms and again.info() == codec.info()
    with pytest.raises(ValueError, match="holds a patch-pca codec, not small-vae"):
        load_codec("small-vae", tmp_path / "pca")


def test_shipped_codec__loads_offline_and_reconstructs(world):
    """The small-vae shipped in the package: a learned kl-f8 AutoencoderKL with one
    normalisation per Core modality and the record of how it was made; it reconstructs
    thumbnails of cells it was not trained on (a world of another seed) like an image codec.
    It is made for Major TOM thumbnails, not for any picture."""
    from pipelines.codec import psnr_by_modality, source_fragments

    codec = load_codec("small-vae")
    assert codec.source == str(SHIPPED_CODEC) and sum(p.numel() for p in codec.model.parameters()) < 5_000_000
    assert set(codec.norms) == {"DEM", "S1RTC", "S2L1C", "S2L2A"}
    made = codec.provenance
    assert made["command"].startswith("majortom-gen codec train") and made["cells"] and made["train"]["seed"] == 0
    frags = source_fragments(world, ["501U_60R"])
    psnr = psnr_by_modality(codec, {m: a[:8] for m, a in frags.items()})
    assert min(psnr.values()) > 24, psnr
    assert codec.encode_moments(torch.from_numpy(frags["DEM"][:2]).permute(0, 3, 1, 2) / 127.5 - 1).shape == (2, 8, 32, 32)


def test_codec_train_cli__writes_a_loadable_codec_with_its_record(world, tmp_path):
    """`majortom-gen codec train` end to end on a real (synthetic) source, a few steps: the
    folder loads by itself, records how it was made and one normalisation per modality, and
    `codec eval` measures it on the source and on an image file."""
    from PIL import Image
    from typer.testing import CliRunner

    from pipelines.cli import app

    runner = CliRunner()
    out = tmp_path / "codec"
    r = runner.invoke(app, ["codec", "train", "--source", str(world), "--cells", "501U_60R", "--out", str(out),
                            "--steps", "3", "--crop", "32", "--batch-size", "2", "--seed", "3"])
    assert r.exit_code == 0, r.output
    codec = load_codec(None, out)
    assert codec.name == "small-vae" and set(codec.norms) == {"DEM", "S1RTC", "S2L1C", "S2L2A"}
    made = codec.provenance
    assert made["cells"] == ["501U_60R"] and made["train"]["steps"] == 3 and made["train"]["seed"] == 3
    assert made["fragments"] == {"DEM": 16, "S1RTC": 16, "S2L1C": 16, "S2L2A": 16} and "--seed 3" in made["command"]
    png = tmp_path / "fragment.png"
    Image.fromarray(np.full((256, 256, 3), 90, np.uint8)).save(png)
    r = runner.invoke(app, ["codec", "eval", "--codec", str(out), "--source", str(world), "--cells", "501U_60R",
                            "--images", str(png)])
    assert r.exit_code == 0, r.output
    assert "DEM" in r.output and "fragment.png:" in r.output and " dB" in r.output
    r = runner.invoke(app, ["codec", "train", "--source", str(world), "--cells", "501U_60R", "--out", str(out),
                            "--steps", "1", "--crop", "30"])
    assert r.exit_code == 2 and "multiple of 8" in r.output


def test_codec_tune_decoder_cli__keeps_the_encoder_and_identity_and_decodes_with_the_tuned_weights(world, tmp_path):
    """`majortom-gen codec tune-decoder` on the shipped codec, a few steps: the new folder has
    the same encoder, normalisations and hash (a store made with the codec decodes with it),
    a decoder that differs and is what `decode` uses, and the record of how it was made;
    saved and loaded again it decodes the same; a decoder file that does not fit is a clear error."""
    from typer.testing import CliRunner

    from model.codecs import DECODER_FILE
    from pipelines.cli import app

    out = tmp_path / "tuned"
    r = CliRunner().invoke(app, ["codec", "tune-decoder", "--source", str(world), "--cells", "501U_60R", "--out", str(out),
                                 "--steps", "4", "--crop", "32", "--batch-size", "2", "--lr", "1e-3",
                                 "--latent-noise", "0.5", "--seed", "2", "--psnr-fragments", "1"])
    assert r.exit_code == 0, r.output
    shipped, tuned = load_codec("small-vae"), load_codec(None, out)
    assert tuned.info() == shipped.info() and tuned.norms == shipped.norms
    made = tuned.decoder_record
    assert made["command"].startswith("majortom-gen codec tune-decoder") and "--latent-noise 0.5" in made["command"]
    assert made["cells"] == ["501U_60R"] and made["tune"]["steps"] == 4 and made["tune"]["seed"] == 2
    assert set(made["psnr_db"]["clean latents"]["after"]) == {"DEM", "S1RTC", "S2L1C", "S2L2A"}
    x = torch.from_numpy(to_unit_range(np.stack([np.full((256, 256, 3), v, np.uint8) for v in (40, 200)])))
    z = moment_means(shipped.encode_moments(x))
    assert torch.equal(z, moment_means(tuned.encode_moments(x)))  # the encoder is untouched
    assert float((tuned.decode(z) - shipped.decode(z)).abs().max()) > 1e-4  # the tuned decoder decodes
    tuned.save(tmp_path / "again")
    assert torch.allclose(load_codec(None, tmp_path / "again").decode(z), tuned.decode(z), atol=1e-6)
    (out / DECODER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="tuned decoder decoder.safetensors cannot be read"):
        load_codec(None, out)


def test_shipped_codec__tuned_decoder_draws_noisy_latents_smoother_at_the_same_fidelity(world):
    """The shipped small-vae decodes with a decoder tuned on noisy latents (`codec tune-decoder`,
    recorded in its codec.json). On cells it never saw: a latent error like a diffusion
    model's (Gaussian, std 0.3 of the network's unit-variance latents) decodes at least 10%
    less rough than with the original decoder (the speckle and 8 px blocks of generated DEM),
    while clean latents reconstruct within 2 dB of the original decoder (DEM loses 1-1.6 dB:
    the price of the smoothing; S2L2A gains 1.3 dB)."""
    import copy

    from model.metrics import mean_abs_gradient
    from pipelines.codec import source_fragments

    tuned = load_codec("small-vae")
    assert tuned.decoder is not None and tuned.decoder_record["command"].startswith("majortom-gen codec tune-decoder")
    original = copy.copy(tuned)
    original.decoder = None
    x = torch.from_numpy(to_unit_range(source_fragments(world, ["501U_60R"], ("DEM",))["DEM"][:4]))
    base = tuned.to_network(tuned.encode_moments(x), "DEM", sample=False)
    noisy = base + 0.3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))

    def rough(images: torch.Tensor) -> float:
        return mean_abs_gradient(images.permute(0, 2, 3, 1).numpy())

    def psnr(images: torch.Tensor) -> float:
        return float(10 * torch.log10(4.0 / ((images - x) ** 2).mean()))

    assert rough(tuned.decode_network(noisy, "DEM")) < 0.9 * rough(original.decode_network(noisy, "DEM"))
    assert psnr(tuned.decode_network(base, "DEM")) > psnr(original.decode_network(base, "DEM")) - 2.0  # measured -1.5
