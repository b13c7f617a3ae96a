"""Feature extractors for the generative metrics.

- ``inception``: Inception-v3 pool3 features (2048-d) in the layout and with the quirks of
  the TF 2015-12-05 graph that the standard FID uses (the ``pt_inception-2015-12-05``
  weights of pytorch-fid: average pools that ignore padding, a max pool in the last block).
  Images are resized to 299x299 with TensorFlow 1's bilinear rule (no half-pixel offset, as
  torch-fidelity does for the paper's FID: :func:`resize_bilinear_tf1`) and scaled as
  ``(255 x - 128) / 128``.
- ``dinov2``: DINOv2 (ViT-S/14 for the paper's precision/recall) through ``transformers``:
  the layer-normed CLS token, images resized to 224x224 (bicubic) and normalised with the
  ImageNet mean and standard deviation.

:func:`load_extractor` takes a local file or folder, or for real users the published
weights (the FID Inception file from its release URL, DINOv2 from the hub). Extraction runs
in batches on the GPU when there is one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_DEFAULT = "pt_inception-2015-12-05"
DINOV2_DEFAULT = "facebook/dinov2-small"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, H, W)`` as TensorFlow 1's ``resize_bilinear`` with
    ``align_corners=False``: output pixel ``i`` samples the input at ``i * in / out`` (no
    half-pixel centres; the last input row/column is repeated past the edge). This is the
    resize torch-fidelity applies before the FID Inception; it differs from
    ``F.interpolate(..., align_corners=False)``, which samples at ``(i + 0.5) * in / out - 0.5``."""
    x = images
    for dim, out in ((2, size[0]), (3, size[1])):
        n = x.shape[dim]
        src = torch.arange(out, dtype=torch.float64) * (n / out)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (src - lo.double()).to(x.dtype).to(x.device)
        shape = [1, 1, 1, 1]
        shape[dim] = out
        a, b = x.index_select(dim, lo.to(x.device)), x.index_select(dim, hi.to(x.device))
        x = a + (b - a) * w.view(shape)
    return x

class _Conv(nn.Module):
    """Convolution (no bias) + batch norm (eps 1e-3) + ReLU; state-dict keys ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # 35x35 blocks: Mixed_5b/c/d
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_no_pad(x)),
        ], 1)


class _ReduceB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _MixedC(nn.Module):  # 17x17 blocks with factorised 7x7: Mixed_6b..e
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, **row)
        self.branch7x7_3 = _Conv(c7, 192, **col)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, **col)
        self.branch7x7dbl_3 = _Conv(c7, c7, **row)
        self.branch7x7dbl_4 = _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))], 1)


class _ReduceD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):  # 8x8 blocks: Mixed_7b (average pool), Mixed_7c (max pool in the FID graph)
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the standard FID: ``(B, 3, H, W)`` float in [0, 1] ->
    pool3 features ``(B, 2048)``. State-dict keys follow torchvision's ``Inception3``
    (``Conv2d_1a_3x3.conv.weight``, ..., ``Mixed_7c.branch_pool.bn.running_var``,
    ``fc.weight`` with 1008 classes), so the ``pt_inception-2015-12-05`` file loads as is."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _ReduceB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.Mixed_7a = _ReduceD(768)
        self.Mixed_7b, self.Mixed_7c = _MixedE(1280, max_pool=False), _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the classifier of the TF graph; unused for features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_bilinear_tf1(images * 255, (299, 299))
        x = (x - 128) / 128  # torch-fidelity's scaling of 0..255 pixels
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def load_inception(source: str | os.PathLike = INCEPTION_DEFAULT) -> FIDInceptionV3:
    """The FID Inception from a state-dict file (``.pth``), or ``pt_inception-2015-12-05``
    for the published file (downloaded once into torch's hub cache)."""
    net = FIDInceptionV3()
    if str(source) == INCEPTION_DEFAULT:
        state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True, map_location="cpu")
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no Inception state-dict file here (or use {INCEPTION_DEFAULT!r})")
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: not an FID Inception-v3 state dict (missing {missing[:4]}, unexpected {unexpected[:4]})")
    net.load_state_dict(state, strict=False)
    return net.eval()


class DinoV2Features(nn.Module):
    """A ``transformers`` DINOv2 model: ``(B, 3, H, W)`` in [0, 1] -> the layer-normed CLS
    token ``(B, hidden)`` (384 for ViT-S/14)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
        return self.model(pixel_values=(x - self.mean) / self.std).pooler_output


def load_dinov2(source: str | os.PathLike = DINOV2_DEFAULT) -> DinoV2Features:
    """DINOv2 from a hub id (``facebook/dinov2-small`` = ViT-S/14) or a ``save_pretrained`` folder."""
    from transformers import Dinov2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return DinoV2Features(Dinov2Model.from_pretrained(str(source))).eval()


@dataclass
class FeatureExtractor:
    """A feature network with its name, source and a fingerprint of its weights."""

    kind: str  # "inception" | "dinov2"
    net: nn.Module
    source: str
    device: torch.device
    fingerprint: str

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 images ``(N, H, W, 3)`` (or ``(N, H, W)``, repeated to RGB) -> float32 ``(N, D)``."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3); got shape {images.shape}")
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            out.append(self.net(x).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _fingerprint(kind: str, net: nn.Module) -> str:
    h = hashlib.sha256(kind.encode())
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())  # every weight: caches must not collide
        h.update(str(tuple(tensor.shape)).encode())
    return h.hexdigest()[:16]


LOADERS: dict[str, Callable[[str], nn.Module]] = {"inception": load_inception, "dinov2": load_dinov2}


def load_extractor(kind: str, source: str | os.PathLike, device: str | torch.device | None = None) -> FeatureExtractor:
    """A :class:`FeatureExtractor` of ``kind`` ('inception' | 'dinov2') from ``source``."""
    if kind not in LOADERS:
        raise ValueError(f"unknown feature extractor {kind!r}; valid: {', '.join(LOADERS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = LOADERS[kind](str(source))
    return FeatureExtractor(kind, net.to(dev), str(source), dev, _fingerprint(kind, net))


def save_random_extractors(folder: str | os.PathLike, seed: int = 0, dinov2_layers: int = 2) -> dict[str, Path]:
    """Randomly initialised extractors saved locally, for offline tests and the demo:
    ``inception.pth`` (the full FID architecture) and ``dinov2/`` (a small DINOv2 with
    patch 14). Their features are not ImageNet features: numbers computed with them rank
    models only roughly and are not comparable with published ones."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    inception = FIDInceptionV3()
    for module in inception.modules():  # He init keeps activations at unit scale through the 94 layers
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(inception.state_dict(), folder / "inception.pth")
    config = Dinov2Config(hidden_size=64, num_hidden_layers=dinov2_layers, num_attention_heads=4,
                          intermediate_size=128, patch_size=14, image_size=224)
    Dinov2Model(config).save_pretrained(folder / "dinov2")
    return {"inception": folder / "inception.pth", "dinov2": folder / "dinov2"}
