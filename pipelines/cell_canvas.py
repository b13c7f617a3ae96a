"""A grid cell's 4x4 fragments laid side by side as one canvas, and back.

Fragment ``index = row * 4 + col`` of a cell (:mod:`majortom_gen.fragments`) is the window
``[row * h, (row + 1) * h) x [col * w, (col + 1) * w)`` of the cell's canvas: latents
``(C, 32, 32)`` make a ``(C, 128, 128)`` canvas, decoded pictures ``(3, 256, 256)`` a
``(3, 1024, 1024)`` one (the centre-cropped 1024 px product grid). Rows of a sample run (or
a store) that hold all 16 fragments of a (cell, sample) form a canvas; the others stay
fragments. :func:`tile`/:func:`untile` lay out latents (torch, channels first),
:func:`cell_mosaic`/:func:`cell_fragments` pixels and masks (numpy, channels last).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from majortom_gen.fragments import FRAGMENT_PX, GRID_SIDE

FRAGMENTS_PER_CELL = GRID_SIDE * GRID_SIDE


def canvas_groups(cells: Sequence[str], frags: Sequence[int],
                  samples: Sequence[int] | None = None) -> tuple[list[list[int]], list[int]]:
    """``(groups, rest)``: the row numbers of every (cell, sample) that has all 16 grid
    fragments, ordered by fragment index (one group per canvas, in order of first row), and
    the rows of incomplete cells (or centre crops), in row order. A repeated fragment makes
    its cell incomplete."""
    by_key: dict[tuple[str, int], list[int]] = defaultdict(list)
    samples = samples if samples is not None else [0] * len(cells)
    for row, key in enumerate(zip(cells, samples)):
        by_key[key].append(row)
    groups, rest = [], []
    for rows in by_key.values():
        order = sorted(rows, key=lambda r: frags[r])
        if [frags[r] for r in order] == list(range(FRAGMENTS_PER_CELL)):
            groups.append(order)
        else:
            rest += rows
    return groups, sorted(rest)


def tile(fragments: torch.Tensor) -> torch.Tensor:
    """``(G * 16, C, h, w)`` fragments, each cell's 16 consecutive in index order ->
    ``(G, C, 4h, 4w)`` canvases."""
    n, c, h, w = fragments.shape
    if n % FRAGMENTS_PER_CELL:
        raise ValueError(f"{n} fragments are not whole cells of {FRAGMENTS_PER_CELL}")
    g = n // FRAGMENTS_PER_CELL
    grid = fragments.reshape(g, GRID_SIDE, GRID_SIDE, c, h, w)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(g, c, GRID_SIDE * h, GRID_SIDE * w)


def untile(canvases: torch.Tensor) -> torch.Tensor:
    """``(G, C, 4h, 4w)`` canvases -> ``(G * 16, C, h, w)`` fragments (the inverse of :func:`tile`)."""
    g, c, height, width = canvases.shape
    if height % GRID_SIDE or width % GRID_SIDE:
        raise ValueError(f"a canvas of {height} x {width} does not split into {GRID_SIDE} x {GRID_SIDE} fragments")
    h, w = height // GRID_SIDE, width // GRID_SIDE
    grid = canvases.reshape(g, c, GRID_SIDE, h, GRID_SIDE, w)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(g * FRAGMENTS_PER_CELL, c, h, w)


def cell_mosaic(fragments: np.ndarray) -> np.ndarray:
    """Pixels: a cell's 16 fragments ``(16, 256, 256, ...)`` (numpy, channels last, e.g. RGB or
    a mask) in index order -> the cell ``(1024, 1024, ...)``; :func:`tile` for latents."""
    rest = fragments.shape[3:]
    grid = fragments.reshape(GRID_SIDE, GRID_SIDE, FRAGMENT_PX, FRAGMENT_PX, *rest)
    return np.swapaxes(grid, 1, 2).reshape(GRID_SIDE * FRAGMENT_PX, GRID_SIDE * FRAGMENT_PX, *rest)


def cell_fragments(mosaic: np.ndarray) -> np.ndarray:
    """The inverse of :func:`cell_mosaic`."""
    rest = mosaic.shape[2:]
    grid = mosaic.reshape(GRID_SIDE, FRAGMENT_PX, GRID_SIDE, FRAGMENT_PX, *rest)
    return np.swapaxes(grid, 1, 2).reshape(FRAGMENTS_PER_CELL, FRAGMENT_PX, FRAGMENT_PX, *rest)
