"""Training the small learned codec: a diffusers ``AutoencoderKL`` (kl-f8, 4 latent channels)
on thumbnail fragments, tensors only.

Fully convolutional (no attention in the mid block), so it trains on random crops and
encodes whole 256 px fragments. Loss: L1 reconstruction plus a small KL term (weight
``kl_weight`` on the summed KL, as in the Stable Diffusion autoencoder) that keeps the
latents bounded. Augmentation: random crops, flips and 90-degree rotations. Every random
choice of step s derives from (seed, s): the same data, config and seed give the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL

# The architecture of the shipped codec: kl-f8 like Stable Diffusion's (3 downsamplings,
# 4 latent channels, so latents are 4 x 32 x 32 for a 256 px fragment) with 16x fewer
# channels, one resnet per level and no attention.
SMALL_VAE_CONFIG: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 256, "layers_per_block": 1,
    "block_out_channels": [32, 64, 128, 128], "norm_num_groups": 16, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "mid_block_add_attention": False, "scaling_factor": 1.0,
}


@dataclass(frozen=True)
class CodecTrainConfig:
    steps: int = 3000
    batch_size: int = 16
    crop: int = 96  # px; a multiple of 8
    lr: float = 1e-3  # AdamW, linear warm-up then cosine decay to lr/10
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations of a (B, 3, S, S) batch, one draw per image."""
    flips = torch.randint(0, 2, (len(batch), 2), generator=gen)
    turns = torch.randint(0, 4, (len(batch),), generator=gen)
    out = []
    for x, (fh, fv), k in zip(batch, flips.tolist(), turns.tolist()):
        if fh:
            x = x.flip(-1)
        if fv:
            x = x.flip(-2)
        out.append(torch.rot90(x, k, dims=(-2, -1)))
    return torch.stack(out)


def crop_batch(images: np.ndarray, step: int, config: CodecTrainConfig) -> torch.Tensor:
    """The batch of step ``step``: random crops of uint8 ``(N, H, W, 3)`` images, or of float
    ``(N, C, H, W)`` model inputs in [-1, 1] (the native family's band groups), as float
    ``(B, C, crop, crop)`` in [-1, 1], augmented."""
    return crop_batch_rows(images, step, config)[0]


def crop_batch_rows(images: np.ndarray, step: int, config: CodecTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`crop_batch` and the image rows its crops come from ``(B,)``."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng([config.seed, step]).integers(0, 2**62)))
    channels_last = images.dtype == np.uint8
    n, h, w = (images.shape[:3] if channels_last else (images.shape[0], *images.shape[2:]))
    idx = torch.randint(0, n, (config.batch_size,), generator=gen).tolist()
    rows = torch.randint(0, h - config.crop + 1, (config.batch_size,), generator=gen).tolist()
    cols = torch.randint(0, w - config.crop + 1, (config.batch_size,), generator=gen).tolist()
    if channels_last:
        crops = np.stack([images[i, r:r + config.crop, c:c + config.crop] for i, r, c in zip(idx, rows, cols)])
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    else:
        crops = np.stack([images[i, :, r:r + config.crop, c:c + config.crop] for i, r, c in zip(idx, rows, cols)])
        x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
    return _augment(x, gen), torch.as_tensor(idx)


def native_vae_config(channels: int) -> dict:
    """The small learned codec for a native band group: the shipped small-vae's architecture
    with ``channels`` in and out and 8 latent channels (the latent shape of COP-GEN's VAEs)."""
    return {**SMALL_VAE_CONFIG, "in_channels": channels, "out_channels": channels, "latent_channels": 8}


def _lr_factor(step: int, config: CodecTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(progress, 1.0)))


def _optimise(loss: torch.Tensor, opt, sched, losses: list[float],
              progress: Callable[[int, int, float], None] | None, done: int, total: int) -> None:
    """One optimiser and LR-scheduler step on ``loss``, logged in ``losses`` and reported."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
    if progress is not None:
        progress(done, total, losses[-1])


def train_small_vae(images: np.ndarray, config: CodecTrainConfig = CodecTrainConfig(), *,
                    vae_config: dict | None = None,
                    progress: Callable[[int, int, float], None] | None = None) -> tuple[AutoencoderKL, list[float]]:
    """Train an ``AutoencoderKL`` on uint8 fragments ``(N, H, W, 3)`` or float model inputs
    ``(N, C, H, W)`` in [-1, 1] (then give a ``vae_config`` with C channels, e.g.
    :func:`native_vae_config`); returns it (eval mode) and the loss of every step.
    ``progress(step, total, loss)`` is called after each step."""
    uint8 = images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8
    floats = images.ndim == 4 and np.issubdtype(images.dtype, np.floating)
    if not (uint8 or floats):
        raise ValueError(f"expected uint8 images (N, H, W, 3) or float (N, C, H, W), got {images.dtype} {images.shape}")
    side = min(images.shape[1:3]) if uint8 else min(images.shape[2:])
    if config.crop % 8 or config.crop > side:
        raise ValueError(f"crop {config.crop} must be a multiple of 8 and fit the {side} px images")
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(**(vae_config or SMALL_VAE_CONFIG))
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    losses = []
    vae.train()
    for step in range(config.steps):
        x = crop_batch(images, step, config)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = (rec - x).abs().mean()
        kl = posterior.kl().sum() / len(x)
        loss = rec_loss + config.kl_weight * kl
        _optimise(loss, opt, sched, losses, progress, step + 1, config.steps)
    return vae.eval(), losses


@dataclass(frozen=True)
class DecoderTuneConfig:
    """Fine-tuning a codec's decoder on noisy latents (:func:`tune_decoder`). ``latent_noise``:
    the largest noise std added to a latent, in the diffusion network's units (the latent
    normalised per modality, so std 1 is the whole signal): each crop draws its std uniformly
    in ``[0, latent_noise]``, or none with probability ``p_clean``."""

    steps: int = 600
    batch_size: int = 16
    crop: int = 64  # px; a multiple of 8
    lr: float = 2e-4  # AdamW, linear warm-up then cosine decay to lr/10
    warmup_steps: int = 50
    latent_noise: float = 0.3
    p_clean: float = 0.25
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def tune_decoder(vae: AutoencoderKL, images: np.ndarray, scales: np.ndarray, config: DecoderTuneConfig = DecoderTuneConfig(),
                 *, progress: Callable[[int, int, float], None] | None = None) -> tuple[AutoencoderKL, list[float]]:
    """A copy of ``vae`` whose decoder (``decoder.*``, ``post_quant_conv.*``) is fine-tuned to
    map noisy latents of uint8 fragments ``images`` ``(N, H, W, 3)`` to the clean fragments
    (L1); the encoder is frozen, so the latents -- and what a store holds -- do not change.

    A generated latent carries errors the decoder never saw in training (the diffusion
    network's residual noise), and a decoder trained on clean latents only draws them as
    speckle and 8 px blocks. The noise added here is Gaussian of std ``s / scales[i]`` in the
    codec's units (``s`` up to ``config.latent_noise``; ``scales[i]``: the latent
    normalisation scale of image ``i``'s modality), i.e. the same std in every modality's
    network units. Returns the tuned copy (eval mode) and each step's loss."""
    import copy

    if len(scales) != len(images):
        raise ValueError(f"{len(images)} images but {len(scales)} scales")
    crops = CodecTrainConfig(steps=config.steps, batch_size=config.batch_size, crop=config.crop, lr=config.lr,
                             warmup_steps=config.warmup_steps, seed=config.seed)
    if config.crop % 8 or config.crop > min(images.shape[1:3]):
        raise ValueError(f"crop {config.crop} must be a multiple of 8 and fit the {min(images.shape[1:3])} px images")
    tuned = copy.deepcopy(vae).train()
    tuned.encoder.requires_grad_(False)
    tuned.quant_conv.requires_grad_(False)
    params = [*tuned.decoder.parameters(), *tuned.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, crops))
    scales = torch.as_tensor(np.asarray(scales, np.float32))
    losses = []
    for step in range(config.steps):
        x, idx = crop_batch_rows(images, step, crops)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        with torch.no_grad():
            posterior = tuned.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            std = torch.rand(len(x), generator=gen) * config.latent_noise / scales[idx]
            std = torch.where(torch.rand(len(x), generator=gen) < config.p_clean, torch.zeros_like(std), std)
            z = z + std.view(-1, 1, 1, 1) * torch.randn(z.shape, generator=gen)
        loss = (tuned.decode(z).sample - x).abs().mean()
        _optimise(loss, opt, sched, losses, progress, step + 1, config.steps)
    return tuned.eval(), losses

