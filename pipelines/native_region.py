"""Fill a region with native band groups, in physical units (#14): ``generate`` on a native store.

The cells covering the region (or given) are generated patch by patch
(:func:`pipelines.native_sample.sample_native`: ``OUT/cells/<cell>/<group>_s<k>.tif`` on each
product's UTM grid), then each group and sample is mosaicked: one VRT per UTM zone over the
cell files (untouched values), and one COG reprojected to ``dst_crs`` (bilinear), where
overlapping products are cross-faded over their outer pixels
(:func:`pipelines.mosaic.blend`), clipped to the region, in the group's physical units
(``OUT/mosaic/<group>_s<k>_<CRS>.tif``; nodata outside).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from shapely.geometry.base import BaseGeometry

from majortom_gen.errors import MajorTomGenError
from majortom_gen.georef import default_grid
from majortom_gen.native import get_band_group
from majortom_gen.native_export import write_physical
from majortom_gen.rasters import GeoRaster
from majortom_gen.staging import staged_folder
from majortom_gen.store import LatentStore
from pipelines.mosaic import blended_grid, vrts_per_zone
from pipelines.native_sample import NativeSampling, sample_native


def _crs_tag(crs: str) -> str:
    return crs.replace(":", "")


def region_cells(region: BaseGeometry | None, cells: Sequence[str]) -> list[str]:
    """The given cells (the region then only clips the mosaics), else the cells covering
    ``region`` (EPSG:4326)."""
    ids = list(dict.fromkeys(cells))
    if not ids and region is not None:
        ids = list(default_grid().cells_in(region))
    if not ids:
        raise MajorTomGenError("no cells: give --region FILE|WKT|bbox or --cells IDS")
    return ids


def auto_condition(store: LatentStore, model_modalities: Sequence[str], cells: Sequence[str],
                   generate: Sequence[str]) -> list[str]:
    """What every requested cell has and the model takes (band groups not generated), and the
    model's location and date tokens."""
    have = store.cell_modalities()
    missing = [c for c in cells if c not in have]
    if missing:
        raise MajorTomGenError(f"the store has no patches of {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                               "ingest them with --family native first")
    common = set.intersection(*(set(have[c]) for c in cells))
    groups = [m for m in model_modalities if m in common and m not in generate]
    tokens = [m for m in model_modalities if get_band_group(m).is_scalar and m not in generate]
    return groups + tokens


def generate_native_region(model_dir: str | os.PathLike, store_dir: str | os.PathLike, out: str | os.PathLike, *,
                           generate: Sequence[str], region: BaseGeometry | None = None, cells: Sequence[str] = (),
                           condition: Sequence[str] | str = "auto", dst_crs: str = "EPSG:4326",
                           options: NativeSampling = NativeSampling(), overwrite: bool = False) -> dict:
    """Generate ``generate`` for the region's cells and write cell COGs, VRTs and mosaics to
    ``out`` (written whole or not at all); returns the run's record (also ``region.json``)."""
    from model.uvit import MultiModalUViT

    store = LatentStore.open(store_dir)
    wanted = region_cells(region, cells)
    classes = [m for m in generate if get_band_group(m).encoding == "one_hot"]
    if classes:
        raise MajorTomGenError(f"{classes}: class rasters are not mosaicked yet; use `sample` for them")
    names = MultiModalUViT.load_config(model_dir)["modalities"]
    cond = auto_condition(store, names, wanted, generate) if condition == "auto" else list(condition)
    with staged_folder(out, overwrite=overwrite, inputs=(store_dir, model_dir), kind="generate") as tmp:
        result = sample_native(model_dir, store_dir, wanted, cond, generate, tmp / "cells", options)
        files = {"cells": [str(p.relative_to(tmp)) for p in result.files], "vrt": [], "mosaic": []}
        for m in generate:
            g = get_band_group(m)
            if g.is_scalar:
                continue
            for s in range(options.n_samples):
                items = []
                for c in wanted:
                    values, transform, crs = result.rasters[(c, m, s)]
                    items.append((tmp / "cells" / c / f"{m}_s{s}.tif", GeoRaster(values, crs, transform)))
                files["vrt"] += [str(p.relative_to(tmp)) for p in vrts_per_zone(items, tmp / "vrt", f"{m}_s{s}")]
                path = _mosaic(g, [r for _, r in items], wanted, tmp / "mosaic" / f"{m}_s{s}_{_crs_tag(dst_crs)}.tif",
                               dst_crs, region)
                files["mosaic"].append(str(path.relative_to(tmp)))
        record = {"cells": wanted, "condition": cond, "generate": list(generate), "dst_crs": dst_crs,
                  "sampling": asdict(options), "files": files}
        (tmp / "region.json").write_text(json.dumps(record, indent=1))
    return record


def _mosaic(group, rasters: list[GeoRaster], cells: list[str], path: Path, dst_crs: str,
            region: BaseGeometry | None) -> Path:
    """One group's cells blended into ``dst_crs`` (cross-faded where products overlap), NaN
    where nothing is or outside the region, written in physical units."""
    finite = [GeoRaster(np.nan_to_num(r.data, nan=0.0), r.crs, r.transform, r.descriptions) for r in rasters]
    mean, keep, transform = blended_grid(finite, dst_crs, region, groups=cells)
    data = np.where(keep[None], mean, np.nan).astype(np.float32)
    if group.encoding == "reflectance":
        data = np.nan_to_num(data, nan=0.0)  # Core DN: nodata 0
    return write_physical(path, group, data, transform, dst_crs,
                          tags={"cells": len(cells), "blend": "overlapping products cross-faded"})
