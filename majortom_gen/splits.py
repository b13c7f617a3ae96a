"""The train/test split of the published COP-GEN-Beta weights, and what it takes to know it.

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
from collections.abc import Sequence

from majortom_gen.errors import MajorTomGenError

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
