"""The native family (#14): COP-GEN's band-group registry, its normalisation, and the official
band-group VAE converted to diffusers, checked against the official computation written out."""

from __future__ import annotations

import math
from datetime import date

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from majortom_gen.errors import UnknownModalityError
from majortom_gen.native import (BAND_GROUPS, COPGEN_BASE_ORDER, decode_date, decode_lat_lon, encode_date,
                                 encode_lat_lon, from_model, get_band_group, network_modalities, to_model)
from model.codecs import from_cop_gen_vae, latent_norms, load_codec
from model.convert import cop_gen_network_config


# ----------------------------------------------------------------------------- registry
def test_registry__cop_gen_base_names_shapes_and_order():
    assert COPGEN_BASE_ORDER == (
        "3d_cartesian_lat_lon", "mean_timestamps", "DEM_DEM", "S1RTC_vh_vv", "S2L1C_B02_B03_B04_B08",
        "S2L1C_B05_B06_B07_B11_B12_B8A", "S2L1C_B01_B09_B10", "S2L2A_B02_B03_B04_B08",
        "S2L2A_B05_B06_B07_B11_B12_B8A", "S2L2A_B01_B09", "LULC_LULC", "S2L1C_cloud_mask")
    shapes = {n: g.latent for n, g in BAND_GROUPS.items()}
    assert shapes["S2L2A_B02_B03_B04_B08"] == (8, 24, 24) and shapes["S2L2A_B05_B06_B07_B11_B12_B8A"] == (8, 12, 12)
    assert shapes["S2L2A_B01_B09"] == (8, 4, 4) and shapes["DEM_DEM"] == (8, 8, 8)
    assert shapes["mean_timestamps"] == (1, 1, 3)
    for g in BAND_GROUPS.values():
        if not g.is_scalar:  # every patch covers the same ground: 1920 m (DEM: 64 px of 30 m)
            assert g.patch_px // 8 == g.latent[1]
            assert g.patch_px * g.resolution_m == 1920.0
    assert get_band_group("s1rtc_VH_VV").bands == ("vv", "vh")
    assert get_band_group("S2L2A_B05_B06_B07_B11_B12_B8A").bands == ("B05", "B06", "B07", "B8A", "B11", "B12")
    with pytest.raises(UnknownModalityError, match="valid"):
        get_band_group("S2L2A_B02")


def test_registry__network_config_of_cop_gen_base():
    config = cop_gen_network_config(network_modalities())
    assert config["modalities"] == COPGEN_BASE_ORDER
    assert config["img_size"]["3d_cartesian_lat_lon"] == [1, 3] and config["patch_size"]["3d_cartesian_lat_lon"] == 1
    assert config["img_size"]["S1RTC_vh_vv"] == [24, 24] and config["patch_size"]["S1RTC_vh_vv"] == 2
    # 12 time tokens; lat/lon 3, date 3, DEM 16, S1 144, S2L1C 144 + 36 + 4, S2L2A the same, LULC and cloud mask 144
    tokens = 12 + sum((h // p) * (w // p) for (h, w), p in
                      ((config["img_size"][m], config["patch_size"][m]) for m in COPGEN_BASE_ORDER))
    assert tokens == 12 + 3 + 3 + 16 + 144 + (144 + 36 + 4) * 2 + 144 + 144


# ----------------------------------------------------------------------------- normalisation
def test_normalisation__official_formulas():
    s2 = to_model("S2L2A_B01_B09", np.array([[[0, 10000]], [[5000, 2500]]], dtype=np.uint16))
    assert np.allclose(s2, [[[-1.0, 1.0]], [[0.0, -0.5]]])
    s1 = get_band_group("S1RTC_vh_vv")
    x = to_model(s1, np.array([[[1.0, 0.0]], [[0.01, -5.0]]], dtype=np.float32))  # 0 dB, nodata, -20 dB, negative
    floor_db = 10 * math.log10(s1.min_positive)
    expect = [[(0 - s1.min_db) / (s1.max_db - s1.min_db), (floor_db - s1.min_db) / (s1.max_db - s1.min_db)],
              [(-20 - s1.min_db) / (s1.max_db - s1.min_db), (floor_db - s1.min_db) / (s1.max_db - s1.min_db)]]
    assert np.allclose(x[:, 0], np.array(expect) * 2 - 1, atol=1e-6)
    dem = get_band_group("DEM_DEM")
    x = to_model(dem, np.array([[[8848.0, -10.0]]]))
    assert np.allclose(x[0, 0], [(math.log1p(8848) - dem.min_db) / (dem.max_db - dem.min_db) * 2 - 1,
                                 (math.log1p(dem.min_positive) - dem.min_db) / (dem.max_db - dem.min_db) * 2 - 1], atol=1e-5)
    mask = to_model("S2L1C_cloud_mask", np.array([[[0, 3], [2, 9]]], dtype=np.uint8))
    assert mask.shape == (4, 2, 2) and mask[3, 0, 1] == 1 and mask[0, 1, 1] == 1  # 9 is no class: read as class 0
    assert set(np.unique(mask)) == {-1.0, 1.0}
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        to_model(s1, np.zeros((1, 4, 4)))


def test_normalisation__round_trips_in_physical_units():
    rng = np.random.default_rng(0)
    dn = rng.integers(1, 10000, size=(4, 8, 8)).astype(np.uint16)
    assert np.allclose(from_model("S2L2A_B02_B03_B04_B08", to_model("S2L2A_B02_B03_B04_B08", dn)), dn, atol=0.01)
    power = 10 ** (rng.uniform(-30, 5, size=(2, 8, 8)) / 10)
    back = from_model("S1RTC_vh_vv", to_model("S1RTC_vh_vv", power))
    assert np.allclose(10 * np.log10(back), 10 * np.log10(power), atol=1e-3)  # dB
    metres = rng.uniform(0.5, 4000, size=(1, 8, 8))
    assert np.allclose(from_model("DEM_DEM", to_model("DEM_DEM", metres)), metres, rtol=1e-4)
    classes = rng.choice([0, 1, 2, 4, 5, 7, 8, 9, 10, 11], size=(1, 8, 8))
    back = from_model("LULC_LULC", to_model("LULC_LULC", classes))
    assert back.dtype == np.uint8 and np.array_equal(back, classes)
    # beyond the official range the inverse saturates (it clips to [0, 1] first)
    assert from_model("DEM_DEM", np.full((1, 1, 1), 1.5))[0, 0, 0] == pytest.approx(math.expm1(9.088), rel=1e-4)


def test_scalars__location_and_date_tokens():
    xyz = encode_lat_lon(45.0, 7.5)
    assert xyz.shape == (1, 1, 3) and np.linalg.norm(xyz) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(decode_lat_lon(xyz)[0, 0], [45.0, 7.5], atol=1e-4)
    assert np.allclose(decode_lat_lon(np.array([0.0, -2.0, 0.0])), [0.0, -90.0])  # any length: direction only
    for when in (date(2020, 1, 1), date(2020, 2, 29), date(2021, 7, 14), date(2023, 12, 31)):
        enc = encode_date(when)
        assert enc.shape == (1, 1, 3) and decode_date(enc) == when
    assert np.allclose(encode_date("2000-01-01T10:00:00Z")[0, 0, 2], 2 * 50 / 100 - 1)
    assert np.array_equal(to_model("mean_timestamps", date(2021, 7, 14)), encode_date(date(2021, 7, 14)))
    assert from_model("mean_timestamps", encode_date(date(2021, 7, 14))) == date(2021, 7, 14)
    with pytest.raises(ValueError, match="out of range"):
        encode_lat_lon(95.0, 0.0)


# ----------------------------------------------------------------------------- band-group VAE
def ldm_vae_state_dict(dd: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the official LDM autoencoder's names and shapes (libs/autoencoder.py)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (1.0 / math.sqrt(cin * k * k))
        sd[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.05

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(prefix, c):
        res(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{part}", c, c, 1)
        res(f"{prefix}.mid.block_2", c, c)

    ch, mult, nrb, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    conv("encoder.conv_in", dd["in_channels"], ch, 3)
    block_in = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * z, 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    block_in = ch * mult[-1]
    conv("decoder.conv_in", z, block_in, 3)
    mid("decoder", block_in)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, dd["out_ch"], 3)
    return sd


def ldm_reference(sd: dict, dd: dict):
    """The official FrozenAutoencoderKL's encode_moments and decode (before scaling), written out."""
    def gn(x, p):
        return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)

    def conv(x, p, stride=1, pad=1):
        return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], stride=stride, padding=pad)

    def res(x, p):
        h = conv(F.silu(gn(x, f"{p}.norm1")), f"{p}.conv1")
        h = conv(F.silu(gn(h, f"{p}.norm2")), f"{p}.conv2")
        return (conv(x, f"{p}.nin_shortcut", pad=0) if f"{p}.nin_shortcut.weight" in sd else x) + h

    def attn(x, p):
        h = gn(x, f"{p}.norm")
        q, k, v = (conv(h, f"{p}.{n}", pad=0).flatten(2) for n in "qkv")  # (B, C, N)
        w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), dim=-1)  # (B, Nq, Nk)
        return x + conv((v @ w.transpose(1, 2)).reshape(x.shape), f"{p}.proj_out", pad=0)

    def middle(h, prefix):
        return res(attn(res(h, f"{prefix}.mid.block_1"), f"{prefix}.mid.attn_1"), f"{prefix}.mid.block_2")

    levels, nrb = len(dd["ch_mult"]), dd["num_res_blocks"]

    def encode_moments(x):
        h = conv(x, "encoder.conv_in")
        for i in range(levels):
            for j in range(nrb):
                h = res(h, f"encoder.down.{i}.block.{j}")
            if i != levels - 1:  # asymmetric padding, stride 2
                h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2, pad=0)
        h = conv(F.silu(gn(middle(h, "encoder"), "encoder.norm_out")), "encoder.conv_out")
        return conv(h, "quant_conv", pad=0)

    def decode(z):
        h = conv(conv(z, "post_quant_conv", pad=0), "decoder.conv_in")
        h = middle(h, "decoder")
        for i in reversed(range(levels)):
            for j in range(nrb + 1):
                h = res(h, f"decoder.up.{i}.block.{j}")
            if i != 0:
                h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv")
        return conv(F.silu(gn(h, "decoder.norm_out")), "decoder.conv_out")

    return encode_moments, decode


def test_cop_gen_vae__converted_equals_official(tmp_path):
    group = get_band_group("S1RTC_vh_vv")
    dd = {**group.vae_ddconfig(), "ch": 32, "resolution": 32}  # the official layout, narrower for speed
    assert dd["ch_mult"] == [1, 2, 4, 4] and dd["z_channels"] == 8 and dd["in_channels"] == 2
    sd = ldm_vae_state_dict(dd)
    torch.save(sd, tmp_path / "model-50-ema.pth")
    codec = from_cop_gen_vae(tmp_path / "model-50-ema.pth", dd, group.vae_scale_factor)
    encode_moments, decode = ldm_reference(sd, dd)
    x = torch.from_numpy(to_model(group, 10 ** (np.random.default_rng(1).uniform(-25, 0, (2, 2, 32, 32)) / 10)))
    with torch.no_grad():
        ref_moments = encode_moments(x)
        moments = codec.encode_moments(x)
        assert moments.shape == (2, 16, 4, 4)
        assert torch.allclose(moments, ref_moments, atol=1e-4), (moments - ref_moments).abs().max()
        # the network's latents: the official ``scale_factor * z`` (the posterior mean here)
        net_latents = codec.to_network(moments, group.name, sample=False)
        assert torch.allclose(net_latents, group.vae_scale_factor * ref_moments[:, :8], atol=1e-5)
        ref_images = decode(net_latents / group.vae_scale_factor)
        assert torch.allclose(codec.decode_network(net_latents, group.name), ref_images.clamp(-1, 1), atol=1e-4)
    # saved and loaded as a codec folder: same identity, same scale
    codec.save(tmp_path / "codec")
    again = load_codec(source=tmp_path / "codec")
    assert again.name == "cop-gen-vae" and again.info()["config_hash"] == codec.info()["config_hash"]
    assert again.norm(group.name).scale == pytest.approx(group.vae_scale_factor)
    assert latent_norms(codec.info(), [group.name])[group.name].scale == pytest.approx(group.vae_scale_factor)


def test_cop_gen_vae__errors_name_the_problem(tmp_path):
    dd = {**get_band_group("DEM_DEM").vae_ddconfig(), "ch": 32, "resolution": 16}
    with pytest.raises(ValueError, match="no such file"):
        from_cop_gen_vae(tmp_path / "missing.pth", dd, 0.4)
    sd = ldm_vae_state_dict(dd)
    torch.save(sd, tmp_path / "dem.pth")
    with pytest.raises(ValueError, match="missing|size mismatch|shape"):
        from_cop_gen_vae(tmp_path / "dem.pth", {**dd, "in_channels": 3, "out_ch": 3}, 0.4)
    with pytest.raises(ValueError, match="attn_resolutions"):
        from_cop_gen_vae(tmp_path / "dem.pth", {**dd, "attn_resolutions": [4]}, 0.4)


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["copgen-base", "native-tiny"])
def test_native_configs__shapes_match_the_registry(name):
    from model.config import load_config
    from model.uvit import MultiModalUViT

    nnet = load_config(name).nnet
    for m in nnet["modalities"]:
        group = get_band_group(m)
        assert [nnet["in_chans"][m], *nnet["img_size"][m]] == list(group.latent), m
        assert nnet["patch_size"][m] == 1 or not group.is_scalar, m
    if name == "copgen-base":
        assert tuple(nnet["modalities"]) == COPGEN_BASE_ORDER
        assert {m: nnet["patch_size"][m] for m in nnet["modalities"]} == cop_gen_network_config(network_modalities())["patch_size"]
    net = MultiModalUViT(**{**nnet, "embed_dim": 32, "depth": 2, "num_heads": 4})
    x = {m: torch.randn(2, *net.latent_shape(m)) for m in net.modalities}
    out = net(x, {m: torch.full((2,), 500.0) for m in net.modalities})
    assert all(out[m].shape == x[m].shape for m in net.modalities)


def test_native_configs__bad_per_modality_values_are_named(tmp_path):
    from model.config import CONFIG_DIR, load_config
    from model.uvit import MultiModalUViT

    text = (CONFIG_DIR / "native-tiny.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("    DEM_DEM: 8\n", "    DEM_DEM: eight\n", 1))
    with pytest.raises(ValueError, match=r"bad.yaml: nnet.in_chans"):
        load_config(bad)
    nnet = load_config("native-tiny").nnet
    with pytest.raises(ValueError, match=r"in_chans: give one value per modality; missing \['DEM_DEM'\]"):
        MultiModalUViT(**{**nnet, "in_chans": {k: v for k, v in nnet["in_chans"].items() if k != "DEM_DEM"}})
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        MultiModalUViT(**{**nnet, "patch_size": {**nnet["patch_size"], "S2L2A_B01_B09": 3}})


# ----------------------------------------------------------------------------- convert-weights --family copgen
def test_convert_weights_copgen__network_and_band_group_vaes(tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from model.uvit import MultiModalUViT
    from pipelines.cli import app
    from pipelines.weights import convert_cop_gen
    from test_model import official_state_dict_per_modality, reference_forward

    names = ["3d_cartesian_lat_lon", "DEM_DEM", "S2L2A_B01_B09"]
    nnet = {"modalities": names, "img_size": {"3d_cartesian_lat_lon": [1, 3], "DEM_DEM": [8, 8], "S2L2A_B01_B09": [4, 4]},
            "in_chans": {"3d_cartesian_lat_lon": 1, "DEM_DEM": 8, "S2L2A_B01_B09": 8},
            "patch_size": {"3d_cartesian_lat_lon": 1, "DEM_DEM": 2, "S2L2A_B01_B09": 2},
            "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0, "qkv_bias": False, "mlp_time_embed": False}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump({"nnet": nnet}))
    sd = official_state_dict_per_modality([(1, 1, 3), (8, 2, 16), (8, 2, 4)], embed_dim=32, depth=2, qkv_bias=False)
    torch.save(sd, tmp_path / "500000_nnet_ema.pth")
    r = CliRunner().invoke(app, ["convert-weights", "--family", "copgen", "--checkpoint", str(tmp_path / "500000_nnet_ema.pth"),
                                 "--config", str(tmp_path / "toy.yaml"), "--out", str(tmp_path / "net")])
    assert r.exit_code == 0, r.output
    net = MultiModalUViT.from_pretrained(tmp_path / "net")
    assert net.modalities == names and net.latent_shape("DEM_DEM") == (8, 8, 8)
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randn(1, *net.latent_shape(m), generator=g) for m in names]
    ts = [torch.tensor([0.0]), torch.tensor([500.0]), torch.tensor([1000.0])]
    with torch.no_grad():
        out = net(dict(zip(names, imgs)), dict(zip(names, ts)))
    ref = reference_forward(sd, imgs, ts, 32, 2, 4, [1, 2, 2], [1, 8, 8], scalar=(0,))
    assert all(torch.allclose(out[m], ref[i], atol=1e-5) for i, m in enumerate(names))
    record = json.loads((tmp_path / "net" / "training_data.json").read_text())
    assert record["family"] == "native" and record["codec"]["hub"]["DEM_DEM"].endswith("DEM_64x64_DEM_latent_8/model-50-ema.pth")

    # --vaes: a local copy of the VAE repo (narrow VAEs here), one codec folder per image group
    vaes = tmp_path / "copgen-vaes"
    for name in ("DEM_DEM", "S2L2A_B01_B09"):
        group = get_band_group(name)
        (vaes / group.vae_file).parent.mkdir(parents=True)
        torch.save(ldm_vae_state_dict({**group.vae_ddconfig(), "ch": 32}, seed=1), vaes / group.vae_file)
    convert_cop_gen(str(tmp_path / "500000_nnet_ema.pth"), tmp_path / "net2", str(tmp_path / "toy.yaml"),
                    vaes=str(vaes), vae_channels=32)
    dem = load_codec(source=tmp_path / "net2" / "codecs" / "DEM_DEM")
    assert dem.name == "cop-gen-vae" and dem.norm("DEM_DEM").scale == pytest.approx(0.404247)
    x = torch.from_numpy(to_model("DEM_DEM", np.random.default_rng(0).uniform(10, 900, (1, 1, 64, 64))))
    assert dem.encode_moments(x).shape == (1, 16, 8, 8)
    record = json.loads((tmp_path / "net2" / "training_data.json").read_text())
    assert set(record["codec"]["per_modality"]) == {"DEM_DEM", "S2L2A_B01_B09"}

    bad = CliRunner().invoke(app, ["convert-weights", "--family", "copgen", "--checkpoint", str(tmp_path / "500000_nnet_ema.pth"),
                                   "--config", "copgen-base", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "3 modalities but 12" in bad.output, bad.output


# ----------------------------------------------------------------------------- patch layout
def test_patch_layout__official_rule_and_same_ground_in_every_group(world):
    from majortom_gen.native import cut_patches, patch_offsets
    from majortom_gen.sources import dataset_root, decode_band, read_metadata, read_product_of

    assert patch_offsets(1068, 192) == [0, 192, 384, 576, 768, 876]  # the last patch overlaps by 84 px
    assert patch_offsets(356, 64) == [0, 64, 128, 192, 256, 292] and patch_offsets(178, 32)[-1] == 146
    meta = read_metadata(dataset_root("S2L2A", world), "S2L2A")
    row = meta.iloc[0]
    ten, twenty = get_band_group("S2L2A_B02_B03_B04_B08"), get_band_group("S2L2A_B05_B06_B07_B11_B12_B8A")
    product = read_product_of(row, list(ten.bands + twenty.bands))
    stacks, transforms = {}, {}
    for g in (ten, twenty):
        rasters = [decode_band(product, b) for b in g.bands]
        stacks[g.name] = np.stack([r.array for r in rasters])
        transforms[g.name] = rasters[0].transform
        assert rasters[0].crs == row["crs"]
    cut = {g.name: cut_patches(stacks[g.name], g, transforms[g.name], row["crs"]) for g in (ten, twenty)}
    assert [len(v) for v in cut.values()] == [36, 36]
    for (p10, a10), (p20, a20) in zip(cut[ten.name], cut[twenty.name]):
        assert p10.index == p20.index and a10.shape == (4, 192, 192) and a20.shape == (6, 96, 96)
        # the same ground: same upper-left corner, 1920 m wide, in the product's UTM zone
        assert p10.transform.c == p20.transform.c and p10.transform.f == p20.transform.f
        assert p10.transform.a * p10.size_px == p20.transform.a * p20.size_px == 1920.0
        assert np.array_equal(a10, stacks[ten.name][:, p10.row_off:p10.row_off + 192, p10.col_off:p10.col_off + 192])
    last = cut[ten.name][-1][0]
    assert (last.patch_row, last.patch_col, last.row_off) == (5, 5, 876)
    assert last.transform.f + 876 * 10 == transforms[ten.name].f  # its north edge lies 8760 m south of the product's
    # an S1 raster of 1069 px is cropped to the 1068 grid; a raster too small is refused by name
    s1 = get_band_group("S1RTC_vh_vv")
    patches = cut_patches(np.ones((2, 1069, 1069), np.float32), s1, transforms[ten.name], row["crs"])
    assert patches[-1][1].shape == (2, 192, 192)
    with pytest.raises(ValueError, match=r"S1RTC_vh_vv: expected \(2, 1068, 1068\)"):
        cut_patches(np.ones((2, 1000, 1000), np.float32), s1, transforms[ten.name], row["crs"])


# ----------------------------------------------------------------------------- sampling with per-modality shapes
def test_generate__any_subset_from_any_other_with_per_modality_shapes():
    from model.sample import generate
    from model.uvit import MultiModalUViT

    names = ["3d_cartesian_lat_lon", "mean_timestamps", "DEM_DEM", "S2L2A_B02_B03_B04_B08"]
    specs = network_modalities(names)
    specs["S2L2A_B02_B03_B04_B08"]["patch_size"] = 4
    torch.manual_seed(0)
    net = MultiModalUViT(**cop_gen_network_config(specs), embed_dim=32, depth=2, num_heads=4, prediction="v").eval()
    g = torch.Generator().manual_seed(1)
    s2 = torch.randn(2, 8, 24, 24, generator=g)
    where = torch.from_numpy(np.concatenate([encode_lat_lon(45.0, 7.5), encode_lat_lon(-33.9, 18.4)]))[:, None]  # (2, 1, 1, 3)
    when = torch.from_numpy(np.concatenate([encode_date("2021-01-15"), encode_date("2021-07-15")]))[:, None]
    cond = {"S2L2A_B02_B03_B04_B08": s2, "3d_cartesian_lat_lon": where}
    out = generate(net, cond, ["DEM_DEM", "mean_timestamps"], n_samples=2, steps=4, seed=3,
                   guidance={"S2L2A_B02_B03_B04_B08": 1.0})
    assert out["DEM_DEM"].shape == (4, 8, 8, 8) and out["mean_timestamps"].shape == (4, 1, 1, 3)
    assert torch.equal(out["S2L2A_B02_B03_B04_B08"], s2.repeat_interleave(2, 0))
    again = generate(net, cond, ["DEM_DEM", "mean_timestamps"], n_samples=2, steps=4, seed=3,
                     guidance={"S2L2A_B02_B03_B04_B08": 1.0})
    assert torch.equal(out["DEM_DEM"], again["DEM_DEM"])
    other = generate(net, {**cond, "3d_cartesian_lat_lon": where.flip(0)}, ["DEM_DEM", "mean_timestamps"], n_samples=2,
                     steps=4, seed=3, guidance={"S2L2A_B02_B03_B04_B08": 1.0})
    assert not torch.allclose(out["DEM_DEM"], other["DEM_DEM"])  # the location token reaches the DEM
    # a date as the condition ("this place in January"), S2 generated; part of the S2 known (gap filling)
    keep = torch.zeros(1, 1, 24, 24)
    keep[..., :12] = 1
    filled = generate(net, {"mean_timestamps": when, "3d_cartesian_lat_lon": where}, ["S2L2A_B02_B03_B04_B08"], steps=4,
                      seed=3, known={"S2L2A_B02_B03_B04_B08": (s2, keep)})
    assert torch.allclose(filled["S2L2A_B02_B03_B04_B08"][..., :12], s2[..., :12], atol=1e-5)
    with pytest.raises(ValueError, match="wrong shape"):
        generate(net, {"DEM_DEM": torch.zeros(1, 8, 24, 24)}, ["mean_timestamps"], steps=2, seed=0)


# ----------------------------------------------------------------------------- export in physical units
def test_export__physical_units_band_names_and_grid(world, tmp_path):
    import rasterio

    from majortom_gen.native import cut_patches
    from majortom_gen.native_export import assemble_patches, write_physical
    from majortom_gen.sources import dataset_root, decode_band, read_metadata, read_product_of

    outs = {}
    for source, group in (("S2L2A", "S2L2A_B05_B06_B07_B11_B12_B8A"), ("S1RTC", "S1RTC_vh_vv"), ("DEM", "DEM_DEM")):
        g = get_band_group(group)
        row = read_metadata(dataset_root(source, world), source).iloc[0]
        rasters = [decode_band(read_product_of(row, list(g.bands)), b) for b in g.bands]
        stack = np.stack([r.array for r in rasters]).astype(np.float32)
        # the generation path: patches -> model space -> back to units -> one product raster
        patches = [(p, from_model(g, to_model(g, a))) for p, a in cut_patches(stack, g, rasters[0].transform, row["crs"])]
        values, transform = assemble_patches(g, patches)
        assert transform == rasters[0].transform and values.shape == stack.shape
        valid = stack > 0  # the official encodings floor values <= 0 (nodata included)
        assert np.allclose(values[valid], stack[valid], rtol=1e-3, atol=0.6), group  # the last row/col overlap averages back
        outs[group] = write_physical(tmp_path / f"{group}.tif", g, values, transform, row["crs"])
        with rasterio.open(outs[group]) as ds:
            assert ds.crs.to_string() == row["crs"] and ds.transform == rasters[0].transform
            assert ds.descriptions == tuple(b.upper() if source == "S1RTC" else b for b in g.bands)
            if source == "S2L2A":
                assert ds.dtypes[0] == "uint16" and ds.nodata == 0 and ds.scales == (1e-4,) * 6 and ds.units[0] == "reflectance"
                assert np.abs(ds.read().astype(np.float32) - stack).max() <= 1.0  # Core DN, rounded
            elif source == "S1RTC":
                assert ds.dtypes[0] == "float32" and ds.units == ("linear power (gamma0)",) * 2
            else:
                assert ds.dtypes[0] == "float32" and ds.units == ("m",) and ds.tags()["MODALITY"] == "DEM_DEM"
    db = write_physical(tmp_path / "s1_db.tif", "S1RTC_vh_vv", np.full((2, 4, 4), 0.01, np.float32),
                        rasterio.Affine(10, 0, 0, 0, -10, 0), "EPSG:32632", db=True)
    with rasterio.open(db) as ds:
        assert np.allclose(ds.read(), -20.0) and ds.units == ("dB", "dB")


def test_export__class_rasters_are_paletted_and_partial_products_are_nan(tmp_path):
    import rasterio
    from affine import Affine as A

    from majortom_gen.native import patch_layout
    from majortom_gen.native_export import assemble_patches, write_physical

    g = get_band_group("S2L1C_cloud_mask")
    layout = patch_layout(g, A(10, 0, 500000, 0, -10, 5000000), "EPSG:32632")
    patches = [(p, np.full((1, 192, 192), p.index % 4, np.uint8)) for p in layout]
    classes, transform = assemble_patches(g, patches)
    assert classes.dtype == np.uint8 and classes[0, -1, -1] == 35 % 4  # the later patch wins in the overlap
    path = write_physical(tmp_path / "mask.tif", g, classes, transform, "EPSG:32632")
    with rasterio.open(path) as ds:
        assert ds.colormap(1)[1] == (255, 255, 255, 255) and ds.tags()["CLASSES"] == "0,1,2,3"
    dem = get_band_group("DEM_DEM")
    some = [(p, np.ones((1, 64, 64), np.float32)) for p in patch_layout(dem, A(30, 0, 0, 0, -30, 0), "EPSG:32632")[:3]]
    values, _ = assemble_patches(dem, some)
    assert values[0, 0, 0] == 1.0 and np.isnan(values[0, -1, -1])
    with pytest.raises(ValueError, match="does not belong"):
        assemble_patches(dem, [(layout[0], np.zeros((1, 192, 192), np.uint8))])


# ----------------------------------------------------------------------------- native ingest
NATIVE_TEST_GROUPS = ("DEM_DEM", "S1RTC_vh_vv", "S2L2A_B01_B09")


def test_ingest_native__store_rows_georeferencing_and_units(world, tmp_path):
    import pyarrow.parquet as pq
    from affine import Affine as A

    from majortom_gen.georef import product_box
    from majortom_gen.store import LatentStore, load_aligned
    from pipelines.ingest import IngestOptions
    from pipelines.ingest_native import ingest_native, load_codec_set, product_patches
    from majortom_gen.sources import dataset_root, read_metadata, read_product_of
    from conftest import WORLD_CELLS

    options = IngestOptions(codec="patch-pca", scheduler="synchronous", cells_per_shard=2)
    report = ingest_native(world, list(WORLD_CELLS), tmp_path / "store", options, groups=NATIVE_TEST_GROUPS)
    # the world's quirks: an EPSG:EPSG: crs string and an S1 raster of 1069 px are read; nothing is lost
    assert not report.quarantined and report.cells_written == 3 and report.fragments_written == 3 * 36
    store = LatentStore.open(tmp_path / "store")
    assert store.manifest["fragment_mode"] == "copgen" and store.codec["name"] == "codec-set"
    assert store.moment_shape("S1RTC_vh_vv") == (16, 24, 24) and store.moment_shape("S2L2A_B01_B09") == (16, 4, 4)
    table = store.table()
    assert sorted(set(table.column("fragment_index").to_pylist())) == list(range(36))
    row = table.filter(table.column("fragment_index").to_numpy() == 35).to_pylist()[0]
    base = product_box(row["grid_cell"]).transform(10.0)
    assert A(*row["utm_transform"]) == base @ A.translation(876, 876) and row["height"] == 192
    assert row["S1RTC_vh_vv_product_id"] and row["S1RTC_vh_vv_timestamp"] is not None  # from the Core product
    # run again: nothing new, the same rows
    again = ingest_native(world, list(WORLD_CELLS), tmp_path / "store", options, groups=NATIVE_TEST_GROUPS)
    assert again.cells_written == 0 and again.cells_already_stored == 3
    assert sum(pq.read_metadata(p).num_rows for p in LatentStore.open(tmp_path / "store").shard_paths()) == 3 * 36
    # the stored latents decode back to metres and dB close to the real rasters
    aligned = load_aligned(store, ["DEM_DEM", "S1RTC_vh_vv"])
    codecs = load_codec_set(tmp_path / "store" / "codec", ["DEM_DEM", "S1RTC_vh_vv"])
    cell = aligned.grid_cell[0]
    for source, name in (("DEM", "DEM_DEM"), ("S1RTC", "S1RTC_vh_vv")):
        g = get_band_group(name)
        md = read_metadata(dataset_root(source, world), source)
        real = product_patches(source, [name], cell, read_product_of(md[md.grid_cell == cell].iloc[0]), "test")[name]
        mom = torch.from_numpy(np.asarray(aligned.moments[name][aligned.grid_cell == cell], np.float32))
        decoded = codecs[name].decode(mom[:, :8]).numpy()
        if name == "DEM_DEM":
            err = np.abs(from_model(g, decoded) - from_model(g, real)).mean()
            assert err < 5.0, err  # metres (patch-pca, 8 of 64 components per block)
        else:
            err = np.abs(10 * np.log10(from_model(g, decoded)) - 10 * np.log10(from_model(g, real))).mean()
            assert err < 3.0, err  # dB


def test_ingest_native__bad_input_and_wrong_requests_are_named(world, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from majortom_gen.errors import MajorTomGenError
    from majortom_gen.synth import SynthOptions, write_world
    from pipelines.ingest import IngestOptions, ingest
    from pipelines.ingest_native import ingest_native

    cells = ["501U_59R", "501U_60R"]
    w = tmp_path / "world"
    write_world(cells, w, SynthOptions(seed=4, products_per_shard=1, workers=1))
    # the DEM band of the first cell replaced by garbage: that cell is quarantined, the other stored
    md = pq.read_table(w / "Core-DEM" / "metadata.parquet").to_pandas()
    shard = w / "Core-DEM" / md[md.grid_cell == cells[0]].iloc[0]["parquet_url"]
    t = pq.read_table(shard)
    t = t.set_column(t.schema.get_field_index("DEM"), "DEM", pa.array([b"\x00garbage" * 20], t.schema.field("DEM").type))
    pq.write_table(t, shard)
    options = IngestOptions(codec="patch-pca", scheduler="synchronous")
    report = ingest_native(w, cells, tmp_path / "store", options, groups=("DEM_DEM",), )
    assert set(report.quarantined) == {cells[0]} and "not a GeoTIFF" in report.quarantined[cells[0]]
    assert report.cells_written == 1
    # an all-sea DEM (0 m everywhere) is stored; an all-zero S2 product is nodata
    from majortom_gen.formats import decode_geotiff, encode_geotiff
    from pipelines.ingest_native import product_patches

    raster = decode_geotiff(pq.read_table(w / "Core-DEM" / md[md.grid_cell == cells[1]].iloc[0]["parquet_url"])
                            .column("DEM")[0].as_py())
    sea = encode_geotiff(np.zeros_like(raster.array), crs=raster.crs, transform=raster.transform, nodata=raster.nodata)
    assert product_patches("DEM", ["DEM_DEM"], cells[1], {"DEM": sea}, "sea")["DEM_DEM"].min() == -1.0
    zero = encode_geotiff(np.zeros((178, 178), np.uint16), crs=raster.crs, transform=raster.transform @ raster.transform.scale(2),
                          nodata=0)
    with pytest.raises(MajorTomGenError, match="entirely nodata"):
        product_patches("S2L2A", ["S2L2A_B01_B09"], cells[1], {"B01": zero, "B09": zero}, "zero")
    with pytest.raises(MajorTomGenError, match="thumbnail codec"):
        ingest_native(w, cells, tmp_path / "s2", IngestOptions(codec="sd-vae"), groups=("DEM_DEM",))
    with pytest.raises(MajorTomGenError, match="small-vae needs --codec-source"):
        ingest_native(w, cells, tmp_path / "s2", IngestOptions(codec="small-vae"), groups=("DEM_DEM",))
    with pytest.raises(MajorTomGenError, match="scalar modalities"):
        ingest_native(w, cells, tmp_path / "s3", options, groups=("DEM_DEM", "mean_timestamps"))
    with pytest.raises(MajorTomGenError, match="needs --codec-source"):
        ingest_native(w, cells, tmp_path / "s4", IngestOptions(codec="cop-gen-vae"), groups=("DEM_DEM",))
    from typer.testing import CliRunner

    from pipelines.cli import app

    r = CliRunner().invoke(app, ["ingest", "--source", str(w), "--store", str(tmp_path / "cli"), "--cells", cells[1],
                                 "--family", "native", "--groups", "DEM_DEM,S2L2A_B01_B09", "--scheduler", "synchronous"])
    assert r.exit_code == 0 and "stored 1 cells, 36 fragments" in r.output, r.output
    r = CliRunner().invoke(app, ["ingest", "--source", str(w), "--store", str(tmp_path / "cli2"), "--cells", cells[1],
                                 "--family", "native", "--groups", "DEM_DEM,S2L2A_B02", "--scheduler", "synchronous"])
    assert r.exit_code == 2 and "unknown native modality 'S2L2A_B02'" in r.output, r.output
    ingest(w, [cells[1]], tmp_path / "thumbs", IngestOptions(codec="patch-pca", scheduler="synchronous"))
    with pytest.raises(MajorTomGenError, match="thumbnail store"):
        ingest_native(w, cells, tmp_path / "thumbs", options, groups=("DEM_DEM",))


def test_ingest_native__with_cop_gen_vaes(world, tmp_path):
    """The published path on small stand-ins: convert-weights --vaes writes OUT/codecs, ingest reads them."""
    from majortom_gen.store import LatentStore
    from pipelines.ingest import IngestOptions
    from pipelines.ingest_native import ingest_native

    folder = tmp_path / "codecs"
    for name in ("DEM_DEM", "S2L2A_B01_B09"):
        g = get_band_group(name)
        dd = {**g.vae_ddconfig(), "ch": 32}
        torch.save(ldm_vae_state_dict(dd, seed=2), tmp_path / f"{name}.pth")
        from_cop_gen_vae(tmp_path / f"{name}.pth", dd, g.vae_scale_factor).save(folder / name)
    options = IngestOptions(codec="cop-gen-vae", codec_source=str(folder), scheduler="synchronous")
    report = ingest_native(world, ["501U_59R"], tmp_path / "store", options, groups=("DEM_DEM", "S2L2A_B01_B09"))
    assert report.cells_written == 1
    store = LatentStore.open(tmp_path / "store")
    assert store.codec["source"] == str(folder.resolve()) and not (tmp_path / "store" / "codec").exists()
    assert set(store.codec["config"]["members"]) == {"DEM_DEM", "S2L2A_B01_B09"}
    assert store.codec["config"]["members"]["DEM_DEM"]["name"] == "cop-gen-vae"


# ----------------------------------------------------------------------------- train and sample on a native store
def test_train_and_sample_native__geotiffs_in_metres_independent_of_other_cells(world, tmp_path):
    import rasterio
    import yaml

    from majortom_gen.errors import MajorTomGenError
    from majortom_gen.georef import product_box
    from pipelines.ingest import IngestOptions
    from pipelines.ingest_native import ingest_native
    from pipelines.native_sample import NativeSampling, sample_native
    from pipelines.train import TrainOptions, train_on_store
    from conftest import WORLD_CELLS

    groups = ("DEM_DEM", "S2L2A_B01_B09")
    ingest_native(world, list(WORLD_CELLS), tmp_path / "store", IngestOptions(codec="patch-pca", scheduler="synchronous"),
                  groups=groups)
    names = ["3d_cartesian_lat_lon", "mean_timestamps", *groups]
    spec = network_modalities(names)
    nnet = {**cop_gen_network_config(spec), "embed_dim": 32, "depth": 2, "num_heads": 4, "prediction": "v"}
    nnet["modalities"] = list(nnet["modalities"])
    config = {"nnet": nnet, "optimizer": {"lr": 1.0e-3, "warmup_steps": 1},
              "train": {"batch_size": 8, "max_steps": 2, "checkpoint_every": 2, "log_every": 1, "hflip": False}}
    (tmp_path / "native.yaml").write_text(yaml.safe_dump(config))
    result = train_on_store(tmp_path / "native.yaml", tmp_path / "store", tmp_path / "run",
                            TrainOptions(test_fraction=0.0, device="cpu"))
    assert result.steps == 2 and np.isfinite(result.last_loss)
    options = NativeSampling(steps=2, seed=1, n_samples=2, guidance=1.0)
    cond = ["S2L2A_B01_B09", "3d_cartesian_lat_lon", "mean_timestamps"]
    both = sample_native(tmp_path / "run" / "model", tmp_path / "store", list(WORLD_CELLS[:2]), cond, ["DEM_DEM"],
                         tmp_path / "out", options)
    alone = sample_native(tmp_path / "run" / "model", tmp_path / "store", [WORLD_CELLS[1]], cond, ["DEM_DEM"], None, options)
    a, b = alone.rasters[(WORLD_CELLS[1], "DEM_DEM", 1)][0], both.rasters[(WORLD_CELLS[1], "DEM_DEM", 1)][0]
    assert np.allclose(a, b, atol=1e-4)  # a cell's result does not depend on the other cells asked for
    assert not np.allclose(both.rasters[(WORLD_CELLS[1], "DEM_DEM", 0)][0], b)  # two different samples
    path = tmp_path / "out" / WORLD_CELLS[0] / "DEM_DEM_s0.tif"
    assert path in both.files
    from PIL import Image

    from pipelines.quicklook import LABEL_PX, PANEL_PX

    with Image.open(tmp_path / "out" / WORLD_CELLS[0] / "quicklook.png") as png:  # conditions; stored DEM, 2 samples, mean
        assert png.size == (4 * PANEL_PX, LABEL_PX + 2 * (PANEL_PX + LABEL_PX))
    with rasterio.open(path) as ds:
        box = product_box(WORLD_CELLS[0])
        assert ds.crs.to_string() == box.crs and ds.units == ("m",) and ds.width == 356
        assert ds.transform.almost_equals(box.transform(30.0)) and np.isfinite(ds.read()).all()
    with pytest.raises(MajorTomGenError, match="does not model"):
        sample_native(tmp_path / "run" / "model", tmp_path / "store", [WORLD_CELLS[0]], cond, ["S1RTC_vh_vv"])
    # the same through `majortom-gen sample`, which sees a native store
    from typer.testing import CliRunner

    from pipelines.cli import app

    r = CliRunner().invoke(app, ["sample", "--model", str(tmp_path / "run" / "model"), "--store", str(tmp_path / "store"),
                                 "--out", str(tmp_path / "cli"), "--cells", WORLD_CELLS[1], "--condition", ",".join(cond),
                                 "--generate", "DEM_DEM", "--steps", "2", "--seed", "1", "--n-samples", "2",
                                 "--guidance", "1"])
    assert r.exit_code == 0 and "GeoTIFFs in physical units" in " ".join(r.output.split()), r.output
    with rasterio.open(tmp_path / "cli" / WORLD_CELLS[1] / "DEM_DEM_s1.tif") as ds:
        assert np.allclose(ds.read(), b, atol=1e-4)
    samples = np.stack([both.rasters[(WORLD_CELLS[1], "DEM_DEM", s)][0] for s in range(2)])
    with rasterio.open(tmp_path / "cli" / WORLD_CELLS[1] / "DEM_DEM_mean.tif") as ds:
        assert np.allclose(ds.read(), samples.mean(axis=0), atol=1e-3) and ds.units == ("m",)
    with rasterio.open(tmp_path / "cli" / WORLD_CELLS[1] / "DEM_DEM_std.tif") as ds:
        assert np.allclose(ds.read(), samples.std(axis=0), atol=1e-3) and ds.tags()["STATISTIC"] == "std of 2 samples"


def test_native_evaluate__errors_in_metres_db_and_reflectance(world):
    from pipelines.native_evaluate import physical_error, real_product

    dem = real_product(world, "501U_60R", "DEM_DEM")
    assert dem.shape == (1, 356, 356) and physical_error("DEM_DEM", dem + 2.5, dem) == pytest.approx(2.5)
    s1 = real_product(world, "501U_60R", "S1RTC_vh_vv")  # the 1069 px quirk is cropped to the grid
    assert s1.shape == (2, 1068, 1068)
    assert physical_error("S1RTC_vh_vv", s1 * 10 ** 0.3, s1) == pytest.approx(3.0, abs=1e-4)  # dB
    s2 = np.full((2, 178, 178), 1000.0)
    assert physical_error("S2L2A_B01_B09", s2 + 100, s2) == pytest.approx(0.01)  # reflectance


def test_generate_native_region__cell_files_vrts_and_mosaics_in_units(world, tmp_path):
    import json

    import rasterio
    import yaml
    from shapely.geometry import box as shapely_box
    from typer.testing import CliRunner

    from majortom_gen.georef import product_box
    from pipelines.cli import app
    from pipelines.ingest import IngestOptions
    from pipelines.ingest_native import ingest_native
    from pipelines.train import TrainOptions, train_on_store
    from conftest import WORLD_CELLS

    groups = ("DEM_DEM", "S2L2A_B01_B09")
    ingest_native(world, list(WORLD_CELLS[:2]), tmp_path / "store", IngestOptions(codec="patch-pca", scheduler="synchronous"),
                  groups=groups)
    nnet = {**cop_gen_network_config(network_modalities(["3d_cartesian_lat_lon", *groups])), "embed_dim": 32, "depth": 2,
            "num_heads": 4}
    nnet["modalities"] = list(nnet["modalities"])
    (tmp_path / "n.yaml").write_text(yaml.safe_dump({"nnet": nnet, "train": {"batch_size": 4, "max_steps": 1}}))
    train_on_store(tmp_path / "n.yaml", tmp_path / "store", tmp_path / "run", TrainOptions(test_fraction=0.0, device="cpu"))
    # a polygon over the two neighbouring cells (WGS84), a little inside their outer edges
    boxes = [product_box(c) for c in WORLD_CELLS[:2]]
    from pyproj import Transformer

    to_wgs = Transformer.from_crs(boxes[0].crs, "EPSG:4326", always_xy=True)
    xs = [b.transform(10.0).c for b in boxes] + [b.transform(10.0).c + 10680 for b in boxes]
    ys = [b.transform(10.0).f for b in boxes] + [b.transform(10.0).f - 10680 for b in boxes]
    (w, s), (e, n) = to_wgs.transform(min(xs) + 500, min(ys) + 500), to_wgs.transform(max(xs) - 500, max(ys) - 500)
    r = CliRunner().invoke(app, ["generate", "--store", str(tmp_path / "store"), "--model", str(tmp_path / "run" / "model"),
                                 "--out", str(tmp_path / "out"), "--generate", "DEM_DEM", "--cells", ",".join(WORLD_CELLS[:2]),
                                 "--steps", "2", "--guidance", "0"])
    assert r.exit_code == 0 and "mosaics in physical units" in " ".join(r.output.split()), r.output
    record = json.loads((tmp_path / "out" / "region.json").read_text())
    assert record["condition"] == ["S2L2A_B01_B09", "3d_cartesian_lat_lon"]  # auto: what the cells have, and the tokens
    with rasterio.open(tmp_path / "out" / "mosaic" / "DEM_DEM_s0_EPSG4326.tif") as ds:
        assert ds.crs.to_string() == "EPSG:4326" and ds.units == ("m",)
        data = ds.read(1)
        assert np.isfinite(data).mean() > 0.9 and np.nanmin(data) >= 0
        west, south, east, north = ds.bounds
        assert west < (w + e) / 2 < east and south < (s + n) / 2 < north
    assert (tmp_path / "out" / "vrt" / f"DEM_DEM_s0_{boxes[0].crs.replace(':', '')}.vrt").is_file()
    # clipped to a region: nodata outside it
    from pipelines.native_region import generate_native_region
    from pipelines.native_sample import NativeSampling

    region = shapely_box(w, s, (w + e) / 2, n)
    generate_native_region(tmp_path / "run" / "model", tmp_path / "store", tmp_path / "clip", generate=["DEM_DEM"],
                           region=region, cells=list(WORLD_CELLS[:2]), options=NativeSampling(steps=2))
    with rasterio.open(tmp_path / "clip" / "mosaic" / "DEM_DEM_s0_EPSG4326.tif") as ds:
        assert ds.bounds.right <= (w + e) / 2 + 1e-3 and np.isfinite(ds.read(1)).any()


def test_evaluate_on_a_native_store__table_in_physical_units(world, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.ingest import IngestOptions
    from pipelines.ingest_native import ingest_native
    from majortom_gen.errors import MajorTomGenError
    from pipelines.native_evaluate import parse_native_conditions
    from pipelines.train import TrainOptions, train_on_store
    from conftest import WORLD_CELLS

    groups = ("DEM_DEM", "S2L2A_B01_B09")
    ingest_native(world, [WORLD_CELLS[0]], tmp_path / "store", IngestOptions(codec="patch-pca", scheduler="synchronous"),
                  groups=groups)
    names = ["3d_cartesian_lat_lon", "mean_timestamps", *groups]
    assert parse_native_conditions("none,S2L2A+location,date", names) == {
        "S2L2A+location": ["S2L2A_B01_B09", "3d_cartesian_lat_lon"], "date": ["mean_timestamps"]}
    with pytest.raises(MajorTomGenError, match="does not take"):
        parse_native_conditions("S1RTC_vh_vv", names)
    nnet = {**cop_gen_network_config(network_modalities(names)), "embed_dim": 32, "depth": 2, "num_heads": 4}
    nnet["modalities"] = list(nnet["modalities"])
    (tmp_path / "n.yaml").write_text(yaml.safe_dump({"nnet": nnet, "train": {"batch_size": 4, "max_steps": 1}}))
    train_on_store(tmp_path / "n.yaml", tmp_path / "store", tmp_path / "run", TrainOptions(test_fraction=0.0, device="cpu"))
    args = ["evaluate", "--model", str(tmp_path / "run" / "model"), "--store", str(tmp_path / "store"),
            "--out", str(tmp_path / "eval"), "--steps", "2", "--guidance", "0"]
    r = CliRunner().invoke(app, args + ["--real-source", str(world)])
    assert r.exit_code == 2 and "no cell to evaluate" in r.output, r.output  # its one cell was seen in training
    r = CliRunner().invoke(app, args + ["--split", "all"])
    assert r.exit_code == 2 and "--real-source" in r.output, r.output
    r = CliRunner().invoke(app, args + ["--split", "all", "--real-source", str(world), "--conditions", "none,S2L2A+location"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["cells"] == [WORLD_CELLS[0]] and set(metrics["results"]) == {"DEM_DEM"}
    rows = metrics["results"]["DEM_DEM"]
    assert set(rows) == {"none", "S2L2A+location"} and rows["none"]["error"] > 0 and rows["none"]["change"] == 0
    assert "| DEM_DEM | S2L2A+location |" in (tmp_path / "eval" / "table.md").read_text()


def test_native_codec__train_a_group_codec_and_ingest_with_it(world, tmp_path):
    from typer.testing import CliRunner

    from majortom_gen.store import LatentStore
    from pipelines.cli import app
    from pipelines.ingest import IngestOptions
    from pipelines.ingest_native import ingest_native
    from model.codecs import load_codec
    from conftest import WORLD_CELLS

    r = CliRunner().invoke(app, ["codec", "train", "--family", "native", "--group", "DEM_DEM", "--source", str(world),
                                 "--cells", ",".join(WORLD_CELLS[:2]), "--out", str(tmp_path / "codecs"), "--steps", "3",
                                 "--batch-size", "4", "--crop", "32"])
    assert r.exit_code == 0 and "reconstruction error on them" in " ".join(r.output.split()), r.output
    codec = load_codec(source=tmp_path / "codecs" / "DEM_DEM")
    assert codec.name == "small-vae" and codec.model.config.in_channels == 1 and codec.model.config.latent_channels == 8
    assert codec.provenance["patches"] == 72 and codec.provenance["reconstruction_mae"]["unit"] == "m"
    assert "DEM_DEM" in codec.norms
    r = CliRunner().invoke(app, ["codec", "train", "--family", "native", "--group", "DEM_DEM", "--source", str(world),
                                 "--cells", WORLD_CELLS[0], "--out", str(tmp_path / "codecs"), "--steps", "1"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    report = ingest_native(world, [WORLD_CELLS[2]], tmp_path / "store",
                           IngestOptions(codec="small-vae", codec_source=str(tmp_path / "codecs"), scheduler="synchronous"),
                           groups=("DEM_DEM",))
    assert report.cells_written == 1
    store = LatentStore.open(tmp_path / "store")
    assert store.moment_shape("DEM_DEM") == (16, 8, 8)
    assert store.codec["config"]["members"]["DEM_DEM"]["config_hash"] == codec.info()["config_hash"]
