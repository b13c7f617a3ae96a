"""Gaps to fill: which pixels of a fragment are missing, from the product itself or from a
user's file, and what that means for the 8x smaller latent grid.

A gap mask is bool ``(256, 256)`` per fragment (True = missing, to be generated), on the
fragment's own 10 m window of the product grid (the cell's UTM CRS, the fragment's affine
transform). Sources:

- ``cloud_mask``: the S2 product's ``cloud_mask`` band (1068 px on the 10 m product grid;
  0 clear, 1 thick cloud, 2 thin cloud, 3 shadow): every non-clear pixel is a gap;
- ``nodata``: thumbnail pixels that are black in every channel (how Core thumbnails show nodata);
- a raster file (GeoTIFF, any CRS): non-zero valid pixels are gaps, read onto each
  fragment's grid by nearest-neighbour resampling;
- a vector file (GeoJSON, GeoPackage, shapefile, any CRS): pixels touched by its polygons.

:func:`latent_gaps` takes a pixel mask to the codec's latent grid: a latent pixel is a gap
when any of its 8 x 8 pixels is, grown by ``halo`` latent pixels (a convolutional encoder
mixes what lies around a gap into the latents next to it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from affine import Affine

from majortom_gen.errors import MajorTomGenError
from majortom_gen.fragments import FRAGMENT_PX, fragment_windows

CLOUD_CLASSES = (1, 2, 3)  # thick cloud, thin cloud, shadow
MASK_SOURCES = ("cloud_mask", "nodata")  # or a file
RESAMPLE_DEFAULT = 2  # RePaint jumps per noisy step for `fill` (measured in benchmarks/bench_fill.py)
STRENGTH_DEFAULT = 0.5  # share of the solver steps a gap goes through in `fill` (benchmarks/bench_fill.py)
VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".fgb", ".parquet")


def cloud_gaps(cloud_mask: np.ndarray, mode: str = "grid") -> list[np.ndarray]:
    """Per fragment of ``mode``, the gap mask of an S2 ``cloud_mask`` band on the 1068 px
    product grid (a 1069 px band is cropped): its cloud and shadow pixels."""
    band = np.asarray(cloud_mask)
    if band.ndim != 2 or min(band.shape) < 1068:
        raise MajorTomGenError(f"a cloud_mask band must be 2-D and at least 1068 px; got shape {band.shape}")
    gaps = np.isin(band[:1068, :1068], CLOUD_CLASSES)
    return [gaps[r:r + FRAGMENT_PX, c:c + FRAGMENT_PX].copy() for _, _, r, c in fragment_windows(mode)]


def nodata_gaps(pixels: np.ndarray) -> np.ndarray:
    """Gap masks ``(N, 256, 256)`` of thumbnail fragments uint8 ``(N, 256, 256, 3)``: pixels
    black in every channel."""
    return ~np.asarray(pixels).any(axis=-1)


def file_gaps(path: str | os.PathLike, crs: str, transforms: Sequence[Affine], size: int = FRAGMENT_PX) -> np.ndarray:
    """Gap masks ``(N, size, size)`` from a user's raster or vector file for fragments in
    ``crs`` (UTM) placed by ``transforms``: a raster's non-zero valid pixels (nearest
    neighbour onto each fragment's grid), or the pixels a vector file's polygons touch. A
    clear error names the file when it cannot be read or has no CRS."""
    path = Path(path)
    if not path.exists():
        raise MajorTomGenError(f"--mask {path}: no such file")
    if path.suffix.lower() in VECTOR_SUFFIXES:
        return _vector_gaps(path, crs, transforms, size)
    return _raster_gaps(path, crs, transforms, size)


def _vector_gaps(path: Path, crs: str, transforms: Sequence[Affine], size: int) -> np.ndarray:
    import geopandas as gpd
    from rasterio.features import rasterize

    try:
        frame = gpd.read_file(path)
    except Exception as exc:  # fiona/pyogrio raise their own types
        raise MajorTomGenError(f"--mask {path}: not a readable vector file ({exc})") from None
    if frame.crs is None:
        raise MajorTomGenError(f"--mask {path}: the file has no CRS; save it with one (e.g. EPSG:4326)")
    shapes = [g for g in frame.to_crs(crs).geometry if g is not None and not g.is_empty]
    if not shapes:
        raise MajorTomGenError(f"--mask {path}: no geometry in the file")
    return np.stack([rasterize(shapes, out_shape=(size, size), transform=t, all_touched=True, dtype="uint8") > 0
                     for t in transforms]) if transforms else np.zeros((0, size, size), bool)


def _raster_gaps(path: Path, crs: str, transforms: Sequence[Affine], size: int) -> np.ndarray:
    import rasterio
    from rasterio.errors import RasterioIOError
    from rasterio.warp import Resampling, reproject

    try:
        src = rasterio.open(path)
    except RasterioIOError as exc:
        raise MajorTomGenError(f"--mask {path}: not a readable raster or vector file ({exc})") from None
    with src:
        if src.crs is None:
            raise MajorTomGenError(f"--mask {path}: the raster has no CRS; georeference it first")
        band = src.read(1, masked=True)
        gaps = (band.filled(0) != 0).astype(np.uint8)
        out = np.zeros((len(transforms), size, size), np.uint8)
        for i, t in enumerate(transforms):
            reproject(gaps, out[i], src_transform=src.transform, src_crs=src.crs, dst_transform=t, dst_crs=crs,
                      resampling=Resampling.nearest, src_nodata=None, dst_nodata=0)
    return out > 0


def latent_gaps(gaps: np.ndarray, factor: int = 8, halo: int = 1) -> np.ndarray:
    """Pixel gap masks ``(..., H, W)`` -> latent gap masks ``(..., H / factor, W / factor)``:
    a latent pixel is a gap when any of its ``factor`` x ``factor`` pixels is, grown by
    ``halo`` latent pixels (8-connected)."""
    gaps = np.asarray(gaps, bool)
    h, w = gaps.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"a {h} x {w} mask does not divide into {factor} px latent pixels")
    blocks = gaps.reshape(*gaps.shape[:-2], h // factor, factor, w // factor, factor).any(axis=(-3, -1))
    for _ in range(halo):
        grown = blocks.copy()
        grown[..., 1:, :] |= blocks[..., :-1, :]
        grown[..., :-1, :] |= blocks[..., 1:, :]
        grown[..., :, 1:] |= grown[..., :, :-1].copy()
        grown[..., :, :-1] |= grown[..., :, 1:].copy()
        blocks = grown
    return blocks
