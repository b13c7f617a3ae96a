"""Latent codecs: images in [-1, 1] ``(B, 3, 256, 256)`` <-> latent moments ``(B, 8, 32, 32)``
(mean and log-variance of 4 channels) and scaled latents ``(B, 4, 32, 32)``.

- ``sd-vae``: the Stable Diffusion kl-f8 VAE (diffusers ``AutoencoderKL``), loaded from a
  hub id, a local ``save_pretrained`` folder, or an LDM/U-ViT style state dict file
  (``autoencoder_kl_ema.pth``, ``.ckpt``, ``.safetensors``); scale factor 0.18215.
- ``patch-pca``: an offline linear codec fitted on the data in seconds: PCA over 8x8x3
  pixel blocks keeps 4 components, whitened to unit variance each, giving 4 x 32 x 32
  latents; its log-variance is a fixed small constant. Honest about its quality: :meth:`PatchPCAAutoencoder.fit` returns the
  reconstruction PSNR. It is a ``ModelMixin`` so it saves and loads like any diffusers model.

Every codec reports ``info()`` = name, config and a hash of config and weights; a latent
store records it and refuses to mix codecs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

CODEC_NAMES = ("patch-pca", "sd-vae")
SD_SCALE_FACTOR = 0.18215
MAX_FIT_BLOCKS = 100_000  # 8x8 blocks used to fit patch-pca (~100 fragments' worth)
FIT_CHUNK = 32  # images per step when fitting / measuring PSNR
# The kl-f8 VAE of Stable Diffusion 1.x (what COP-GEN-Beta used), as a diffusers config.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 256, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": SD_SCALE_FACTOR,
}


def _hash(config: dict, module: torch.nn.Module) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def sample_latents(moments: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw scaled latents ``scale * (mean + exp(logvar/2) * eps)`` from ``(B, 8, H, W)`` moments."""
    mean, logvar = moments.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return scale * (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps)


class PatchPCAAutoencoder(ModelMixin, ConfigMixin):
    """A linear patch codec: ``latent = components.T @ (block - mean)`` per 8x8x3 block."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, patch_size: int = 8, in_channels: int = 3, latent_channels: int = 4,
                 logvar: float = -9.0, scaling_factor: float = 1.0, fit_psnr_db: float | None = None) -> None:
        super().__init__()
        dim = in_channels * patch_size * patch_size
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(dim, latent_channels))  # orthonormal columns
        self.register_buffer("component_std", torch.ones(latent_channels))  # whitening: unit variance per channel

    # (B, C, H, W) <-> (B, H/p * W/p, C*p*p)
    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def _unblocks(self, blocks: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.in_channels
        b = blocks.shape[0]
        x = blocks.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> float:
        """Fit mean and components on images in [-1, 1] ``(N, 3, H, W)``; returns the PSNR
        (dB, on the [0, 255] scale) of reconstructing them, and records it in the config.

        Works in chunks of images on an evenly spread subset of at most ``MAX_FIT_BLOCKS``
        blocks, so memory stays bounded whatever N is."""
        n_blocks = len(images) * (images.shape[2] // self.config.patch_size) * (images.shape[3] // self.config.patch_size)
        step = max(1, -(-n_blocks // MAX_FIT_BLOCKS))
        parts = [self._blocks(chunk.float()).reshape(-1, self.mean.numel())[::step].double()
                 for chunk in images.split(FIT_CHUNK)]
        blocks = torch.cat(parts)
        mean = blocks.mean(0)
        centred = blocks.sub_(mean)  # in place: no second copy
        cov = centred.T @ centred / max(len(blocks) - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        comps = evecs[:, -self.config.latent_channels:].flip(1)
        comps = comps * torch.sign(comps.sum(0, keepdim=True) + 1e-12)  # deterministic sign
        self.mean.copy_(mean.float())
        self.components.copy_(comps.float())
        # whiten: the first component carries most of the variance; unit variance per channel
        # keeps every latent channel on the scale diffusion models expect
        self.component_std.copy_((centred @ comps).std(0).clamp(min=1e-6).float())
        self.register_to_config(scaling_factor=1.0)
        psnr = float(reconstruction_psnr(self, images))
        self.register_to_config(fit_psnr_db=round(psnr, 3))
        return psnr

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, 8, H/8, W/8)`` moments (mean, constant logvar)."""
        b, _, h, w = images.shape
        p = self.config.patch_size
        coeff = (self._blocks(images.float()) - self.mean) @ self.components / self.component_std  # (B, L, 4)
        mean = coeff.permute(0, 2, 1).reshape(b, self.config.latent_channels, h // p, w // p)
        return torch.cat([mean, torch.full_like(mean, self.config.logvar)], dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, 4, h, w)`` -> images ``(B, 3, 8h, 8w)`` in [-1, 1] (clamped)."""
        b, c, h, w = latents.shape
        p = self.config.patch_size
        coeff = (latents.float() / self.config.scaling_factor).reshape(b, c, h * w).permute(0, 2, 1)
        blocks = (coeff * self.component_std) @ self.components.T + self.mean
        return self._unblocks(blocks, h * p, w * p).clamp(-1, 1)


def reconstruction_psnr(codec, images: torch.Tensor) -> float:
    """PSNR (dB, [0, 255] scale) of decode(mean latent) against ``images`` in [-1, 1],
    computed in chunks."""
    sq_err, count = 0.0, 0
    with torch.no_grad():
        for chunk in images.split(FIT_CHUNK):
            moments = codec.encode_moments(chunk)
            rec = codec.decode(moments[:, :4] * codec.config.scaling_factor)
            sq_err += float(((rec.float() - chunk.float()) ** 2).sum())
            count += chunk.numel()
    mse = sq_err / max(count, 1) * (255.0 / 2) ** 2
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


class Codec:
    """The codec interface the pipelines use, over a patch-pca or sd-vae model."""

    def __init__(self, name: str, model: torch.nn.Module, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str | None = None) -> None:
        if name not in CODEC_NAMES:
            raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}")
        self.name, self.source = name, source
        self.device, self.dtype = torch.device(device), dtype
        # patch-pca stays float32 (it is tiny); the VAE may run in fp16/bf16 on a GPU
        cast = name == "sd-vae" and dtype != torch.float32
        self.model = (model.to(self.device, dtype) if cast else model.to(self.device)).eval()
        self._hash: str | None = None

    @property
    def scale_factor(self) -> float:
        return float(self.model.config.scaling_factor if self.name == "patch-pca" else SD_SCALE_FACTOR)

    def config(self) -> dict:
        return {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}

    def info(self) -> dict:
        if self._hash is None:
            self._hash = _hash(self.config(), self.model)
        return {"name": self.name, "config_hash": self._hash, "config": self.config()}

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 256, 256)`` in [-1, 1] -> float32 ``(B, 8, 32, 32)`` moments on the CPU."""
        x = images.to(self.device, self.dtype if self.name == "sd-vae" else torch.float32)
        if self.name == "sd-vae":
            moments = self.model.encode(x).latent_dist.parameters
        else:
            moments = self.model.encode_moments(x)
        return moments.float().cpu()

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_latents(moments, self.scale_factor, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, 4, 32, 32)`` -> images ``(B, 3, 256, 256)`` in [-1, 1], CPU float32."""
        z = latents.to(self.device, self.dtype if self.name == "sd-vae" else torch.float32)
        if self.name == "sd-vae":
            out = self.model.decode(z / self.scale_factor).sample
        else:
            out = self.model.decode(z)
        return out.float().clamp(-1, 1).cpu()

    def save(self, folder: str | os.PathLike) -> None:
        self.model.save_pretrained(folder)


def load_sd_vae(source: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Codec:
    """An sd-vae codec from a hub id, a ``save_pretrained`` folder, or an LDM-format state-dict
    file (``.pth``/``.ckpt``/``.safetensors``, optionally under a ``state_dict`` key)."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        config = dict(SD_VAE_CONFIG)
        model = vae_from_ldm_state_dict(state, config)
    else:
        model = AutoencoderKL.from_pretrained(source)
    return Codec("sd-vae", model, device=device, dtype=dtype, source=str(source))


def vae_from_ldm_state_dict(state: dict[str, torch.Tensor], config: dict[str, Any]) -> AutoencoderKL:
    """Build an ``AutoencoderKL`` from an LDM/U-ViT style VAE state dict (``encoder.down.0.block.0...``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = convert_ldm_vae_checkpoint(state, config)
    model = AutoencoderKL(**{k: v for k, v in config.items()})
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"VAE state dict does not match the kl-f8 architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_codec(name: str, source: str | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Codec:
    """A codec by name: ``patch-pca`` from a folder written by :meth:`Codec.save`;
    ``sd-vae`` from a hub id, folder or state-dict file."""
    if name == "patch-pca":
        if source is None:
            raise ValueError("patch-pca needs the folder of a fitted codec")
        return Codec(name, PatchPCAAutoencoder.from_pretrained(source), source=str(source))
    if name == "sd-vae":
        if source is None:
            raise ValueError("sd-vae needs a hub id, a local folder or a .pth/.ckpt file (e.g. stabilityai/sd-vae-ft-ema)")
        return load_sd_vae(source, device=device, dtype=dtype)
    raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}")


def fit_patch_pca(images: torch.Tensor, **config: Any) -> tuple[Codec, float]:
    """Fit a patch-pca codec on images in [-1, 1]; returns the codec and its PSNR (dB)."""
    model = PatchPCAAutoencoder(**config)
    psnr = model.fit(images)
    return Codec("patch-pca", model), psnr
