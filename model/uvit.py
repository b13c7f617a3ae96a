"""The multimodal U-ViT of COP-GEN-Beta: one timestep per modality.

Tokens: one time token per modality, then the patch tokens of every modality (patch size
p on ``(C, H, W)`` latents), with one learned position embedding over the whole sequence.
depth/2 in-blocks, a mid-block, depth/2 out-blocks fed long skips (concat + linear);
post-LayerNorm blocks as in the released model; attention through
``scaled_dot_product_attention`` (flash / memory-efficient kernels where available, q/k/v
kept in the compute dtype). Submodule names follow the released checkpoint so weights map
one to one (see :mod:`model.convert`).

Shapes: B batch, M modalities, N = (H/p)(W/p) patches per modality, D embed dim,
L = M + M*N tokens.
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


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """2-D sine-cosine position codes of a ``side x side`` patch grid, row-major: (side*side, dim);
    the first half of the channels encodes the row, the second half the column (as MAE/DiT)."""
    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega.view(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    half = dim // 2
    codes = torch.cat([one_axis(half, rows), one_axis(dim - half, cols)], dim=1)
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


class MultiModalUViT(ModelMixin, ConfigMixin):
    """Denoiser over named modalities: ``forward(latents, timesteps) -> prediction`` per modality.

    ``prediction`` says what the heads output: ``epsilon`` (the noise, as the released
    COP-GEN-Beta network) or ``v`` (``sqrt(abar) eps - sqrt(1 - abar) x0``, Salimans & Ho 2022,
    well conditioned at every noise level, which lets small models learn the high-noise end,
    where the other modalities decide the layout). The network itself is the same; the
    diffusion code (:func:`model.diffusion.predict_eps`) turns a ``v`` output into noise."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        modalities: Sequence[str] = ("DEM", "S1RTC", "S2L1C", "S2L2A"),
        img_size: int = 32,
        in_chans: int = 4,
        patch_size: int = 2,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        prediction: str = "epsilon",
    ) -> None:
        super().__init__()
        names = list(modalities)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"modalities must be distinct names, got {names!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        if depth % 2:
            raise ValueError(f"depth must be even (depth/2 in-blocks, depth/2 out-blocks), got {depth}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        m = len(names)
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embeds = nn.ModuleList(PatchEmbed(patch_size, in_chans, embed_dim) for _ in names)
        self.time_img_embeds = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed else nn.Identity() for _ in names)
        self.pos_embed = nn.Parameter(torch.zeros(1, m + m * self.num_patches, embed_dim))
        self.in_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth // 2))
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=True) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_preds = nn.ModuleList(nn.Linear(embed_dim, patch_size**2 * in_chans) for _ in names)
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """Linear layers truncated-normal (std 0.02) as U-ViT. The position embedding stays a
        learned parameter (the released layout) but starts from the same 2-D sine-cosine code
        for every modality's patches, so the same place has the same code in each modality
        from the first step (time tokens start at small random values)."""
        m, side = len(self.config.modalities), self.config.img_size // self.config.patch_size
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            if self.config.embed_dim >= 4:
                self.pos_embed[0, m:] = sincos_2d(self.config.embed_dim, side).repeat(m, 1)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modalities)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), patch vectors ordered (p1, p2, C)."""
        p, c = self.config.patch_size, self.config.in_chans
        b, n, _ = x.shape
        h = w = int(math.isqrt(n))
        return x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)

    def _block(self, blk: Block, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(blk, x, skip, use_reentrant=False)
        return blk(x, skip)

    def forward(self, latents: Mapping[str, torch.Tensor], timesteps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``latents[m]``: (B, C, H, W); ``timesteps[m]``: (B,) float in 0..1000 (0 = clean).
        Returns the predicted noise for every modality, same keys and shapes."""
        names = self.modalities
        missing = [m for m in names if m not in latents or m not in timesteps]
        if missing:
            raise ValueError(f"missing latents/timesteps for {missing}; this network models {names} "
                             "(feed a marginalised modality as noise at timestep 1000)")
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
        m = len(names)
        out = {}
        for i, name in enumerate(names):
            tokens = x[:, m + i * self.num_patches: m + (i + 1) * self.num_patches]  # (B, N, D)
            out[name] = self._unpatchify(self.decoder_preds[i](tokens))
        return out
