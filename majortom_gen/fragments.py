"""COP-GEN-Beta's preprocessing of Core thumbnails into georeferenced fragments.

A thumbnail is brought to the 1068 px, 10 m product grid (DEM: bilinear 356 -> 1068;
S1 rasters of 1069 px are cropped), centre-cropped to 1024 px (22 px margin) and cut into
a 4x4 grid of 256 px fragments, ``index = row*4 + col`` (or one centre 256 crop).
Every fragment keeps its pixel window in the 1068 grid, its affine transform and CRS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from affine import Affine
from PIL import Image

from majortom_gen.modalities import THUMBNAIL_PX

CROP_PX = 1024
MARGIN_PX = (THUMBNAIL_PX - CROP_PX) // 2  # 22
FRAGMENT_PX = 256
GRID_SIDE = CROP_PX // FRAGMENT_PX  # 4
FRAGMENT_MODES = ("grid", "centre")


@dataclass(frozen=True)
class Fragment:
    """A 256x256 piece of a product thumbnail on the 10 m product grid.

    ``pixels``: uint8 (256, 256, 3). ``row_off``/``col_off``: offsets of its upper-left pixel
    in the 1068 px grid. ``transform``: affine of the fragment (10 m pixels, CRS units).
    ``fragment_row``/``fragment_col``: position in the 4x4 grid (-1 for the centre crop)."""

    fragment_row: int
    fragment_col: int
    row_off: int
    col_off: int
    pixels: np.ndarray
    transform: Affine
    crs: str

    @property
    def size(self) -> int:
        return self.pixels.shape[0]

    @property
    def index(self) -> int:
        return self.fragment_row * GRID_SIDE + self.fragment_col if self.fragment_row >= 0 else -1


def to_product_grid(thumb: np.ndarray) -> np.ndarray:
    """Bring a decoded thumbnail to uint8 (1068, 1068, 3) (a view where possible).

    Greyscale (H, W) is replicated to 3 channels; a 356 px DEM thumbnail is resized with
    bilinear interpolation; rasters one pixel too large (1069) are cropped to 1068."""
    grid = _product_grid_2d_or_rgb(thumb)
    return np.repeat(grid[..., None], 3, axis=-1) if grid.ndim == 2 else grid


def _product_grid_2d_or_rgb(thumb: np.ndarray) -> np.ndarray:
    """Like :func:`to_product_grid` but keeps greyscale 2-D (replicated later, per fragment)."""
    if thumb.dtype != np.uint8:
        raise ValueError(f"thumbnail must be uint8, got {thumb.dtype}")
    if thumb.ndim == 2:
        if thumb.shape[0] < THUMBNAIL_PX:  # the 356 px DEM hillshade (30 m) -> 10 m grid
            thumb = np.asarray(Image.fromarray(thumb, "L").resize((THUMBNAIL_PX, THUMBNAIL_PX), Image.BILINEAR))
    elif thumb.ndim != 3 or thumb.shape[-1] != 3:
        raise ValueError(f"thumbnail must be (H, W) or (H, W, 3), got shape {thumb.shape}")
    if thumb.shape[0] < THUMBNAIL_PX or thumb.shape[1] < THUMBNAIL_PX:
        raise ValueError(f"thumbnail of shape {thumb.shape} is smaller than the {THUMBNAIL_PX} px product grid")
    return thumb[:THUMBNAIL_PX, :THUMBNAIL_PX]


def fragment_windows(mode: str = "grid") -> list[tuple[int, int, int, int]]:
    """``(fragment_row, fragment_col, row_off, col_off)`` of each fragment in the 1068 grid."""
    if mode == "grid":
        return [(r, c, MARGIN_PX + FRAGMENT_PX * r, MARGIN_PX + FRAGMENT_PX * c)
                for r in range(GRID_SIDE) for c in range(GRID_SIDE)]
    if mode == "centre":
        off = (THUMBNAIL_PX - FRAGMENT_PX) // 2
        return [(-1, -1, off, off)]
    raise ValueError(f"unknown fragment mode {mode!r}; valid modes: {', '.join(FRAGMENT_MODES)}")


def fragment_transform(product_transform: Affine, row_off: int, col_off: int) -> Affine:
    """Affine of a window starting at (row_off, col_off) of a raster with ``product_transform``."""
    return product_transform @ Affine.translation(col_off, row_off)


def cut_fragments(thumb: np.ndarray, product_transform: Affine, crs: str, mode: str = "grid") -> list[Fragment]:
    """Cut a thumbnail (any Core modality) into georeferenced fragments.

    ``product_transform`` is the 10 m transform of the 1068 px product grid (from the
    product's 10 m band GeoTIFF, or :meth:`majortom_gen.georef.ProductBox.transform`)."""
    grid = _product_grid_2d_or_rgb(thumb)
    out = []
    for fr, fc, r0, c0 in fragment_windows(mode):
        pixels = grid[r0:r0 + FRAGMENT_PX, c0:c0 + FRAGMENT_PX]  # a view of the 1068 grid
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=-1)  # greyscale (DEM) -> 3 channels
        out.append(Fragment(fr, fc, r0, c0, pixels, fragment_transform(product_transform, r0, c0), crs))
    return out


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]: ``x / 127.5 - 1``."""
    src = np.moveaxis(np.asarray(pixels), -1, -3)
    out = np.empty(src.shape, dtype=np.float32)  # one allocation, no temporaries
    np.multiply(src, np.float32(1 / 127.5), out=out, casting="unsafe")
    out -= 1.0
    return out


def from_unit_range(x: np.ndarray) -> np.ndarray:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3), rounded and clipped."""
    y = np.clip((np.asarray(x, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.moveaxis(np.rint(y).astype(np.uint8), -3, -1)
