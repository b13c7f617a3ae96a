"""Train/test splits by grid cell: this project's (:func:`split_cells`, seeded, optionally in
spatial blocks; a training set's recorded one, :func:`recorded_split`) and the published
COP-GEN-Beta weights' (:func:`official_split`), with what it takes to know the latter.

No cell is ever in both splits: fragments of one cell overlap in time and space, so a cell
split keeps the test fragments unseen; spatial blocks keep whole neighbourhoods on one side.


The official data preparation (COP-GEN-Beta ``prepare_dataset_images.py`` with
``majortom/NMajorTOM.py``, defaults ``--ratio_train_test 0.95 --seed 42``) splits by grid
cell: ``random.seed(42)``; ``cells = list(set(<grid_cell column of the first modality's
metadata>))``; ``random.shuffle(cells)``; the first ``int(0.95 * len(cells))`` are train, the
rest test. The first modality is the first of S2L2A, S2L1C, S1RTC, DEM that was prepared,
its metadata rows in file order, restricted to the cells every modality has.

The input order the shuffle sees is the iteration order of a Python ``set`` of strings. That
order depends on the string hashes, which Python randomises in every process unless
``PYTHONHASHSEED`` is set, on the hash function of the Python version (SipHash-2-4 up to 3.10,
SipHash-1-3 from 3.11) and on the insertion order. The released weights do not state a
``PYTHONHASHSEED``, so their split cannot be recomputed from the cell list: the authority is
the ``train_metadata.parquet`` / ``test_metadata.parquet`` the official script writes (their
``grid_cell`` columns; ``--exclude-cells`` and ``convert-weights --training-cells`` read them).
:func:`official_split` reproduces the rule exactly for a known hash seed, in a child
interpreter (the hash key is fixed at interpreter start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from majortom_gen.errors import MajorTomGenError
from majortom_gen.grid import parse_cell_id


def split_cells(cells: Iterable[str], test_fraction: float = 0.05, seed: int = 0,
                block: int = 1) -> tuple[list[str], list[str]]:
    """``(train, test)`` cell ids, sorted, reproducible for a seed whatever the order of ``cells``.

    Cells are grouped into ``block x block`` blocks of neighbouring grid cells (``block=1``:
    one cell each) and whole groups, in a seeded permutation of the sorted groups, go to test
    until it holds ``round(test_fraction * n)`` cells (at least one when ``test_fraction > 0``
    and there are several groups). A split that would leave nothing to train on is refused."""
    if not 0 <= test_fraction < 1:
        raise MajorTomGenError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if block < 1:
        raise MajorTomGenError(f"--block-size must be >= 1, got {block}")
    ordered = sorted(set(cells))
    groups: dict[object, list[str]] = defaultdict(list)
    for cell in ordered:
        row, col = parse_cell_id(cell) if block > 1 else (0, 0)
        groups[(row // block, col // block) if block > 1 else cell].append(cell)
    keys = sorted(groups)
    target = int(round(test_fraction * len(ordered)))
    if test_fraction > 0 and len(keys) > 1:
        target = max(target, 1)
    test: list[str] = []
    for i in np.random.default_rng(seed).permutation(len(keys)):
        if len(test) >= target:
            break
        test += groups[keys[i]]
    if target and len(test) == len(ordered):
        raise MajorTomGenError(f"{len(ordered)} cell(s) in {len(keys)} block(s) cannot be split with test fraction "
                               f"{test_fraction}: nothing would be left to train on; use a smaller block or more cells")
    test_set = set(test)
    return [c for c in ordered if c not in test_set], sorted(test)


def recorded_split(manifest: dict) -> dict[str, str] | None:
    """``{cell: 'train' | 'test'}`` recorded in a store's manifest by ``majortom-gen dataset
    build``, if the store is such a training set (it then overrides any seeded split)."""
    d = manifest.get("dataset")
    if not d:
        return None
    return {c: s for s, cells in d["cells"].items() for c in cells}

OFFICIAL_RATIO = 0.95
OFFICIAL_SEED = 42
OFFICIAL_RULE = ("COP-GEN-Beta prepare_dataset_images.py (NMajorTOM): random.seed(42); "
                 "random.shuffle(list(set(grid_cells))); first int(0.95 n) train. The set's order depends on "
                 "PYTHONHASHSEED and the Python version, which the release does not state: the training cells are "
                 "known only from the official train_metadata.parquet/test_metadata.parquet")

_CHILD = """
import json, random, sys
args = json.load(sys.stdin)
random.seed(args["seed"])
cells = set()
for c in args["cells"]:
    cells.add(c)
order = list(cells)
random.shuffle(order)
n_train = int(len(order) * args["ratio"])
json.dump({"train": order[:n_train], "test": order[n_train:]}, sys.stdout)
"""


def official_split(cells_in_order: Sequence[str], *, hash_seed: int, ratio: float = OFFICIAL_RATIO,
                   seed: int = OFFICIAL_SEED, python: str = sys.executable) -> dict[str, list[str]]:
    """``{"train": [...], "test": [...]}`` as the official rule makes it for ``cells_in_order``
    (the first modality's metadata order) when run under ``PYTHONHASHSEED=hash_seed`` by the
    interpreter ``python`` (its version decides the string hash). Lists in shuffled order."""
    if not 0 < ratio < 1:
        raise MajorTomGenError(f"ratio must be in (0, 1), got {ratio}")
    if hash_seed < 0 or hash_seed > 4294967295:
        raise MajorTomGenError(f"PYTHONHASHSEED must be in [0, 4294967295], got {hash_seed}")
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    done = subprocess.run([python, "-c", _CHILD], input=json.dumps({"cells": list(cells_in_order), "seed": seed,
                                                                     "ratio": ratio}),
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise MajorTomGenError(f"{python} could not run the split: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)
