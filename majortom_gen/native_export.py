"""Native-family rasters in the units an analyst uses, as COGs that drop in beside Core products.

- S2 band groups: uint16 DN in the Core encoding (reflectance x 10000, nodata 0) with GDAL
  scale 1e-4 and offset 0 per band, so QGIS shows reflectance; or, with ``reflectance=True``,
  float32 reflectance (nodata NaN). The offset is 0 because the model's encoding (COP-GEN's,
  ``DN / 10000``) has none: the values are comparable to Core DN as stored.
- S1: float32 linear power (gamma0, nodata NaN), bands named VV and VH; ``db=True`` writes
  ``10 log10`` instead, unit dB.
- DEM: float32 metres (nodata NaN).
- Cloud mask and land cover: uint8 class values with a colour table (paletted in QGIS).

Every file has band descriptions (the Core band names), units, the group name and encoding
as tags, and the CRS and transform of the product's band grid at the group's resolution.

:func:`assemble_patches` puts a group's 6 x 6 patches back on the product's band grid: the
overlap of the last row and column is averaged (classes: the later patch wins), so a
product generated patch by patch reads as one raster.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from affine import Affine

from majortom_gen.native import BandGroup, NativePatch, get_band_group, raster_px
from majortom_gen.rasters import GeoRaster, write_cog

# Colour tables (RGBA) of the class groups, by class value.
LULC_COLOURS = {0: (0, 0, 0, 0), 1: (65, 155, 223, 255), 2: (57, 125, 73, 255), 4: (122, 135, 198, 255),
                5: (228, 150, 53, 255), 7: (196, 40, 27, 255), 8: (165, 155, 143, 255), 9: (168, 235, 255, 255),
                10: (97, 97, 97, 255), 11: (227, 226, 195, 255)}
CLOUD_COLOURS = {0: (0, 0, 0, 0), 1: (255, 255, 255, 255), 2: (190, 190, 190, 255), 3: (60, 60, 60, 255)}


def _group(group: BandGroup | str) -> BandGroup:
    return get_band_group(group) if isinstance(group, str) else group


def physical_raster(group: BandGroup | str, values, transform: Affine, crs: str, *, reflectance: bool = False,
                    db: bool = False) -> tuple[GeoRaster, dict]:
    """The raster of physical ``values`` ``(bands, H, W)`` (the output of
    :func:`majortom_gen.native.from_model`, or a band stack read from Core) and the
    :func:`majortom_gen.rasters.write_cog` options that describe it (scales, offsets,
    units, colour table, tags)."""
    g = _group(group)
    if g.is_scalar:
        raise ValueError(f"{g.name} is a scalar modality: it has no raster")
    v = np.asarray(values)
    if v.ndim != 3 or v.shape[0] != len(g.bands):
        raise ValueError(f"{g.name}: expected ({len(g.bands)}, H, W) values ({', '.join(g.bands)}), got {v.shape}")
    names = tuple(b.upper() if g.encoding == "log_db" else b for b in g.bands)
    tags = {"modality": g.name, "source": g.source or "", "encoding": g.encoding}
    options: dict = {}
    if g.encoding == "reflectance":
        if reflectance:
            data, nodata, units = (v.astype(np.float32) / 10000.0), float("nan"), "reflectance"
        else:
            data, nodata, units = np.clip(np.rint(v), 0, 65535).astype(np.uint16), 0.0, "reflectance"
            options.update(scales=[1e-4] * len(names), offsets=[0.0] * len(names))
    elif g.encoding == "log_db":
        power = v.astype(np.float32)
        if db:
            data, units = (10.0 * np.log10(np.maximum(power, np.float32(g.min_positive)))).astype(np.float32), "dB"
        else:
            data, units = power, "linear power (gamma0)"
        nodata = float("nan")
    elif g.encoding == "log1p":
        data, nodata, units = v.astype(np.float32), float("nan"), "m"
    elif g.encoding == "one_hot":
        data, nodata, units = v.astype(np.uint8), None, "class"
        options["colormap"] = LULC_COLOURS if g.source == "LULC" else CLOUD_COLOURS
        tags["classes"] = ",".join(str(c) for c in g.classes)
    else:
        raise ValueError(f"{g.name}: no physical raster for encoding {g.encoding!r}")
    options["units"] = [units] * len(names)
    options["tags"] = {**tags, "units": units}
    return GeoRaster(data, crs, transform, descriptions=names, nodata=nodata), options


def write_physical(path: str | os.PathLike, group: BandGroup | str, values, transform: Affine, crs: str, *,
                   reflectance: bool = False, db: bool = False, tags: dict | None = None) -> Path:
    """Write physical ``values`` of ``group`` as a COG at ``path`` (see the module docstring)."""
    raster, options = physical_raster(group, values, transform, crs, reflectance=reflectance, db=db)
    options["tags"] = {**options["tags"], **(tags or {})}
    return write_cog(path, raster, **options)


def assemble_patches(group: BandGroup | str, patches: Sequence[tuple[NativePatch, np.ndarray]]) -> tuple[np.ndarray, Affine]:
    """The product's band grid ``(bands, S, S)`` from its patches (``(bands, p, p)`` each, any
    subset: pixels no patch covers are NaN, or 0 for classes) and its transform. Overlaps
    are averaged; class patches overwrite in the order given."""
    g = _group(group)
    if not patches:
        raise ValueError(f"{g.name}: no patches to assemble")
    side = raster_px(g)
    classes = g.encoding == "one_hot"
    total = np.zeros((len(g.bands), side, side), np.uint8 if classes else np.float64)
    count = np.zeros((side, side), np.int32)
    first = patches[0][0]
    for p, values in patches:
        if p.group != g.name or values.shape != (len(g.bands), p.size_px, p.size_px):
            raise ValueError(f"{g.name}: patch {p.index} of {p.group} with values {values.shape} does not belong here")
        window = (slice(None), slice(p.row_off, p.row_off + p.size_px), slice(p.col_off, p.col_off + p.size_px))
        if classes:
            total[window] = values
        else:
            total[window] += values
        count[window[1:]] += 1
    transform = first.transform @ Affine.translation(-first.col_off, -first.row_off)
    if classes:
        return total, transform
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (total / count).astype(np.float32)
    return out, transform
