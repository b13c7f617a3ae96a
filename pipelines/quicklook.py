"""Quick-look PNGs a person can read: a cell's fragments laid out as the cell, labelled panels.

A panel is one modality over the cell's 1024 px centre crop (its 4 x 4 fragments in place,
``index = row * 4 + col``; a centre-crop fragment fills the panel alone), shrunk to
``PANEL_PX``. Rows of panels: the conditions, then per generated modality the real one
(where the store has it), each sample, and with several samples their mean and per-pixel
standard deviation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from majortom_gen.fragments import FRAGMENT_PX, GRID_SIDE

PANEL_PX = 320
LABEL_PX = 18
GREY = 128
STD_GAIN = 4.0  # the std panel shows 4 x the per-pixel std (8-bit units), clipped


def cell_canvas(tiles: Mapping[int, np.ndarray]) -> np.ndarray:
    """uint8 ``(1024, 1024, 3)`` from ``{fragment_index: (256, 256, 3)}``; missing fragments
    grey. A centre crop (index -1) is returned alone, ``(256, 256, 3)``."""
    if -1 in tiles:
        return tiles[-1]
    side = GRID_SIDE * FRAGMENT_PX
    canvas = np.full((side, side, 3), GREY, np.uint8)
    for index, tile in tiles.items():
        r, c = divmod(index, GRID_SIDE)
        canvas[r * FRAGMENT_PX:(r + 1) * FRAGMENT_PX, c * FRAGMENT_PX:(c + 1) * FRAGMENT_PX] = tile
    return canvas


def std_panel(samples: np.ndarray) -> np.ndarray:
    """Per-pixel standard deviation over samples ``(n, H, W, 3)`` (mean over bands), shown
    with the magma colour map at ``STD_GAIN`` x."""
    from matplotlib import colormaps

    std = samples.astype(np.float32).std(axis=0).mean(axis=-1) * STD_GAIN / 255.0
    return (colormaps["magma"](np.clip(std, 0, 1))[..., :3] * 255).astype(np.uint8)


def _panel(image: np.ndarray, label: str) -> Image.Image:
    tile = Image.fromarray(image).resize((PANEL_PX, PANEL_PX), Image.Resampling.BILINEAR)
    panel = Image.new("RGB", (PANEL_PX, PANEL_PX + LABEL_PX), "white")
    panel.paste(tile, (0, LABEL_PX))
    ImageDraw.Draw(panel).text((4, 3), label, fill="black")
    return panel


def write_quicklook(path: Path, title: str, rows: Sequence[Sequence[tuple[str, np.ndarray]]]) -> Path:
    """One PNG: a title line, then rows of labelled panels ``(label, uint8 image)``."""
    rows = [r for r in rows if r]
    width = max(len(r) for r in rows) * PANEL_PX
    height = LABEL_PX + len(rows) * (PANEL_PX + LABEL_PX)
    sheet = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(sheet).text((4, 3), title, fill="black")
    for i, row in enumerate(rows):
        for j, (label, image) in enumerate(row):
            sheet.paste(_panel(image, label), (j * PANEL_PX, LABEL_PX + i * (PANEL_PX + LABEL_PX)))
    sheet.save(path)
    return path


def cell_rows(frags: Sequence[int], condition: Mapping[str, np.ndarray], generated: Mapping[str, np.ndarray],
              real: Mapping[str, tuple[np.ndarray, np.ndarray]], n_samples: int) -> list[list[tuple[str, np.ndarray]]]:
    """The panels of one cell. ``frags``: its fragment indices (k of them); ``condition[m]``:
    ``(k, 256, 256, 3)``; ``generated[m]``: ``(k * n_samples, 256, 256, 3)`` (samples of a
    fragment consecutive); ``real[m]`` = (valid mask (k,), images (k, 256, 256, 3))."""
    def canvas(images: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        return cell_canvas({f: images[i] for i, f in enumerate(frags) if valid is None or valid[i]})

    rows = [[(f"{m} (condition)", canvas(images)) for m, images in condition.items()]]
    for m, images in generated.items():
        per = images.reshape(len(frags), n_samples, *images.shape[1:])
        row = []
        if m in real:
            valid, real_images = real[m]
            row.append((f"{m} real", canvas(real_images, valid)))
        samples = [canvas(per[:, s]) for s in range(n_samples)]
        row += [(f"{m} sample {s + 1}", samples[s]) for s in range(n_samples)]
        if n_samples > 1:
            stack = np.stack(samples)
            row.append((f"{m} mean", stack.astype(np.float32).mean(axis=0).round().astype(np.uint8)))
            row.append((f"{m} std x{STD_GAIN:g}", std_panel(stack)))
        rows.append(row)
    return rows
