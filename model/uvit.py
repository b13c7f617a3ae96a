"""The multimodal U-ViT of COP-GEN-Beta: one timestep per modality.

Tokens: one time token per modality, then the patch tokens of every modality (patch size
p on ``(C, H, W)`` latents), with one learned position embedding over the whole sequence.
Modalities may differ in latent channels, size and patch size (the COP-GEN design: band
groups at 24x24, 12x12 and 4x4 latents, and *scalar* modalities such as a location or a date,
which are ``(C, 1, N)`` latents with patch size 1, i.e. N tokens of C values).
depth/2 in-blocks, a mid-block, depth/2 out-blocks fed long skips (concat + linear);
post-LayerNorm blocks as in the released model; attention through
``scaled_dot_product_attention`` (flash / memory-efficient kernels where available, q/k/v
kept in the compute dtype). Submodule names follow the released checkpoint so weights map
one to one (see :mod:`model.convert`).

Shapes: B batch, M modalities, N_m = (H_m/p_m)(W_m/p_m) patches of modality m, D embed dim,
L = M + sum_m N_m tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_2d(dim: int, rows: int, cols: int | None = None) -> torch.Tensor:
    """2-D sine-cosine position codes of a ``rows x cols`` patch grid (square when ``cols`` is
    None), row-major: (rows*cols, dim); the first half of the channels encodes the row, the
    second half the column (as MAE/DiT)."""
    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega.view(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    r, c = torch.meshgrid(torch.arange(rows), torch.arange(rows if cols is None else cols), indexing="ij")
    half = dim // 2
    codes = torch.cat([one_axis(half, r), one_axis(dim - half, c)], dim=1)
    return codes.float()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        qkv = self.qkv(x).reshape(b, l, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, L, d)
        return self.proj(out.transpose(1, 2).reshape(b, l, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-LN transformer block; with ``skip``, a long skip is merged first (concat + linear + LN)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if skip else None
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.norm1(self.skip_linear(torch.cat([x, skip], dim=-1)))
        x = self.norm2(x + self.attn(x))
        return self.norm3(x + self.mlp(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


PREDICTIONS = ("epsilon", "v")


def per_modality(value, names: Sequence[str], what: str) -> dict:
    """One value per modality from a network config field: the same value for all, or a
    mapping that must name every modality (a ValueError names what is missing)."""
    if isinstance(value, Mapping):
        missing = [m for m in names if m not in value]
        extra = sorted(set(value) - set(names))
        if missing or extra:
            raise ValueError(f"{what}: give one value per modality; missing {missing}, unknown {extra}")
        return {m: value[m] for m in names}
    return {m: value for m in names}


def latent_grid(size) -> tuple[int, int]:
    """A latent size as (H, W): an int is a square side; a pair is (H, W) (scalars: (1, N))."""
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


class MultiModalUViT(ModelMixin, ConfigMixin):
    """Denoiser over named modalities: ``forward(latents, timesteps) -> prediction`` per modality.

    ``in_chans``, ``img_size`` and ``patch_size`` are one value for every modality (the
    thumbnail family: 4 x 32 x 32 latents, patch 2) or a mapping with one value per modality
    (the native family); ``img_size`` is a side or an (H, W) pair. A scalar modality of N values
    is an ``(C, 1, N)`` latent with patch size 1.

    ``prediction`` says what the heads output: ``epsilon`` (the noise, as the released
    COP-GEN-Beta network) or ``v`` (``sqrt(abar) eps - sqrt(1 - abar) x0``, Salimans & Ho 2022,
    well conditioned at every noise level, which lets small models learn the high-noise end,
    where the other modalities decide the layout). The network itself is the same; the
    sampler hands either to its solver as is (:func:`model.diffusion.sampling_scheduler`) and
    :func:`model.diffusion.predict_x0` turns either into the clean latent.

    ``zero_terminal_snr`` says which noise schedule the network was trained on (the layers do not
    change): False, the released one (Stable Diffusion's, whose last step keeps 7% of the signal);
    True, the same rescaled so that the last step is pure noise (Lin et al. 2024; ``v`` only),
    see :func:`model.diffusion.training_scheduler`."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        modalities: Sequence[str] = ("DEM", "S1RTC", "S2L1C", "S2L2A"),
        img_size: int | Sequence[int] | Mapping[str, int | Sequence[int]] = 32,
        in_chans: int | Mapping[str, int] = 4,
        patch_size: int | Mapping[str, int] = 2,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        prediction: str = "epsilon",
        zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        names = list(modalities)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"modalities must be distinct names, got {names!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        if depth % 2:
            raise ValueError(f"depth must be even (depth/2 in-blocks, depth/2 out-blocks), got {depth}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if zero_terminal_snr and prediction != "v":
            raise ValueError("zero_terminal_snr needs prediction 'v' (at the last step there is no signal to tell "
                             "the noise from: an epsilon network cannot give the clean latent there)")
        chans = per_modality(in_chans, names, "in_chans")
        sizes = {m: latent_grid(v) for m, v in per_modality(img_size, names, "img_size").items()}
        patches = per_modality(patch_size, names, "patch_size")
        for m in names:
            if sizes[m][0] % patches[m] or sizes[m][1] % patches[m]:
                raise ValueError(f"{m}: img_size {sizes[m]} is not a multiple of patch_size {patches[m]}")
        #: per modality: (C, H, W) latents, patch size, patch grid (rows, cols)
        self.latent_shapes = {m: (chans[m], *sizes[m]) for m in names}
        self.patch_sizes = patches
        self.patch_grids = {m: (sizes[m][0] // patches[m], sizes[m][1] // patches[m]) for m in names}
        self.num_patches = {m: r * c for m, (r, c) in self.patch_grids.items()}
        self.patch_embeds = nn.ModuleList(PatchEmbed(patches[m], chans[m], embed_dim) for m in names)
        self.time_img_embeds = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed else nn.Identity() for _ in names)
        self.pos_embed = nn.Parameter(torch.zeros(1, len(names) + sum(self.num_patches.values()), embed_dim))
        self.in_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth // 2))
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=True) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_preds = nn.ModuleList(nn.Linear(embed_dim, patches[m] ** 2 * chans[m]) for m in names)
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """Linear layers truncated-normal (std 0.02) as U-ViT. The position embedding stays a
        learned parameter (the released layout) but starts from a 2-D sine-cosine code of each
        modality's patch grid, so the same place has the same code in modalities of the same
        grid from the first step (time tokens start at small random values)."""
        d = self.config.embed_dim
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            if d >= 4:
                start = len(self.modalities)
                for m in self.modalities:
                    n = self.num_patches[m]
                    self.pos_embed[0, start:start + n] = sincos_2d(d, *self.patch_grids[m])
                    start += n
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def latent_shape(self, modality: str | None = None) -> tuple[int, int, int]:
        """The (C, H, W) latents of ``modality``; without one, the shape every modality shares
        (a ValueError when they differ: such a network needs per-modality shapes)."""
        if modality is not None:
            return self.latent_shapes[modality]
        shapes = set(self.latent_shapes.values())
        if len(shapes) != 1:
            raise ValueError(f"this network's modalities have different latent shapes {self.latent_shapes}; "
                             "this operation needs one shape for all (the thumbnail family)")
        return next(iter(shapes))

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modalities)

    def _unpatchify(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W) on the modality's patch grid, patch vectors ordered (p1, p2, C)."""
        p, c = self.patch_sizes[modality], self.latent_shapes[modality][0]
        h, w = self.patch_grids[modality]
        return x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, h * p, w * p)

    def _block(self, blk: Block, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(blk, x, skip, use_reentrant=False)
        return blk(x, skip)

    def forward(self, latents: Mapping[str, torch.Tensor], timesteps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``latents[m]``: (B, C, H, W); ``timesteps[m]``: (B,) float in 0..1000 (0 = clean).
        Returns the prediction for every modality, same keys and shapes."""
        names = self.modalities
        missing = [m for m in names if m not in latents or m not in timesteps]
        if missing:
            raise ValueError(f"missing latents/timesteps for {missing}; this network models {names} "
                             "(feed a marginalised modality as noise at timestep 1000)")
        wrong = {m: tuple(latents[m].shape[1:]) for m in names if tuple(latents[m].shape[1:]) != self.latent_shapes[m]}
        if wrong:
            raise ValueError(f"latents of the wrong shape {wrong}; this network takes {self.latent_shapes}")
        d = self.config.embed_dim
        # 1. tokens: time tokens (B, 1, D) per modality, then patch tokens (B, N, D) per modality
        time_tokens = [self.time_img_embeds[i](timestep_embedding(timesteps[m].reshape(-1), d)).unsqueeze(1)
                       for i, m in enumerate(names)]
        patch_tokens = [self.patch_embeds[i](latents[m]) for i, m in enumerate(names)]
        x = torch.cat(time_tokens + patch_tokens, dim=1)  # (B, L, D)
        x = x + self.pos_embed.to(x.dtype)
        # 2. U-ViT body with long skips
        skips = []
        for blk in self.in_blocks:
            x = self._block(blk, x)
            skips.append(x)
        x = self._block(self.mid_block, x)
        for blk in self.out_blocks:
            x = self._block(blk, x, skips.pop())
        x = self.norm(x)
        # 3. per-modality heads on the patch tokens
        start, out = len(names), {}
        for i, name in enumerate(names):
            tokens = x[:, start:start + self.num_patches[name]]  # (B, N_m, D)
            start += self.num_patches[name]
            out[name] = self._unpatchify(self.decoder_preds[i](tokens), name)
        return out
