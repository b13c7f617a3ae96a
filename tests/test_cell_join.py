"""Neighbouring cells that agree where their products overlap (issue #15): waves, the known
latents a generated neighbour gives, the hard-cut seam measure, the feathered mosaic."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from affine import Affine

from conftest import WORLD_CELLS, tiny_model
from majortom_gen.fragments import MARGIN_PX
from majortom_gen.georef import product_box
from majortom_gen.rasters import GeoRaster
from model.metrics import border_seam_ratio
from pipelines.cell_canvas import cell_mosaic
from pipelines.cell_join import CELL_PX, CellGrid, cell_grids, cell_waves, known_latents, neighbour_pictures, owner_mosaic
from pipelines.mosaic import FEATHER_PX, blend
from pipelines.region import RegionRequest, sample_groups
from pipelines.sample import SamplingOptions, sample_rows_of


def _grid(cell: str) -> CellGrid:
    box = product_box(cell)
    return CellGrid(box.crs, box.transform(10.0) @ Affine.translation(MARGIN_PX, MARGIN_PX))


def test_cell_waves__by_row_and_column_parity_and_no_two_cells_of_a_wave_overlap():
    cells = [f"{r}U_{c}R" for r in range(499, 503) for c in range(57, 62)]
    waves = cell_waves(cells)
    assert [w[0] for w in waves] == ["500U_58R", "500U_57R", "499U_58R", "499U_57R"]
    assert sorted(c for w in waves for c in w) == sorted(cells)
    for wave in waves:
        assert not any(_grid(a).overlaps(_grid(b)) for a in wave for b in wave if a != b)
    # but every cell overlaps cells of other waves: its row neighbours and the rows above and below
    assert _grid("500U_58R").overlaps(_grid("500U_59R")) and _grid("500U_58R").overlaps(_grid("501U_58R"))
    assert cell_waves(["433U_12L"]) == [["433U_12L"]]


def test_neighbour_pictures_and_known_latents__the_overlap_strip_only_less_a_halo(store):
    """A neighbour east of a cell covers a 20-30 px strip along its east edge; the known latents
    are the latent pixels wholly inside that strip (less a halo when asked), and encode the
    neighbour there."""
    from pipelines.codec import require_store_codec

    west, east = _grid("501U_59R"), _grid("501U_60R")
    picture = np.full((CELL_PX, CELL_PX, 3), 200, np.uint8)
    seen, covered = neighbour_pictures(west, [(picture, east)])
    cols = np.flatnonzero(covered.any(axis=0))
    assert 15 <= len(cols) <= 35 and cols[-1] == CELL_PX - 1  # a strip at the east edge
    assert covered[:, cols[-1]].mean() > 0.95 and (seen[covered] == 200).all() and (seen[~covered] == 0).all()
    codec = require_store_codec(store)
    latents, keep = known_latents(codec, "DEM", seen, covered)
    assert latents.shape == (16, 4, 32, 32) and keep.shape == (16, 1, 32, 32)
    kept_cols = np.flatnonzero(keep.numpy().reshape(4, 4, 32, 32).transpose(0, 2, 1, 3).reshape(128, 128).any(axis=0))
    assert len(kept_cols) >= 2 and kept_cols.min() * 8 >= cols[0] and kept_cols.max() == 127  # wholly covered
    _, keep1 = known_latents(codec, "DEM", seen, covered, halo=1)
    assert int(keep1.sum()) < int(keep.sum()) and not (keep1.bool() & ~keep.bool()).any()
    f = int(keep.flatten(1).any(dim=1).nonzero()[0])
    decoded = codec.decode_network(latents[f:f + 1], "DEM")[0]  # (3, 256, 256) in [-1, 1]
    kept = keep[f, 0].numpy().repeat(8, 0).repeat(8, 1).astype(bool)
    assert abs(float(decoded[:, kept].mean()) - (200 / 127.5 - 1)) < 0.1
    assert known_latents(codec, "DEM", seen, np.zeros_like(covered)) is None


def test_owner_mosaic_and_border_seam_ratio__about_one_for_one_field_large_for_different_ones():
    cells = ["501U_59R", "501U_60R", "502U_60R"]
    grids = {c: _grid(c) for c in cells}
    # a smooth field of UTM position seen by every cell vs a different field per cell
    rng = np.random.default_rng(0)

    def field(cell, offset=0.0):
        t = grids[cell].transform
        xs = t.c + (np.arange(CELL_PX) + 0.5) * t.a
        ys = t.f + (np.arange(CELL_PX) + 0.5) * t.e
        return (100 + 60 * np.sin(xs / 700.0)[None, :] * np.cos(ys / 900.0)[:, None] + offset).astype(np.float32)

    same = {c: field(c) for c in cells}
    image, owner = owner_mosaic(same, grids)
    assert set(np.unique(owner)) == {-1, 0, 1, 2} and (owner >= 0).mean() > 0.5
    assert border_seam_ratio(image, owner) < 1.5
    different = {c: field(c, offset=float(rng.uniform(-40, 40))) for c in cells}
    assert border_seam_ratio(*owner_mosaic(different, grids)) > 5
    with pytest.raises(ValueError, match="several CRSs"):
        owner_mosaic({"501U_59R": same["501U_59R"], "x": same["501U_59R"]},
                     {"501U_59R": grids["501U_59R"], "x": CellGrid("EPSG:32633", grids["501U_59R"].transform)})


def test_blend__feathered_products_cross_fade_over_their_overlap():
    """Two overlapping constant products: without groups the overlap is a flat average with a
    step at each of its edges; feathered, it ramps from one product to the other."""
    west, east = _grid("501U_59R"), _grid("501U_60R")
    rasters = [GeoRaster(np.full((1, CELL_PX, CELL_PX), v, np.uint8), g.crs, g.transform, ("x",))
               for v, g in ((60, west), (200, east))]
    transform = west.transform
    width = int(round((east.bounds[2] - west.bounds[0]) / 10))
    mean, _ = blend(rasters, west.crs, transform, width, CELL_PX)
    feathered, _ = blend(rasters, west.crs, transform, width, CELL_PX, groups=["a", "b"])
    row = CELL_PX // 2
    flat, ramp = mean[0, row], feathered[0, row]
    overlap = np.flatnonzero((flat > 61) & (flat < 199))
    assert 15 <= len(overlap) <= 35
    assert np.allclose(flat[overlap[2:-2]], 130, atol=1)  # the plain mean: a plateau
    inner = ramp[overlap[1]:overlap[-1]]
    assert (np.diff(inner) > 0).all() and inner[0] < 90 and inner[-1] > 170  # a cross-fade
    assert np.allclose(ramp[:overlap[0] - 1], 60, atol=0.5) and np.allclose(ramp[overlap[-1] + 2:], 200, atol=0.5)
    assert FEATHER_PX >= len(overlap)


def test_sample_groups__joined_cells_agree_where_they_overlap_and_wave_one_is_unchanged(store, tmp_path):
    """Joined in waves, a later cell takes its generated neighbours' pictures where their
    products overlap, so the neighbours disagree there far less than independent cells; the
    first wave is what independent generation gives, and the result does not depend on the
    chunking."""
    from pipelines.model_folder import ModelOnStore

    model = tiny_model(tmp_path / "model")
    bound = ModelOnStore.open(model, store, device="cpu")
    cells = list(WORLD_CELLS)
    options = SamplingOptions(steps=3, n_samples=2, seed=3, device="cpu", batch_size=16)
    groups = {("S2L1C",): cells}
    runs = {}
    for join in (False, True):
        request = RegionRequest(generate=("DEM",), cells=tuple(cells), condition=("S2L1C",), join_cells=join)
        runs[join], waves = sample_groups(bound.model_dir, store, groups, request, options, tmp_path / f"j{join}", None)
    assert waves == [["502U_60R"], ["501U_60R"], ["501U_59R"]]
    again, _ = sample_groups(bound.model_dir, store, groups, replace(request), replace(options, batch_size=64),
                             tmp_path / "again", None)

    def latents(run_list):
        out = {}
        for run in run_list:
            with np.load(run / "samples.npz") as z:
                for cell in set(z["grid_cell"].tolist()):
                    rows = np.flatnonzero(z["grid_cell"] == cell)
                    out[cell] = (z["latent_DEM"][rows], z["fragment_index"][rows])
        return out

    alone, joined, rerun = latents(runs[False]), latents(runs[True]), latents(again)
    assert np.array_equal(alone["502U_60R"][0], joined["502U_60R"][0])  # wave 0: as independent
    assert not np.allclose(alone["501U_59R"][0], joined["501U_59R"][0], atol=1e-2)
    assert all(np.array_equal(joined[c][0], rerun[c][0]) for c in cells)

    grids = cell_grids(bound.store, cells)

    def pictures(table):
        out = {}
        for cell, (x, frags) in table.items():
            first = np.arange(0, len(frags), 2)  # sample 0 of each fragment
            decoded = bound.pictures(x[first], "DEM", **sample_rows_of([cell] * len(first), frags[first], 1))
            out[cell] = cell_mosaic(decoded[np.argsort(frags[first])])
        return out

    def disagreement(pics, a, b):
        seen, covered = neighbour_pictures(grids[b], [(pics[a], grids[a])])
        return float(np.abs(pics[b].astype(np.float32) - seen.astype(np.float32))[covered].mean())

    before, after = pictures(alone), pictures(joined)
    for a, b in (("502U_60R", "501U_60R"), ("501U_60R", "501U_59R")):
        assert disagreement(after, a, b) < 0.6 * disagreement(before, a, b), (a, b)


def test_write_mosaic__the_same_grid_and_pixels_whatever_the_order_of_the_fragments(tmp_path):
    from pipelines.mosaic import write_mosaic

    grids = [_grid(c) for c in ("501U_59R", "501U_60R", "502U_60R")]
    rasters = [GeoRaster(np.full((1, CELL_PX, CELL_PX), v, np.uint8), g.crs, g.transform, ("x",))
               for v, g in zip((60, 130, 200), grids)]
    a = write_mosaic(rasters, tmp_path / "a.tif", groups=["a", "b", "c"])
    b = write_mosaic(rasters[::-1], tmp_path / "b.tif", groups=["c", "b", "a"])
    assert a.transform == b.transform and np.array_equal(a.data, b.data)
