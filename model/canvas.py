"""Latent canvases larger than the network's input, denoised as overlapping windows.

A canvas ``(B, C, H, W)`` (e.g. a grid cell's 4x4 fragments side by side: 128 x 128 latent
pixels) is covered by square windows of the network's input size (32) whose starts are at
most ``stride`` apart, spread evenly, the first at 0 and the last flush with the far edge.
At every solver step each window is denoised on its own and the windows' noise predictions
are merged into one prediction for the canvas, a weighted per-pixel mean; the solver then
takes one step on the whole canvas.

Why the merge is on the prediction, and why it is weighted:

- MultiDiffusion (Bar-Tal et al. 2023) fuses the windows' next states by least squares,
  i.e. their per-pixel mean. A DPM-Solver++ step is linear in the model output for a given
  state and step, so averaging the predictions and stepping once is the same as stepping
  every window and averaging, and the solver's multistep history stays that of one canvas.
- A window's prediction is least reliable near its edges, where it sees the least context.
  Each window's weight therefore falls off from its centre towards its edges (a separable
  pyramid, never zero), as in Mixture of Diffusers (Jiménez 2023): the result near any
  point is mostly the prediction of the window centred there, and no window edge leaves a
  step in the merged field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts of windows of size ``window`` covering ``[0, length)``, at most ``stride`` apart,
    spread evenly, the first at 0 and the last at ``length - window``."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be positive; got window {window}, stride {stride}")
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} would leave gaps between windows")
    if length < window:
        raise ValueError(f"a canvas side of {length} is smaller than the window ({window})")
    if length == window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def window_weight(window: int) -> torch.Tensor:
    """The merge weight of one window, float32 ``(window, window)``: the outer product of a
    pyramid profile ``min(i + 1, window - i)`` (highest in the centre, 1 at the edges)."""
    i = torch.arange(window, dtype=torch.float32)
    profile = torch.minimum(i + 1, window - i)
    return profile[:, None] * profile[None, :]


@dataclass(frozen=True)
class Canvas:
    """The windows of a ``height`` x ``width`` latent canvas (see the module docstring)."""

    height: int
    width: int
    window: int
    stride: int

    @property
    def starts(self) -> list[tuple[int, int]]:
        """``(row, col)`` of every window's upper-left latent pixel, row-major."""
        return [(r, c) for r in window_starts(self.height, self.window, self.stride)
                for c in window_starts(self.width, self.window, self.stride)]

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Canvases ``(B, C, H, W)`` -> windows ``(B * n_windows, C, window, window)``, the
        windows of canvas b in rows ``b * n_windows ...`` (row-major order of :attr:`starts`)."""
        self._check(x)
        w = self.window
        return torch.stack([x[:, :, r:r + w, c:c + w] for r, c in self.starts], dim=1).flatten(0, 1)

    def merge(self, windows: torch.Tensor) -> torch.Tensor:
        """Windows ``(B * n_windows, C, window, window)`` (as :meth:`crop` lays them out) ->
        canvases ``(B, C, H, W)``: the weighted per-pixel mean of the windows covering each pixel."""
        n, w = self.n_windows, self.window
        if windows.shape[0] % n or tuple(windows.shape[-2:]) != (w, w):
            raise ValueError(f"expected (B * {n}, C, {w}, {w}) windows; got {tuple(windows.shape)}")
        per_canvas = windows.reshape(windows.shape[0] // n, n, *windows.shape[1:])
        weight = window_weight(w).to(windows.device, windows.dtype)
        total = windows.new_zeros((per_canvas.shape[0], windows.shape[1], self.height, self.width))
        norm = windows.new_zeros((self.height, self.width))
        for j, (r, c) in enumerate(self.starts):
            total[:, :, r:r + w, c:c + w] += per_canvas[:, j] * weight
            norm[r:r + w, c:c + w] += weight
        return total / norm

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"expected canvases (B, C, {self.height}, {self.width}); got {tuple(x.shape)}")
