"""Latent codecs: images in [-1, 1] ``(B, 3, 256, 256)`` <-> latent moments ``(B, 8, 32, 32)``
(mean and log-variance of 4 channels) <-> the network's latents ``(B, 4, 32, 32)``.

- ``small-vae`` (the default, offline): a small kl-f8 ``AutoencoderKL`` the project trains on
  the thumbnails of its synthetic world (``majortom-gen codec train``); the trained one ships
  in the package (:data:`SHIPPED_CODEC`, with the command, seed and data that made it). Its
  decoder can be fine-tuned on noisy latents (``majortom-gen codec tune-decoder``,
  :func:`model.codec_training.tune_decoder`) so that generated latents, which carry the
  diffusion network's residual noise, decode without speckle: the tuned weights are kept
  beside the model (:data:`DECODER_FILE`, recorded under ``decoder`` in ``codec.json``) and
  decode; the encoder, and so the codec's identity, are unchanged.
- ``sd-vae``: the Stable Diffusion kl-f8 VAE (diffusers ``AutoencoderKL``), loaded from a
  hub id, a local ``save_pretrained`` folder, or an LDM/U-ViT style state dict file
  (``autoencoder_kl.pth``, ``.ckpt``, ``.safetensors``); scale factor 0.18215; optionally
  separate decoder weights (``ENCODE,DECODE``: the official pipeline decodes with
  ``autoencoder_kl_ema.pth``).
- ``cop-gen-vae``: one of COP-GEN's band-group VAEs (LDM kl-f8 with 8 latent channels, an
  image of any band count in, its ``scale_factor`` as the normalisation), converted from the
  official state dict by :func:`from_cop_gen_vae` into a diffusers ``AutoencoderKL``.
- ``patch-pca``: a linear codec fitted on the data in seconds: PCA over 8x8x3 pixel blocks
  keeps 4 components, whitened, giving 4 x 32 x 32 latents; its log-variance is a fixed small
  constant. Any latent error decodes as an 8 px block, so it is kept for comparison only.

Both kinds of autoencoder have one interface, diffusers' ``AutoencoderKL`` one:
``model.encode(x).latent_dist.parameters`` gives the moments, ``model.decode(z).sample`` the
images. What differs between codecs (default scale, what the identity hash covers, whether
they may run in half precision) is data: one :class:`CodecKind` per name in
:data:`CODEC_KINDS`.

A codec folder holds the model's own files and ``codec.json``: the codec's name, one
:class:`LatentNorm` per modality (the network's latents are zero-mean, unit-variance per
modality) and how the codec was made (and a tuned decoder, see above). Every codec reports ``info()`` = name, config
(normalisations included) and a hash of config and weights; a latent store records it and
refuses to mix codecs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

DEFAULT_CODEC = "small-vae"
CODEC_RECORD = "codec.json"  # name, per-modality normalisation and provenance, beside the model files
DECODER_FILE = "decoder.safetensors"  # a tuned decoder's weights (float16), beside the model files
DECODER_KEYS = ("decoder.", "post_quant_conv.")  # the AutoencoderKL weights that decode
SHIPPED_CODEC = Path(__file__).resolve().parent / "weights" / "small-vae"  # the trained small-vae
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


def _hash(config: dict, module: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> str:
    """sha256 of a config and a module's weights (only the weights whose names start with one
    of ``prefixes``, when given)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def moment_means(moments: torch.Tensor) -> torch.Tensor:
    """The mean latents of moments: ``(B, 2C, H, W)`` (means, then log-variances) ->
    ``(B, C, H, W)``, the first half of the channels (a view, dtype kept)."""
    return moments[:, :moments.shape[1] // 2]


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
        psnr = float(reconstruction_psnr(Codec("patch-pca", self), images))
        self.register_to_config(fit_psnr_db=round(psnr, 3))
        return psnr

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> float32 ``(B, 8, H/8, W/8)`` moments (mean, constant logvar)."""
        b, _, h, w = images.shape
        p = self.config.patch_size
        coeff = (self._blocks(images.float()) - self.mean) @ self.components / self.component_std  # (B, L, 4)
        mean = coeff.permute(0, 2, 1).reshape(b, self.config.latent_channels, h // p, w // p)
        return torch.cat([mean, torch.full_like(mean, self.config.logvar)], dim=1)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """As ``AutoencoderKL.encode``: images ``(B, 3, H, W)`` in [-1, 1] -> the latent
        distribution, whose ``parameters`` are the moments ``(B, 8, H/8, W/8)``."""
        dist = DiagonalGaussianDistribution(self.encode_moments(x))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """As ``AutoencoderKL.decode``: scaled latents ``(B, 4, h, w)`` -> ``sample``, images
        ``(B, 3, 8h, 8w)`` float32 in [-1, 1] (clamped)."""
        b, c, h, w = z.shape
        p = self.config.patch_size
        coeff = (z.float() / self.config.scaling_factor).reshape(b, c, h * w).permute(0, 2, 1)
        blocks = (coeff * self.component_std) @ self.components.T + self.mean
        images = self._unblocks(blocks, h * p, w * p).clamp(-1, 1)
        return DecoderOutput(sample=images) if return_dict else (images,)


def reconstruction_psnr(codec: "Codec", images: torch.Tensor) -> float:
    """PSNR (dB, [0, 255] scale) of decode(mean latent) against ``images`` in [-1, 1]
    ``(N, 3, H, W)``, computed in chunks."""
    sq_err, count = 0.0, 0
    with torch.no_grad():
        for chunk in images.split(FIT_CHUNK):
            rec = codec.decode(moment_means(codec.encode_moments(chunk)))
            sq_err += float(((rec.float() - chunk.float()) ** 2).sum())
            count += chunk.numel()
    mse = sq_err / max(count, 1) * (255.0 / 2) ** 2
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


def fit_latent_norms(codec: "Codec", images: Mapping[str, torch.Tensor]) -> dict[str, LatentNorm]:
    """One :class:`LatentNorm` per modality from its images in [-1, 1] (the means of their
    latents, encoded in chunks)."""
    out = {}
    for m, x in images.items():
        means = torch.cat([moment_means(codec.encode_moments(chunk)) for chunk in x.split(FIT_CHUNK)])
        out[m] = LatentNorm.fit(means)
    return out


@dataclass(frozen=True)
class LatentNorm:
    """One modality's map from a codec's latents ``z`` to the network's space:
    ``x = (z - shift) * scale``, per latent channel ``shift`` and one ``scale``, so that the
    network sees zero-mean, unit-variance latents whatever the codec and the modality (as the
    noise schedule assumes). Stable Diffusion's VAE uses ``shift = 0, scale = 0.18215`` for
    everything; COP-GEN fits one scale per modality."""

    shift: tuple[float, ...]
    scale: float

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.shift, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    def to_network(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._shift(z)) * self.scale

    def from_network(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self._shift(x)

    def as_dict(self) -> dict:
        return {"shift": list(self.shift), "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentNorm":
        return cls(tuple(float(v) for v in d["shift"]), float(d["scale"]))

    @classmethod
    def fit(cls, means: torch.Tensor) -> "LatentNorm":
        """From latent means ``(N, C, H, W)``: shift = per-channel mean, scale = 1 / the std
        of the shifted latents over all channels (rounded to 6 significant digits, so the
        record reads the same everywhere)."""
        m = means.double()
        shift = m.mean(dim=(0, 2, 3))
        std = float((m - shift.view(1, -1, 1, 1)).std())
        return cls(tuple(float(f"{v:.6g}") for v in shift.tolist()), float(f"{1.0 / max(std, 1e-6):.6g}"))


@dataclass(frozen=True)
class CodecKind:
    """What differs between codecs, as data. ``model_cls``: the autoencoder class (both have
    diffusers' ``AutoencoderKL`` interface); ``default_scale``: the :class:`LatentNorm` scale
    of a modality without a fitted one; ``hash_weights``: the prefixes of the weights the
    identity hash covers (None: all); ``default_scale`` None: the model config's
    ``scaling_factor``; ``hash_ignores``: config keys left out of the hash;
    ``half_precision``: whether it may run in fp16/bf16 (else always float32)."""

    model_cls: type[torch.nn.Module]
    default_scale: float | None = 1.0
    hash_weights: tuple[str, ...] | None = None
    hash_ignores: tuple[str, ...] = ()
    half_precision: bool = True


CODEC_KINDS: dict[str, CodecKind] = {
    "small-vae": CodecKind(AutoencoderKL),
    "patch-pca": CodecKind(PatchPCAAutoencoder, half_precision=False),  # tiny: stays float32
    # the latents depend on the encoder side only; the public kl-f8 VAEs share it (their
    # fine-tuning changed the decoder), so a store encoded with one decodes with another.
    # 0.18215 is what the published COP-GEN-Beta weights expect.
    "sd-vae": CodecKind(AutoencoderKL, default_scale=SD_SCALE_FACTOR, hash_weights=("encoder.", "quant_conv."),
                        hash_ignores=("scaling_factor", "force_upcast")),
    # one band group's VAE; its scale is the model's own ``scaling_factor`` (official, per group)
    "cop-gen-vae": CodecKind(AutoencoderKL, default_scale=None),
}
CODEC_NAMES = tuple(CODEC_KINDS)


def codec_kind(name: str) -> CodecKind:
    """The :class:`CodecKind` of a codec name; a ValueError names the valid ones."""
    if name not in CODEC_KINDS:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    return CODEC_KINDS[name]


def default_norm(name: str, channels: int = 4, config: Mapping[str, Any] | None = None) -> LatentNorm:
    """The normalisation of a codec that records none: its kind's default scale (0.18215 for
    sd-vae; cop-gen-vae: the ``scaling_factor`` of its ``config``), no shift; identity for a
    name that is no codec kind."""
    kind = CODEC_KINDS.get(name)
    scale = 1.0 if kind is None else kind.default_scale
    if scale is None:
        scale = float((config or {}).get("scaling_factor") or 1.0)
    return LatentNorm((0.0,) * channels, scale)


# The scalar tokens of the native family (location, date) have no codec: the network sees them as they are.
SCALAR_NORM = LatentNorm((0.0,), 1.0)


def latent_norms(codec_info: dict, modalities: Sequence[str]) -> dict[str, LatentNorm]:
    """Each modality's normalisation from a codec record (``Codec.info()``, or a store
    manifest's ``codec``): the fitted ones it holds, or the codec's default. A codec set (a
    native store) gives each band group its member's, and the scalar tokens the identity."""
    if codec_info.get("name") == "codec-set":  # the native family: one codec per band group
        members = (codec_info.get("config") or {}).get("members") or {}
        return {m: latent_norms(members[m], [m])[m] if m in members else SCALAR_NORM for m in modalities}
    fitted = (codec_info.get("config") or {}).get("latent_norm") or {}
    config = codec_info.get("config") or {}
    channels = int(config.get("latent_channels", 4))
    return {m: LatentNorm.from_dict(fitted[m]) if m in fitted else default_norm(codec_info["name"], channels, config)
            for m in modalities}


class Codec:
    """The codec interface the pipelines use: images <-> latent moments, latents <-> the
    network's space (per-modality :class:`LatentNorm`), save and load as one folder.

    ``model`` is an ``AutoencoderKL`` (``small-vae``: the project's learned codec;
    ``sd-vae``: Stable Diffusion's kl-f8) or a :class:`PatchPCAAutoencoder` (``patch-pca``),
    both used through the ``AutoencoderKL`` interface; the name's :class:`CodecKind` says the
    rest. Latents ``z`` are the autoencoder's own (unscaled) latents."""

    def __init__(self, name: str, model: torch.nn.Module, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str | None = None, norms: Mapping[str, LatentNorm] | None = None,
                 provenance: dict | None = None) -> None:
        self.kind = codec_kind(name)
        if not isinstance(model, self.kind.model_cls):
            raise TypeError(f"a {name} codec needs a {self.kind.model_cls.__name__}, got {type(model).__name__}")
        self.name, self.source = name, source
        self.device = torch.device(device)
        self.dtype = dtype if self.kind.half_precision else torch.float32
        self.model = (model.to(self.device) if self.dtype == torch.float32 else model.to(self.device, self.dtype)).eval()
        self.norms: dict[str, LatentNorm] = dict(norms or {})
        self.provenance = dict(provenance or {})
        self._hash: str | None = None
        self.decoder: AutoencoderKL | None = None  # separate decoder weights (see load_codec), else ``model``
        self.decoder_record: dict | None = None  # how a tuned decoder was made (saved with it, see save)

    def norm(self, modality: str) -> LatentNorm:
        config = dict(self.model.config)
        return self.norms.get(modality) or default_norm(self.name, int(config.get("latent_channels", 4)), config)

    def config(self) -> dict:
        config = {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}
        if self.norms:
            config["latent_norm"] = {m: n.as_dict() for m, n in sorted(self.norms.items())}
        return config

    def info(self) -> dict:
        """Name, config and ``config_hash``: what a store records. The hash covers the config
        and the weights, less what the codec's kind leaves out (sd-vae: the encoder side only,
        ``encoder.*`` and ``quant_conv.*``, and the architecture; see :data:`CODEC_KINDS`)."""
        if self._hash is None:
            hashed = {k: v for k, v in self.config().items() if k not in self.kind.hash_ignores}
            self._hash = _hash(hashed, self.model, prefixes=self.kind.hash_weights)
        return {"name": self.name, "config_hash": self._hash, "config": self.config()}

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 256, 256)`` in [-1, 1] -> float32 ``(B, 8, 32, 32)`` moments (mean and
        log-variance of the latents) on the CPU."""
        x = images.to(self.device, self.dtype)
        return self.model.encode(x).latent_dist.parameters.float().cpu()

    def to_network(self, moments: torch.Tensor, modality: str, generator: torch.Generator | None = None, *,
                   sample: bool = True) -> torch.Tensor:
        """Moments ``(B, 8, H, W)`` -> the network's latents ``(B, 4, H, W)`` of ``modality``:
        a draw from the posterior (``sample=True``) or its mean, normalised."""
        z = sample_latents(moments, 1.0, generator) if sample else moment_means(moments).float()
        return self.norm(modality).to_network(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``z`` ``(B, 4, 32, 32)`` -> images ``(B, 3, 256, 256)`` in [-1, 1], CPU float32."""
        z = latents.to(self.device, self.dtype)
        model = self.decoder if self.decoder is not None else self.model
        return model.decode(z).sample.float().clamp(-1, 1).cpu()

    def decode_network(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """The network's latents of ``modality`` -> images in [-1, 1]."""
        return self.decode(self.norm(modality).from_network(x.float()))

    def save(self, folder: str | os.PathLike) -> None:
        """The model files (``save_pretrained``) and ``codec.json`` (name, normalisations,
        provenance); with a tuned decoder (``decoder_record`` set), its weights as
        :data:`DECODER_FILE` (float16) and its record under ``decoder`` in ``codec.json``."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        record = {"name": self.name, "latent_norm": {m: n.as_dict() for m, n in sorted(self.norms.items())},
                  "provenance": self.provenance}
        if self.decoder is not None and self.decoder_record is not None:
            from safetensors.torch import save_file

            weights = {k: v.detach().to("cpu", torch.float16).contiguous()
                       for k, v in self.decoder.state_dict().items() if k.startswith(DECODER_KEYS)}
            save_file(weights, str(folder / DECODER_FILE))
            record["decoder"] = {"file": DECODER_FILE, **self.decoder_record}
        (folder / CODEC_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def with_decoder(model: AutoencoderKL, weights: Mapping[str, torch.Tensor]) -> AutoencoderKL:
    """A copy of ``model`` whose decoding weights (:data:`DECODER_KEYS`) are ``weights``; a
    clear error when they do not fit it."""
    import copy

    wanted = {k for k in model.state_dict() if k.startswith(DECODER_KEYS)}
    if set(weights) != wanted:
        missing, extra = sorted(wanted - set(weights)), sorted(set(weights) - wanted)
        raise ValueError(f"decoder weights do not fit the codec (missing {missing[:3]}, unexpected {extra[:3]})")
    decoder = copy.deepcopy(model)
    state = decoder.state_dict()
    for k, v in weights.items():
        if v.shape != state[k].shape:
            raise ValueError(f"decoder weight {k}: shape {tuple(v.shape)}, the codec's is {tuple(state[k].shape)}")
        state[k] = v.to(state[k].dtype)
    decoder.load_state_dict(state)
    return decoder.eval()


def load_sd_vae(source: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Codec:
    """An sd-vae codec from a hub id, a ``save_pretrained`` folder, or an LDM-format state-dict
    file (``.pth``/``.ckpt``/``.safetensors``, optionally under a ``state_dict`` key)."""
    path = Path(source)
    if path.is_file():
        model = vae_from_ldm_state_dict(read_state_dict(path), dict(SD_VAE_CONFIG))
    else:
        model = AutoencoderKL.from_pretrained(source)
    return Codec("sd-vae", model, device=device, dtype=dtype, source=str(source))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.ckpt``/``.safetensors`` file (optionally under a
    ``state_dict`` key)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def ldm_vae_config(ddconfig: Mapping[str, Any], scale_factor: float) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of an LDM autoencoder ``ddconfig`` (``ch``,
    ``ch_mult``, ``num_res_blocks``, ``z_channels``, ``in_channels``, ``out_ch``,
    ``resolution``, ``double_z``, ``attn_resolutions``): one down/up block per ``ch_mult``
    level, a mid-block with attention, ``scale_factor`` as ``scaling_factor``."""
    if not ddconfig.get("double_z", True):
        raise ValueError("ddconfig: only KL autoencoders (double_z=True) are supported")
    if ddconfig.get("attn_resolutions"):
        raise ValueError(f"ddconfig: attention inside the down/up blocks (attn_resolutions "
                         f"{ddconfig['attn_resolutions']}) has no diffusers AutoencoderKL equivalent")
    levels = len(ddconfig["ch_mult"])
    return {"in_channels": int(ddconfig["in_channels"]), "out_channels": int(ddconfig["out_ch"]),
            "latent_channels": int(ddconfig["z_channels"]), "sample_size": int(ddconfig["resolution"]),
            "layers_per_block": int(ddconfig["num_res_blocks"]),
            "block_out_channels": [int(ddconfig["ch"]) * int(m) for m in ddconfig["ch_mult"]],
            "norm_num_groups": 32, "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels, "scaling_factor": float(scale_factor)}


def from_cop_gen_vae(path: str | os.PathLike, ddconfig: Mapping[str, Any], scale_factor: float, *,
                     device: str = "cpu", dtype: torch.dtype = torch.float32) -> Codec:
    """A ``cop-gen-vae`` codec from one of COP-GEN's band-group VAEs: ``path`` a state-dict file
    (``model-50-ema.pth``) or ``repo_id:filename`` on the hub (``mespinosami/copgen-vaes``);
    ``ddconfig`` its LDM config (``majortom_gen.native.BandGroup.vae_ddconfig``);
    ``scale_factor`` the official one. Latents scale as the official ``FrozenAutoencoderKL``:
    the network sees ``scale_factor * z``."""
    file = Path(path)
    if not file.is_file():
        repo, sep, name = str(path).partition(":")
        if not sep or not name:
            raise ValueError(f"{path}: no such file; give a state-dict file or repo_id:filename on the hub")
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(repo, name))
    model = vae_from_ldm_state_dict(read_state_dict(file), ldm_vae_config(ddconfig, scale_factor))
    return Codec("cop-gen-vae", model, device=device, dtype=dtype, source=str(path))


def vae_from_ldm_state_dict(state: dict[str, torch.Tensor], config: dict[str, Any]) -> AutoencoderKL:
    """Build an ``AutoencoderKL`` from an LDM/U-ViT style VAE state dict (``encoder.down.0.block.0...``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = convert_ldm_vae_checkpoint(state, config)
    model = AutoencoderKL(**{k: v for k, v in config.items()})
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as exc:  # shapes that differ from the config
        raise ValueError(f"VAE state dict does not match the architecture {config}: {exc}") from None
    if missing or unexpected:
        raise ValueError(f"VAE state dict does not match the architecture {config}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def load_codec(name: str | None = None, source: str | os.PathLike | None = None, *, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> Codec:
    """A codec from a folder written by :meth:`Codec.save` (its ``codec.json`` names it), the
    shipped small-vae (``name='small-vae'`` without ``source``), or an sd-vae from a hub id,
    folder or state-dict file. ``name``, when given, must match the folder's record.

    An sd-vae ``source`` may name two weights, ``"ENCODE,DECODE"``: the official COP-GEN-Beta
    pipeline encodes with ``autoencoder_kl.pth`` and decodes with ``autoencoder_kl_ema.pth``
    (``--codec-source autoencoder_kl.pth,autoencoder_kl_ema.pth``). The codec's identity (its
    hash, what a store records) is that of the encoding weights: they make the latents."""
    if name is not None:
        codec_kind(name)  # refuses an unknown name
    if name == "sd-vae" and isinstance(source, str) and "," in source:
        parts = [part.strip() for part in source.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--codec-source {source!r}: give one VAE, or two as ENCODE,DECODE "
                             "(e.g. autoencoder_kl.pth,autoencoder_kl_ema.pth)")
        codec = load_sd_vae(parts[0], device=device, dtype=dtype)
        decoder = load_sd_vae(parts[1], device=device, dtype=dtype).model
        same = [{k: v for k, v in dict(m.config).items() if not k.startswith("_")} for m in (decoder, codec.model)]
        if same[0] != same[1]:
            raise ValueError(f"--codec-source: the decoder {parts[1]} is not the same architecture as the encoder {parts[0]}")
        codec.decoder, codec.source = decoder, source
        return codec
    if source is None:
        if name == "small-vae":
            source = SHIPPED_CODEC
        elif name == "sd-vae":
            raise ValueError("sd-vae needs a hub id, a local folder or a .pth/.ckpt file (e.g. stabilityai/sd-vae-ft-ema)")
        else:
            raise ValueError(f"{name or 'a codec'} needs the folder it was saved to")
    record_file = Path(source) / CODEC_RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if name is not None and record["name"] != name:
            raise ValueError(f"{source} holds a {record['name']} codec, not {name}")
        model_cls = codec_kind(record["name"]).model_cls
        norms = {m: LatentNorm.from_dict(d) for m, d in record.get("latent_norm", {}).items()}
        codec = Codec(record["name"], model_cls.from_pretrained(source), device=device, dtype=dtype, source=str(source),
                      norms=norms, provenance=record.get("provenance"))
        if "decoder" in record:  # a tuned decoder (see Codec.save): it decodes, the model's own encoder encodes
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            path = Path(source) / record["decoder"]["file"]
            try:
                codec.decoder = with_decoder(codec.model, load_file(str(path)))  # on the model's device and dtype
            except (OSError, ValueError, SafetensorError) as exc:
                raise ValueError(f"{source}: its tuned decoder {path.name} cannot be read ({exc})") from None
            codec.decoder_record = {k: v for k, v in record["decoder"].items() if k != "file"}
        return codec
    if name == "sd-vae":
        return load_sd_vae(str(source), device=device, dtype=dtype)
    config_file = Path(source) / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == PatchPCAAutoencoder.__name__:
        # a patch-pca folder of a store made before codec.json existed: identity normalisation
        return Codec("patch-pca", PatchPCAAutoencoder.from_pretrained(source), source=str(source))
    raise ValueError(f"{source}: not a codec folder (no {CODEC_RECORD}); sd-vae sources need --codec sd-vae")


def fit_patch_pca(images: torch.Tensor | Mapping[str, torch.Tensor], **config: Any) -> tuple[Codec, float]:
    """Fit a patch-pca codec on images in [-1, 1] (one tensor, or one per modality: then each
    modality gets its own :class:`LatentNorm`); returns the codec and its PSNR (dB)."""
    by_modality = dict(images) if isinstance(images, Mapping) else {}
    model = PatchPCAAutoencoder(**config)
    psnr = model.fit(torch.cat(list(by_modality.values())) if by_modality else images)
    codec = Codec("patch-pca", model)
    codec.norms = fit_latent_norms(codec, by_modality)
    return codec, psnr
