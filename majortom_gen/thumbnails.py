"""The official Major TOM Core thumbnail formulas (ESA ``extras/thumbnail_*.py``).

Each returns exactly the uint8 array the Core datasets hold, for the same input arrays and
dtypes. They are 8-bit visualisations, not physical values, and are not invertible except
:func:`s2_reflectance_from_thumbnail` below saturation.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LightSource

S2_GAIN = 1.3
S2_GAMMA = 0.6
S1_NODATA = -32768.0


def s2_thumbnail(B04: np.ndarray, B03: np.ndarray, B02: np.ndarray, gain: float = S2_GAIN, gamma: float = S2_GAMMA) -> np.ndarray:
    """True colour from S2 DN (reflectance x 10000): ``uint8(clip(gain*(x/1e4)**gamma, 0, 1)*255)``.

    Returns (H, W, 3) uint8 (truncation, as the reference)."""
    thumb = np.stack([B04, B03, B02], -1)
    thumb = gain * ((thumb / 10_000) ** gamma)
    return (thumb.clip(0, 1) * 255).astype(np.uint8)


def s2_reflectance_from_thumbnail(thumb: np.ndarray, gain: float = S2_GAIN, gamma: float = S2_GAMMA) -> np.ndarray:
    """Approximate reflectance (0..1) of [B04, B03, B02] from an S2 thumbnail.

    Valid only below saturation (values < 255); the uint8 truncation loses up to one step."""
    x = (thumb.astype(np.float64) + 0.5) / 255.0
    return (x / gain) ** (1.0 / gamma)


def s1_thumbnail(vv: np.ndarray, vh: np.ndarray, vv_nodata: float = S1_NODATA, vh_nodata: float = S1_NODATA) -> np.ndarray:
    """False colour from S1 RTC linear backscatter: R = VV dB, G = VV+VH, B = VH dB.

    Negative values (nodata included) are replaced by the smallest non-negative value before
    ``10*log10``; each band is min-max scaled to 0..255 over its valid pixels; nodata pixels
    become 0. Inputs are not modified. Returns (H, W, 3) uint8."""
    vv = np.array(vv, copy=True)
    vh = np.array(vh, copy=True)
    vv_mask = vv != vv_nodata
    vh_mask = vh != vh_nodata
    vv[vv < 0] = vv[vv >= 0].min()
    vh[vh < 0] = vh[vh >= 0].min()
    with np.errstate(divide="ignore"):
        vv_db = 10 * np.log10(vv)
        vh_db = 10 * np.log10(vh)
    vv_db = (vv_db - vv_db[vv_mask].min()) / (vv_db[vv_mask].max() - vv_db[vv_mask].min()) * 255
    vh_db = (vh_db - vh_db[vh_mask].min()) / (vh_db[vh_mask].max() - vh_db[vh_mask].min()) * 255
    vv_db[vv_mask == 0] = 0
    vh_db[vh_mask == 0] = 0
    return np.stack([vv_db, 255 * (vv_db + vh_db) / np.max(vv_db + vh_db), vh_db], -1).astype(np.uint8)


def dem_thumbnail(dem: np.ndarray, azdeg: float = 315, altdeg: float = 45, vert_exag: float = 1) -> np.ndarray:
    """Hillshade of a DEM (dx = dy = 1 pixel), per-image contrast stretched; (H, W) uint8."""
    return np.uint8(255 * LightSource(azdeg=azdeg, altdeg=altdeg).hillshade(dem, vert_exag=vert_exag))
