"""Coherent value noise evaluated at absolute map coordinates (metres).

Because the noise is a function of position, not of the cell, adjacent cells in the same
UTM zone agree where their 10,680 m boxes overlap, and a world is the same whatever
subset of cells is generated or in which order.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def hash01(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Deterministic uniform [0, 1) values for integer lattice points and a key."""
    with np.errstate(over="ignore"):
        h = _mix(np.asarray(ix).astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                 ^ _mix(np.asarray(iy).astype(np.int64).view(np.uint64) + np.uint64(key & 0xFFFFFFFFFFFFFFFF)))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _fade(t: np.ndarray) -> np.ndarray:
    """Quintic fade (C2-continuous), so hillshades show no lattice seams."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def value_noise(xs: np.ndarray, ys: np.ndarray, wavelength: float, key: int) -> np.ndarray:
    """Smooth float32 noise in [0, 1] on the grid ``ys`` (rows, metres) x ``xs`` (cols, metres)."""
    u, v = xs / wavelength, ys / wavelength
    i0, j0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - i0, v - j0
    su, sv = _fade(fu).astype(np.float32), _fade(fv).astype(np.float32)
    ilo, jlo = i0.min(), j0.min()
    ii = np.arange(ilo, i0.max() + 2)
    jj = np.arange(jlo, j0.max() + 2)
    lattice = hash01(ii[None, :], jj[:, None], key).astype(np.float32)  # (nj, ni), small
    along_x = lattice[:, i0 - ilo] * (1 - su) + lattice[:, i0 + 1 - ilo] * su  # (nj, W)
    return along_x[j0 - jlo] * (1 - sv)[:, None] + along_x[j0 + 1 - jlo] * sv[:, None]


def fbm(xs: np.ndarray, ys: np.ndarray, wavelength: float, octaves: int, key: int, persistence: float = 0.5) -> np.ndarray:
    """Fractal sum of value noise, normalised to about [0, 1]."""
    total = np.zeros((len(ys), len(xs)), dtype=np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += np.float32(amp) * value_noise(xs, ys, wavelength / 2**o, key * 131 + o)
        norm += amp
        amp *= persistence
    return total / np.float32(norm)
