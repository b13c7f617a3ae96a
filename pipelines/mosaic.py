"""Mosaics of exported fragments: a VRT per UTM zone (the fragments untouched) and a single
COG reprojected to a chosen CRS, optionally clipped to a region, with overlapping fragments
blended (per-pixel mean), not overwritten. Also per-pixel mean and standard deviation
across samples (an uncertainty map).
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
from pyproj import Transformer
from rasterio.features import geometry_mask
from rasterio.warp import Resampling, calculate_default_transform, reproject, transform_bounds
from shapely.geometry.base import BaseGeometry

from majortom_gen.errors import MajorTomGenError


def vrts_per_zone(tifs: Sequence[Path], out_dir: Path, stem: str) -> list[Path]:
    """One GDAL VRT per CRS (UTM zone) listing the fragments as simple sources."""
    by_crs: dict[str, list[tuple[Path, rasterio.Affine, int, int, int, list[str]]]] = defaultdict(list)
    for t in tifs:
        with rasterio.open(t) as ds:
            by_crs[ds.crs.to_string()].append((Path(t), ds.transform, ds.width, ds.height, ds.count, list(ds.descriptions)))
    out = []
    for crs, items in sorted(by_crs.items()):
        res = items[0][1].a
        west = min(tr.c for _, tr, *_ in items)
        north = max(tr.f for _, tr, *_ in items)
        east = max(tr.c + w * tr.a for _, tr, w, *_ in items)
        south = min(tr.f + h * tr.e for _, tr, _, h, *_ in items)
        width, height = int(round((east - west) / res)), int(round((north - south) / res))
        count, descriptions = items[0][4], items[0][5]
        wkt = rasterio.crs.CRS.from_string(crs).to_wkt()
        # paths relative to the VRT, so the output folder can be moved or copied whole
        rel = {p: Path(os.path.relpath(p.resolve(), out_dir.resolve())).as_posix() for p, *_ in items}
        lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
                 f"  <SRS>{escape(wkt)}</SRS>",
                 f"  <GeoTransform>{west!r}, {res!r}, 0.0, {north!r}, 0.0, {-res!r}</GeoTransform>"]
        for b in range(1, count + 1):
            lines.append(f'  <VRTRasterBand dataType="Byte" band="{b}">')
            if descriptions[b - 1]:
                lines.append(f"    <Description>{escape(descriptions[b - 1])}</Description>")
            for path, tr, w, h, *_ in items:
                xoff, yoff = (tr.c - west) / res, (north - tr.f) / res
                lines += ["    <SimpleSource>",
                          f'      <SourceFilename relativeToVRT="1">{escape(rel[path])}</SourceFilename>',
                          f"      <SourceBand>{b}</SourceBand>",
                          f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>',
                          f'      <DstRect xOff="{xoff:.6f}" yOff="{yoff:.6f}" xSize="{w}" ySize="{h}"/>',
                          "    </SimpleSource>"]
            lines.append("  </VRTRasterBand>")
        lines.append("</VRTDataset>")
        path = out_dir / f"{stem}_{crs.replace(':', '')}.vrt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        out.append(path)
    return out


def _target_grid(tifs: Sequence[Path], dst_crs: str, region: BaseGeometry | None):
    """Transform and shape of the output grid: covers the fragments (clipped to the region's
    bounds), at the native 10 m resolution expressed in ``dst_crs``."""
    bounds = []
    res = None
    for t in tifs:
        with rasterio.open(t) as ds:
            bounds.append(transform_bounds(ds.crs, dst_crs, *ds.bounds, densify_pts=21))
            if res is None:
                tr, _, _ = calculate_default_transform(ds.crs, dst_crs, ds.width, ds.height, *ds.bounds)
                res = abs(tr.a)
    b = np.asarray(bounds)
    west, south, east, north = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    if region is not None:
        rw, rs, re_, rn = transform_bounds("EPSG:4326", dst_crs, *region.bounds, densify_pts=21)
        west, south, east, north = max(west, rw), max(south, rs), min(east, re_), min(north, rn)
        if west >= east or south >= north:
            raise MajorTomGenError("the region does not overlap the exported fragments")
    width, height = int(np.ceil((east - west) / res)), int(np.ceil((north - south) / res))
    return rasterio.Affine(res, 0, west, 0, -res, north), width, height


def blend(tifs: Sequence[Path], dst_crs: str, transform, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproject every fragment onto the grid (bilinear) and average overlaps.
    Returns (bands, H, W) float32 mean and the (H, W) count of contributing fragments."""
    with rasterio.open(tifs[0]) as ds:
        count = ds.count
    total = np.zeros((count, height, width), np.float64)
    weight = np.zeros((height, width), np.float64)
    inverse = ~transform
    for t in tifs:
        with rasterio.open(t) as ds:
            # reproject into the fragment's own window of the grid (plus a pixel), not the whole
            # grid: the cost grows with the number of fragments, not fragments x mosaic size
            west, south, east, north = transform_bounds(ds.crs, dst_crs, *ds.bounds, densify_pts=21)
            c0, r0 = inverse @ (west, north)
            c1, r1 = inverse @ (east, south)
            c0, r0 = max(int(np.floor(c0)) - 1, 0), max(int(np.floor(r0)) - 1, 0)
            c1, r1 = min(int(np.ceil(c1)) + 1, width), min(int(np.ceil(r1)) + 1, height)
            if c0 >= c1 or r0 >= r1:
                continue  # outside the (clipped) grid
            window_transform = transform @ rasterio.Affine.translation(c0, r0)
            src = ds.read().astype(np.float32)
            dst = np.full((count, r1 - r0, c1 - c0), np.nan, np.float32)
            reproject(src, dst, src_transform=ds.transform, src_crs=ds.crs, dst_transform=window_transform,
                      dst_crs=dst_crs, resampling=Resampling.bilinear, src_nodata=None, dst_nodata=np.nan)
        valid = ~np.isnan(dst[0])
        sub_total, sub_weight = total[:, r0:r1, c0:c1], weight[r0:r1, c0:c1]
        sub_total[:, valid] += dst[:, valid]
        sub_weight += valid
    mean = np.where(weight > 0, total / np.maximum(weight, 1), 0).astype(np.float32)
    return mean, weight


def write_mosaic(tifs: Sequence[Path], out: Path, *, dst_crs: str = "EPSG:4326", region: BaseGeometry | None = None,
                 tags: dict | None = None) -> Path:
    """A blended mosaic COG of fragments (one modality, one sample), reprojected to
    ``dst_crs`` and clipped to ``region`` (EPSG:4326). Pixels no fragment covers, or outside
    the region, are nodata (0)."""
    if not tifs:
        raise MajorTomGenError("no GeoTIFFs to mosaic")
    transform, width, height = _target_grid(tifs, dst_crs, region)
    mean, weight = blend(tifs, dst_crs, transform, width, height)
    keep = weight > 0
    if region is not None:
        to_dst = Transformer.from_crs("EPSG:4326", dst_crs, always_xy=True)
        projected = shapely.transform(region, lambda xy: np.column_stack(to_dst.transform(xy[:, 0], xy[:, 1])))
        keep &= geometry_mask([projected], out_shape=(height, width), transform=transform, invert=True)
    data = np.where(keep[None], np.clip(np.rint(mean), 1, 255), 0).astype(np.uint8)
    with rasterio.open(tifs[0]) as ds:
        descriptions, src_tags = ds.descriptions, ds.tags()
    _write_cog(out, data, dst_crs, transform, descriptions,
               {**{k: v for k, v in src_tags.items() if k in ("CONTENT", "MODEL", "CODEC", "CONDITION", "SEED", "STEPS")},
                "FRAGMENTS": str(len(tifs)), "BLEND": "per-pixel mean of overlapping fragments", **(tags or {})})
    return out


def write_uncertainty(mosaics: Sequence[Path], out_mean: Path, out_std: Path) -> tuple[Path, Path]:
    """Per-pixel mean and standard deviation (float32) across sample mosaics on one grid."""
    stack = []
    for p in mosaics:
        with rasterio.open(p) as ds:
            stack.append(ds.read().astype(np.float32))
            profile, descriptions = ds.profile, ds.descriptions
    arr = np.stack(stack)
    valid = (arr > 0).all(axis=(0, 1))
    for path, data, what in ((out_mean, arr.mean(0), "mean"), (out_std, arr.std(0), "standard deviation")):
        data = np.where(valid[None], data, np.nan).astype(np.float32)
        _write_cog(path, data, profile["crs"], profile["transform"], descriptions,
                   {"CONTENT": f"per-pixel {what} over {len(mosaics)} generated samples (8-bit visualisation units)"},
                   nodata=np.nan)
    return out_mean, out_std


def _write_cog(path: Path, data: np.ndarray, crs, transform, descriptions, tags: dict, nodata=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with rasterio.open(tmp, "w", driver="COG", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata, compress="deflate") as ds:
        ds.write(data)
        for i, d in enumerate(descriptions, start=1):
            if d:
                ds.set_band_description(i, d)
        ds.update_tags(**tags)
    os.replace(tmp, path)
