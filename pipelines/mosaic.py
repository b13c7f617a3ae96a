"""Mosaics of exported fragments: a VRT per UTM zone (the fragments untouched) and a single
COG reprojected to a chosen CRS, optionally clipped to a region, with overlapping products
cross-faded (or fragments averaged), not overwritten. Also per-pixel mean and standard deviation
across samples (an uncertainty map).

Everything works from in-memory :class:`~majortom_gen.rasters.GeoRaster` s (the fragments
export has just written, the mosaics made here); only the VRTs need the fragments' file
paths, given as (path, raster) pairs. Every COG is written by
:func:`majortom_gen.rasters.write_cog`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.features import geometry_mask
from rasterio.warp import Resampling, calculate_default_transform, reproject, transform_bounds
from shapely.geometry.base import BaseGeometry

from majortom_gen.errors import MajorTomGenError
from majortom_gen.rasters import GeoRaster, write_cog
from majortom_gen.staging import write_text_atomic

_VRT_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32", "float64": "Float64"}


def vrts_per_zone(fragments: Sequence[tuple[Path, GeoRaster]], out_dir: Path, stem: str) -> list[Path]:
    """One GDAL VRT per CRS (UTM zone) listing the fragment files (``path``, whose pixels and
    georeferencing are ``raster``) as simple sources, with paths relative to the VRT:
    ``out_dir/<stem>_<EPSGnnnnn>.vrt``. All fragments share band count, dtype and resolution."""
    by_crs: dict[str, list[tuple[Path, GeoRaster]]] = defaultdict(list)
    for path, raster in fragments:
        by_crs[raster.crs].append((Path(path), raster))
    out = []
    for crs, items in sorted(by_crs.items()):
        path = out_dir / f"{stem}_{crs.replace(':', '')}.vrt"
        write_text_atomic(path, _vrt_xml(crs, items, out_dir))
        out.append(path)
    return out


def _vrt_xml(crs: str, items: Sequence[tuple[Path, GeoRaster]], out_dir: Path) -> str:
    """The VRT of fragments in one CRS: the union of their extents at the first one's resolution."""
    first = items[0][1]
    res = first.transform.a
    bounds = np.asarray([r.bounds for _, r in items])  # (west, south, east, north) per fragment
    (west, south), (east, north) = bounds[:, :2].min(axis=0).tolist(), bounds[:, 2:].max(axis=0).tolist()
    width, height = int(round((east - west) / res)), int(round((north - south) / res))
    wkt = rasterio.crs.CRS.from_string(crs).to_wkt()
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
             f"  <SRS>{escape(wkt)}</SRS>",
             f"  <GeoTransform>{west!r}, {res!r}, 0.0, {north!r}, 0.0, {-res!r}</GeoTransform>"]
    for b in range(1, first.count + 1):
        lines.append(f'  <VRTRasterBand dataType="{_VRT_TYPES[first.data.dtype.name]}" band="{b}">')
        if first.descriptions and first.descriptions[b - 1]:
            lines.append(f"    <Description>{escape(first.descriptions[b - 1])}</Description>")
        for path, r in items:
            # paths relative to the VRT, so the output folder can be moved or copied whole
            rel = Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()
            xoff, yoff = (r.transform.c - west) / res, (north - r.transform.f) / res
            lines += ["    <SimpleSource>",
                      f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                      f"      <SourceBand>{b}</SourceBand>",
                      f'      <SrcRect xOff="0" yOff="0" xSize="{r.width}" ySize="{r.height}"/>',
                      f'      <DstRect xOff="{xoff:.6f}" yOff="{yoff:.6f}" xSize="{r.width}" ySize="{r.height}"/>',
                      "    </SimpleSource>"]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"


def _target_grid(rasters: Sequence[GeoRaster], dst_crs: str, region: BaseGeometry | None) -> tuple[Affine, int, int]:
    """Transform, width and height of the output grid: covers the fragments (clipped to the
    region's bounds; ``region`` in EPSG:4326), at the native 10 m resolution of the fragment
    first in (CRS, west, north) order, expressed in ``dst_crs``: the grid does not depend on
    the order of the fragments."""
    b = np.asarray([transform_bounds(r.crs, dst_crs, *r.bounds, densify_pts=21) for r in rasters])
    first = min(rasters, key=lambda r: (r.crs, r.transform.c, -r.transform.f))  # whatever order they come in
    tr, _, _ = calculate_default_transform(first.crs, dst_crs, first.width, first.height, *first.bounds)
    res = abs(tr.a)
    west, south, east, north = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    if region is not None:
        rw, rs, re_, rn = transform_bounds("EPSG:4326", dst_crs, *region.bounds, densify_pts=21)
        west, south, east, north = max(west, rw), max(south, rs), min(east, re_), min(north, rn)
        if west >= east or south >= north:
            raise MajorTomGenError("the region does not overlap the exported fragments")
    width, height = int(np.ceil((east - west) / res)), int(np.ceil((north - south) / res))
    return Affine(res, 0, west, 0, -res, north), width, height


def _window(raster: GeoRaster, dst_crs: str, transform: Affine, width: int, height: int) -> tuple[int, int, int, int] | None:
    """``(row0, row1, col0, col1)`` of the part of the output grid ``raster`` covers (plus a
    pixel on each side), or None when it lies outside the grid."""
    inverse = ~transform
    west, south, east, north = transform_bounds(raster.crs, dst_crs, *raster.bounds, densify_pts=21)
    c0, r0 = inverse @ (west, north)
    c1, r1 = inverse @ (east, south)
    c0, r0 = max(int(np.floor(c0)) - 1, 0), max(int(np.floor(r0)) - 1, 0)
    c1, r1 = min(int(np.ceil(c1)) + 1, width), min(int(np.ceil(r1)) + 1, height)
    return None if c0 >= c1 or r0 >= r1 else (r0, r1, c0, c1)


FEATHER_PX = 32  # a product's weight in a mosaic rises from its edge to 1 over this many pixels


def feather_weights(rasters: Sequence[GeoRaster], groups: Sequence[str]) -> list[np.ndarray]:
    """Per raster, float32 ``(H, W)`` weights that rise linearly from the edge of its group's
    extent (the union of the bounds of the rasters with the same group, e.g. a cell's
    fragments: one product) to 1 at :data:`FEATHER_PX` pixels inside, so that where products
    overlap the mosaic cross-fades from one to the other instead of averaging two pictures
    with a step at each edge of the overlap."""
    extents: dict[str, np.ndarray] = {}
    for raster, group in zip(rasters, groups, strict=True):
        b = np.asarray(raster.bounds, np.float64)
        e = extents.get(group)
        extents[group] = b if e is None else np.concatenate([np.minimum(e[:2], b[:2]), np.maximum(e[2:], b[2:])])
    out = []
    for raster, group in zip(rasters, groups):
        west, south, east, north = extents[group]
        t = raster.transform
        xs = t.c + (np.arange(raster.width) + 0.5) * t.a
        ys = t.f + (np.arange(raster.height) + 0.5) * t.e
        dx = np.minimum(xs - west, east - xs) / abs(t.a)
        dy = np.minimum(ys - south, north - ys) / abs(t.e)
        out.append(np.clip(np.minimum(dy[:, None], dx[None, :]) / FEATHER_PX, 0.5 / FEATHER_PX, 1.0).astype(np.float32))
    return out


def blend(rasters: Sequence[GeoRaster], dst_crs: str, transform: Affine, width: int, height: int,
          groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reproject every fragment onto the grid (``transform`` in ``dst_crs``, ``height`` x
    ``width`` pixels; bilinear) and merge overlaps: a per-pixel mean, or with ``groups`` (the
    product of each raster) a mean weighted by :func:`feather_weights`. Returns the ``(bands,
    H, W)`` float32 result (0 where nothing contributes) and the ``(H, W)`` sum of weights
    (the count of contributing fragments without ``groups``)."""
    count = rasters[0].count
    feathers = feather_weights(rasters, groups) if groups is not None else [None] * len(rasters)
    total = np.zeros((count, height, width), np.float64)
    weight = np.zeros((height, width), np.float64)
    for raster, feather in zip(rasters, feathers):
        # reproject into the fragment's own window of the grid, not the whole grid: the cost
        # grows with the number of fragments, not fragments x mosaic size
        window = _window(raster, dst_crs, transform, width, height)
        if window is None:
            continue  # outside the (clipped) grid
        r0, r1, c0, c1 = window
        src = raster.data.astype(np.float32)
        if feather is not None:  # the weight travels as one more band
            src = np.concatenate([src * feather, feather[None]])
        dst = np.full((len(src), r1 - r0, c1 - c0), np.nan, np.float32)
        reproject(src, dst, src_transform=raster.transform, src_crs=raster.crs,
                  dst_transform=transform @ Affine.translation(c0, r0), dst_crs=dst_crs,
                  resampling=Resampling.bilinear, src_nodata=None, dst_nodata=np.nan)
        valid = ~np.isnan(dst).any(axis=0)
        w = dst[-1] if feather is not None else np.ones(dst.shape[1:], np.float32)
        sub_total, sub_weight = total[:, r0:r1, c0:c1], weight[r0:r1, c0:c1]
        sub_total[:, valid] += dst[:count, valid] * (1.0 if feather is not None else w[valid])
        sub_weight[valid] += w[valid]
    mean = np.where(weight > 0, total / np.where(weight > 0, weight, 1), 0).astype(np.float32)
    return mean, weight


def _region_mask(region: BaseGeometry, dst_crs: str, transform: Affine, width: int, height: int) -> np.ndarray:
    """``(H, W)`` bool: the grid's pixels inside ``region`` (EPSG:4326)."""
    to_dst = Transformer.from_crs("EPSG:4326", dst_crs, always_xy=True)
    projected = shapely.transform(region, lambda xy: np.column_stack(to_dst.transform(xy[:, 0], xy[:, 1])))
    return geometry_mask([projected], out_shape=(height, width), transform=transform, invert=True)


def blended_grid(rasters: Sequence[GeoRaster], dst_crs: str, region: BaseGeometry | None,
                 groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, Affine]:
    """``rasters`` blended (:func:`blend`) on the grid that covers them in ``dst_crs``, clipped
    to ``region`` (EPSG:4326): ``(mean (bands, H, W) float32, keep (H, W) bool, transform)``,
    ``keep`` marking the pixels some raster covers inside the region."""
    transform, width, height = _target_grid(rasters, dst_crs, region)
    mean, weight = blend(rasters, dst_crs, transform, width, height, groups)
    keep = weight > 0
    if region is not None:
        keep &= _region_mask(region, dst_crs, transform, width, height)
    return mean, keep, transform


def write_mosaic(rasters: Sequence[GeoRaster], out: Path, *, dst_crs: str = "EPSG:4326",
                 region: BaseGeometry | None = None, tags: dict | None = None,
                 groups: Sequence[str] | None = None) -> GeoRaster:
    """A blended mosaic COG at ``out`` of uint8 fragment rasters (one modality, one sample),
    reprojected to ``dst_crs`` and clipped to ``region`` (EPSG:4326); with ``groups`` (the
    product, e.g. grid cell, of each raster) overlapping products are cross-faded
    (:func:`feather_weights`), else averaged. Pixels no fragment
    covers, or outside the region, are nodata (0); covered pixels are at least 1. The band
    descriptions are the first fragment's; tags are FRAGMENTS, BLEND and ``tags``. Returns the
    mosaic raster (``(bands, H, W)`` uint8 in ``dst_crs``)."""
    if not rasters:
        raise MajorTomGenError("no GeoTIFFs to mosaic")
    mean, keep, transform = blended_grid(rasters, dst_crs, region, groups)
    data = np.where(keep[None], np.clip(np.rint(mean), 1, 255), 0).astype(np.uint8)
    mosaic = GeoRaster(data, dst_crs, transform, rasters[0].descriptions, nodata=0)
    how = ("overlapping products cross-faded over their outer {} px".format(FEATHER_PX) if groups is not None
           else "per-pixel mean of overlapping fragments")
    write_cog(out, mosaic, {"FRAGMENTS": len(rasters), "BLEND": how, **(tags or {})})
    return mosaic


def write_uncertainty(mosaics: Sequence[GeoRaster], out_mean: Path, out_std: Path) -> tuple[Path, Path]:
    """Per-pixel mean and standard deviation (float32, 8-bit visualisation units) across sample
    mosaics (uint8, nodata 0) on one grid, as COGs; NaN where any sample is nodata."""
    first = mosaics[0]
    if not all(first.same_grid(m) and m.count == first.count for m in mosaics):
        raise MajorTomGenError("the sample mosaics are not on one grid; cannot compute per-pixel mean and std")
    arr = np.stack([m.data.astype(np.float32) for m in mosaics])
    valid = (arr > 0).all(axis=(0, 1))
    for path, data, what in ((out_mean, arr.mean(0), "mean"), (out_std, arr.std(0), "standard deviation")):
        data = np.where(valid[None], data, np.nan).astype(np.float32)
        write_cog(path, GeoRaster(data, first.crs, first.transform, first.descriptions, nodata=np.nan),
                  {"CONTENT": f"per-pixel {what} over {len(mosaics)} generated samples (8-bit visualisation units)"})
    return out_mean, out_std
