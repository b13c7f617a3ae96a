"""Load the published COP-GEN-Beta and COP-GEN weights into :class:`model.uvit.MultiModalUViT`.

The official checkpoint (``nnet_ema_114000.pth`` in the hub repo ``mespinosami/COP-GEN-Beta``)
is a plain state dict of the research code's ``Triffuser`` network, whose submodule names
this network keeps (``patch_embeds.{i}``, ``pos_embed``, ``in_blocks``, ``mid_block``,
``out_blocks``, ``norm``, ``decoder_preds.{i}``), with modalities in the order dem, s1_rtc,
s2_l1c, s2_l2a. The conversion therefore checks names and shapes and maps index i to the
i-th modality name; outputs are identical.

COP-GEN (``mespinosami/copgen-base``) is the same network with per-modality latent shapes and
patch sizes, and scalar modalities (``(C, 1, N)`` latents, patch size 1); its modalities are
given as the official config's ``{name: {modality_type, latent_channels,
latent_input_resolution, patch_size}}`` in the official order (see
``majortom_gen.native.network_modalities``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from model.uvit import MultiModalUViT

HUB_REPO = "mespinosami/COP-GEN-Beta"
HUB_FILE = "nnet_ema_114000.pth"
COP_GEN_BETA_MODALITIES = ("DEM", "S1RTC", "S2L1C", "S2L2A")  # dem, s1_rtc, s2_l1c, s2_l2a
RELEASE_CONFIG = dict(img_size=32, in_chans=4, patch_size=2, embed_dim=1024, depth=20, num_heads=16,
                      mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False)


COP_GEN_BASE_CONFIG = dict(embed_dim=1024, depth=20, num_heads=16, mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False)


def cop_gen_network_config(modalities: Mapping[str, Mapping]) -> dict:
    """The per-modality fields of :class:`MultiModalUViT` (modalities, img_size, in_chans,
    patch_size) from the official modality specs: an image modality of latent (H, W) keeps
    its patch size; a scalar one of resolution (1, N) is N tokens, patch size 1."""
    img_size, in_chans, patch_size = {}, {}, {}
    for name, spec in modalities.items():
        kind = spec["modality_type"]
        h, w = (int(v) for v in spec["latent_input_resolution"])
        if kind == "image":
            if h != w:
                raise ValueError(f"{name}: the official network takes square image latents, got {(h, w)}")
            img_size[name], patch_size[name] = [h, w], int(spec.get("patch_size", 2))
        elif kind == "scalar":
            img_size[name], patch_size[name] = [1, w], 1
        else:
            raise ValueError(f"{name}: modality_type must be image or scalar, got {kind!r}")
        in_chans[name] = int(spec["latent_channels"])
    return {"modalities": tuple(modalities), "img_size": img_size, "in_chans": in_chans, "patch_size": patch_size}


def from_cop_gen(state_dict: Mapping[str, torch.Tensor], modalities: Mapping[str, Mapping], *,
                 embed_dim: int = 1024, depth: int = 20, num_heads: int = 16, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, mlp_time_embed: bool = False, prediction: str = "epsilon") -> MultiModalUViT:
    """The network of an official COP-GEN state dict (keys optionally prefixed ``module.``).

    ``modalities``: ``{name: {"modality_type": "image" | "scalar", "latent_channels": C,
    "latent_input_resolution": (H, W), "patch_size": p}}`` in the official order (the order of
    the checkpoint's ``patch_embeds.{i}``). Defaults: COP-GEN base (1024 wide, 20 deep, 16 heads)."""
    config = {**cop_gen_network_config(modalities), "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
              "mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias, "mlp_time_embed": mlp_time_embed, "prediction": prediction}
    return _load_exact(state_dict, config)


def _load_exact(state_dict: Mapping[str, torch.Tensor], config: dict) -> MultiModalUViT:
    """A :class:`MultiModalUViT` of ``config`` holding exactly the weights of ``state_dict``
    (names and shapes checked; a ValueError lists what does not match)."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    modalities = config["modalities"]
    n_mod = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("patch_embeds.")), default=-1)
    if n_mod != len(modalities):
        raise ValueError(f"the checkpoint has {n_mod} modalities but {len(modalities)} names were given: {list(modalities)}")
    net = MultiModalUViT(**config)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
             if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError("the state dict does not match the network config "
                         f"{config}: missing {missing[:6]}, unexpected {unexpected[:6]}, wrong shapes {wrong[:6]}")
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return net.eval()


def from_cop_gen_beta(state_dict: Mapping[str, torch.Tensor], modalities: Sequence[str] = COP_GEN_BETA_MODALITIES,
                      **network_config) -> MultiModalUViT:
    """Build the network from an official state dict (keys optionally prefixed ``module.``).

    ``network_config``: embed_dim, depth, num_heads, patch_size, img_size, in_chans, qkv_bias,
    mlp_time_embed (defaults: the released model)."""
    return _load_exact(state_dict, {**RELEASE_CONFIG, **network_config, "modalities": tuple(modalities)})


def load_checkpoint(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.pth`` file, or from the hub as ``repo_id[:filename]``
    (default ``mespinosami/COP-GEN-Beta:nnet_ema_114000.pth``)."""
    path = Path(source)
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        repo, _, name = str(source).partition(":")
        path = Path(hf_hub_download(repo or HUB_REPO, name or HUB_FILE))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def convert(source: str | os.PathLike, out: str | os.PathLike, modalities: Sequence[str] = COP_GEN_BETA_MODALITIES,
            **network_config) -> MultiModalUViT:
    """Convert an official checkpoint and ``save_pretrained`` it to ``out``."""
    net = from_cop_gen_beta(load_checkpoint(source), modalities, **network_config)
    net.save_pretrained(out)
    return net
