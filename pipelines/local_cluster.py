"""The embedded local Dask cluster every parallel step uses (ingest, sampling on several GPUs).

Starting worker processes, ``distributed`` writes the workers' thread limits
(``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ``OPENBLAS_NUM_THREADS=1``,
``MALLOC_TRIM_THRESHOLD_``) into *this* process's environment and leaves them there. Every
later subprocess would inherit them, and torch, when first loaded after that, would run on
one thread. :func:`local_cluster` gives the workers their settings and puts this process's
environment back as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def environment_kept() -> Iterator[None]:
    """Undo, on leaving the block, every change made to ``os.environ`` inside it."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def local_cluster(n_workers: int, threads_per_worker: int = 1, env: dict[str, str] | None = None):
    """A ``distributed.LocalCluster`` of ``n_workers`` worker processes (no dashboard, quiet
    logs; ``env``: extra environment of the workers), started without changing this process's
    environment. Close it (or use it as a context manager) when done."""
    from distributed import LocalCluster

    with environment_kept():
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                            dashboard_address=None, silence_logs=40, env=env or {})
