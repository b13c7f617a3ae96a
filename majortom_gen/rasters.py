"""In-memory georeferenced rasters and the one Cloud-Optimized GeoTIFF writer.

A :class:`GeoRaster` is pixels ``(bands, H, W)`` with the CRS and affine transform that place
them (rasterio's convention: ``Affine(res, 0, west, 0, -res, north)`` maps pixel (col, row)
to the map coordinates of the pixel's upper-left corner, in the CRS's units — metres for
UTM, degrees for EPSG:4326). Pipelines build them from what they already hold (a sample
run's georeferencing, a blended mosaic) and pass them on, so nothing written is read back.

:func:`write_cog` is how every COG of the project is written: driver COG, deflate (with the
floating-point predictor for float data), 256 x 256 tiles, band descriptions, upper-case tags,
optional RGB colour interpretation, through :func:`majortom_gen.staging.atomic_path` (the
file appears complete or not at all).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.transform import array_bounds

from majortom_gen.staging import atomic_path

COG_BLOCKSIZE = 256  # tile edge in pixels


@dataclass(frozen=True, eq=False)
class GeoRaster:
    """Pixels ``data`` ``(bands, H, W)`` placed by ``transform`` in ``crs`` (a string such as
    ``"EPSG:32633"``); ``descriptions`` holds one text per band (or is empty); ``nodata`` is
    the value marking missing pixels (``None``: every pixel is valid; ``nan`` for floats).
    Frozen, but ``data`` is not copied: do not change the array after building a raster."""

    data: np.ndarray
    crs: str
    transform: Affine
    descriptions: tuple[str, ...] = ()
    nodata: float | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"a GeoRaster holds (bands, H, W) pixels, not an array of shape {self.data.shape}")
        if not isinstance(self.transform, Affine):
            object.__setattr__(self, "transform", Affine(*tuple(self.transform)[:6]))
        object.__setattr__(self, "descriptions", tuple(self.descriptions))
        if self.descriptions and len(self.descriptions) != self.count:
            raise ValueError(f"{len(self.descriptions)} band descriptions for {self.count} bands")

    @property
    def count(self) -> int:
        """Number of bands."""
        return int(self.data.shape[0])

    @property
    def height(self) -> int:
        """Rows (pixels)."""
        return int(self.data.shape[1])

    @property
    def width(self) -> int:
        """Columns (pixels)."""
        return int(self.data.shape[2])

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(west, south, east, north)`` of the pixel edges, in the CRS's units."""
        return tuple(float(v) for v in array_bounds(self.height, self.width, self.transform))

    def same_grid(self, other: GeoRaster) -> bool:
        """Whether ``other`` has the same CRS, transform and pixel shape (bands may differ)."""
        return (self.crs == other.crs and self.transform.almost_equals(other.transform)
                and self.data.shape[1:] == other.data.shape[1:])


def cog_profile(raster: GeoRaster) -> dict:
    """The rasterio creation options of :func:`write_cog` for ``raster``."""
    profile = dict(driver="COG", width=raster.width, height=raster.height, count=raster.count,
                   dtype=raster.data.dtype.name, crs=raster.crs, transform=raster.transform, nodata=raster.nodata,
                   compress="deflate", blocksize=COG_BLOCKSIZE)
    if np.issubdtype(raster.data.dtype, np.floating):
        profile["predictor"] = 3  # floating-point predictor: much better deflate ratios for floats
    return profile


def write_cog(path: str | os.PathLike, raster: GeoRaster, tags: Mapping[str, object] | None = None, *,
              rgb: bool = False, scales: Sequence[float] | None = None, offsets: Sequence[float] | None = None,
              units: Sequence[str] | None = None,
              colormap: Mapping[int, tuple[int, int, int, int]] | None = None) -> Path:
    """Write ``raster`` as a Cloud-Optimized GeoTIFF at ``path`` (atomically: a temporary
    sibling renamed on success; parent folders are created). ``tags`` become dataset metadata
    with upper-case keys and ``str`` values; ``rgb`` marks a 3-band raster's bands as red,
    green, blue. ``scales``/``offsets``: per band, physical = stored * scale + offset (GDAL's,
    which QGIS applies); ``units``: per band unit text; ``colormap``: {value: RGBA} for a
    one-band class raster (paletted in QGIS). Returns ``path``."""
    path = Path(path)
    if rgb and raster.count != 3:
        raise ValueError(f"RGB colour interpretation needs 3 bands, not {raster.count}")
    for what, values in (("scales", scales), ("offsets", offsets), ("units", units)):
        if values is not None and len(values) != raster.count:
            raise ValueError(f"{len(values)} {what} for {raster.count} bands")
    if colormap is not None and (raster.count != 1 or raster.data.dtype != np.uint8):
        raise ValueError("a colour table needs a one-band uint8 raster")
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **cog_profile(raster)) as ds:
            ds.write(raster.data)
            _describe(ds, raster.descriptions)
            ds.update_tags(**{str(k).upper(): str(v) for k, v in (tags or {}).items()})
            if rgb:
                ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
            if scales is not None:
                ds.scales = tuple(float(v) for v in scales)
            if offsets is not None:
                ds.offsets = tuple(float(v) for v in offsets)
            if units is not None:
                ds.units = tuple(units)
            if colormap is not None:
                ds.write_colormap(1, dict(colormap))
    return path


def _describe(ds, descriptions: Sequence[str]) -> None:
    for i, text in enumerate(descriptions, start=1):
        if text:
            ds.set_band_description(i, text)
