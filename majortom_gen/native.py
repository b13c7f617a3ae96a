"""The native family's modalities: COP-GEN's band groups and scalar tokens, declared as data.

COP-GEN (Espinosa et al., code ``miquel-espinosa/COP-GEN``, weights ``mespinosami/copgen-base``)
models Major TOM bands at their native resolution. Bands of one resolution form a *band
group*, one modality of the network with its own VAE; each Major TOM product is cut into
6 x 6 overlapping patches (``patch_px`` at the group's resolution). Two *scalar* modalities
carry where and when: the patch centre as a unit vector on the sphere, and the acquisition
date as (sin, cos) of the day of year and the year scaled to [-1, 1].

Names, band order (the VAEs' channel order), shapes, scale factors and the normalisation
constants are the official ones (``configs/copgen/discrete/cop_gen_base.py``), as is the
normalisation itself (``ddm/pre_post_process_data.py``):

- S2 (``reflectance``): ``DN / 10000`` then ``2x - 1``; the inverse multiplies back. DN is the
  Core encoding (uint16 reflectance x 10000, nodata 0; no BOA offset applied).
- S1 (``log_db``): linear power, values <= 0 set to ``min_positive``, ``10 log10``, min-max
  with ``min_db``/``max_db``, then ``2x - 1``; the inverse clips to [0, 1] before undoing.
- DEM (``log1p``): metres, values <= 0 set to ``min_positive`` (the official code drops
  elevations below sea level), ``log1p``, min-max, ``2x - 1``; the inverse clips likewise.
- cloud mask and land cover (``one_hot``): class values -> one channel per class, ``2x - 1``;
  the inverse takes the arg-max and maps back to the class values.
- ``3d_cartesian_lat_lon``: (lat, lon) degrees -> (x, y, z) on the unit sphere, as is.
- ``mean_timestamps``: a date -> (sin, cos) of 2 pi doy / days-in-year, and
  ``2 (year - 1950) / 100 - 1``, as is.

Patch layout (the official ``ddm/data.py`` rule): a band raster of ``S`` px is cut into
``n = S // patch_px + 1`` (= 6) patches per side starting at ``k * patch_px`` for ``k < n - 1``
and at ``S - patch_px`` for the last, so the last row and column overlap their neighbours.
On the ground every group has the same layout: patches start at 0, 1920, ..., 7680 and
8760 m from the product's upper-left corner, each 1920 m wide.

No torch here: arrays are numpy, ``(bands, H, W)`` images, ``(1, 1, 3)`` scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np
from affine import Affine

from majortom_gen.errors import UnknownModalityError
from majortom_gen.fragments import fragment_transform
from majortom_gen.modalities import PRODUCT_BOX_M

NETWORK_HUB_FILE = "mespinosami/copgen-base:500000_nnet_ema.pth"  # the published network (EMA, 500k steps)
VAE_HUB_REPO = "mespinosami/copgen-vaes"  # one folder per band group: <folder>/model-50-ema.pth
PATCHES_PER_SIDE = 6  # COP-GEN cuts each product into 6 x 6 overlapping patches
DATE_YEARS = (1950, 2050)  # the year range the date token scales to [-1, 1]
ENCODINGS = ("reflectance", "log_db", "log1p", "one_hot", "cartesian_xyz", "date")

# Land cover classes (ESRI 10 m LULC values) and cloud mask classes, in one-hot channel order.
LULC_CLASSES = (0, 1, 2, 4, 5, 7, 8, 9, 10, 11)
LULC_CLASS_NAMES = ("no data", "water", "trees", "flooded vegetation", "crops", "built area", "bare ground",
                    "snow/ice", "clouds", "rangeland")
CLOUD_CLASSES = (0, 1, 2, 3)
CLOUD_CLASS_NAMES = ("clear", "thick cloud", "thin cloud", "cloud shadow")


@dataclass(frozen=True)
class BandGroup:
    """One modality of the native family.

    ``kind``: ``image`` (a band group) or ``scalar`` (a token of ``latent[2]`` values).
    ``source``: the Major TOM modality the bands come from (None for scalars).
    ``bands``: the bands in the VAE's channel order. ``patch_px``: a patch's side in pixels at
    ``resolution_m``. ``latent``: the network's (C, H, W). ``img_channels``: the VAE's input
    channels (one per class for one-hot groups). ``encoding``: how values become model inputs
    (see the module docstring), with ``min_db``/``max_db``/``min_positive`` for the log ones
    and ``classes`` for one-hot. ``vae_scale_factor``: the official VAE's latent scale;
    ``vae_file``: its weights in the hub repo :data:`VAE_HUB_REPO`."""

    name: str
    kind: str
    source: str | None
    bands: tuple[str, ...]
    resolution_m: float | None
    patch_px: int
    latent: tuple[int, int, int]
    img_channels: int
    encoding: str
    units: str
    vae_scale_factor: float | None = None
    min_db: float | None = None
    max_db: float | None = None
    min_positive: float | None = None
    classes: tuple[int, ...] = ()
    vae_file: str | None = None

    @property
    def is_scalar(self) -> bool:
        return self.kind == "scalar"

    def network_spec(self, patch_size: int = 2) -> dict:
        """The official config's entry for this modality (what ``model.convert.from_cop_gen``
        takes): type, latent channels, latent (H, W) and patch size (1 for scalars)."""
        return {"modality_type": self.kind, "latent_channels": self.latent[0],
                "latent_input_resolution": self.latent[1:], "patch_size": 1 if self.is_scalar else patch_size}

    def vae_ddconfig(self) -> dict:
        """The official band-group VAE's ``ddconfig`` (LDM kl-f8: ch 128, ch_mult 1,2,4,4)."""
        if self.is_scalar:
            raise ValueError(f"{self.name} is a scalar modality: it has no VAE")
        return {"double_z": True, "z_channels": self.latent[0], "resolution": self.patch_px,
                "in_channels": self.img_channels, "out_ch": self.img_channels, "ch": 128, "ch_mult": [1, 2, 4, 4],
                "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _vae(folder: str) -> str:
    return f"{folder}/model-50-ema.pth"


def _s2(level: str, bands: tuple[str, ...], res: float, px: int, scale: float) -> BandGroup:
    name = f"S2{level}_" + "_".join(sorted(bands))
    short = "_".join(b.removeprefix("B0").removeprefix("B") for b in bands)  # the official folder names: B4_3_2_8
    return BandGroup(name, "image", f"S2{level}", bands, res, px, (8, px // 8, px // 8), len(bands), "reflectance",
                     "reflectance x 10000 (DN)", vae_scale_factor=scale,
                     vae_file=_vae(f"S2{level}_{px}x{px}_B{short}_latent_8"))


_GROUPS = (
    BandGroup("3d_cartesian_lat_lon", "scalar", None, ("x", "y", "z"), None, 0, (1, 1, 3), 1, "cartesian_xyz",
              "unit vector (ECEF direction)"),
    BandGroup("mean_timestamps", "scalar", None, ("sin_doy", "cos_doy", "year"), None, 0, (1, 1, 3), 1, "date",
              "sin/cos of the day of year, year scaled 1950..2050 -> -1..1"),
    BandGroup("DEM_DEM", "image", "DEM", ("DEM",), 30.0, 64, (8, 8, 8), 1, "log1p", "metres",
              vae_scale_factor=0.404247, min_db=0.000006, max_db=9.088, min_positive=5.899129519093549e-06,
              vae_file=_vae("DEM_64x64_DEM_latent_8")),
    BandGroup("S1RTC_vh_vv", "image", "S1RTC", ("vv", "vh"), 10.0, 192, (8, 24, 24), 2, "log_db",
              "linear power (gamma0)", vae_scale_factor=0.633804, min_db=-55.787186, max_db=40.225800,
              min_positive=2.6380407689430285e-06, vae_file=_vae("S1RTC_192x192_VV_VH_latent_8")),
    _s2("L1C", ("B04", "B03", "B02", "B08"), 10.0, 192, 0.772514),
    _s2("L1C", ("B05", "B06", "B07", "B8A", "B11", "B12"), 20.0, 96, 0.765817),
    _s2("L1C", ("B01", "B09", "B10"), 60.0, 32, 0.565812),
    _s2("L2A", ("B04", "B03", "B02", "B08"), 10.0, 192, 0.853416),
    _s2("L2A", ("B05", "B06", "B07", "B8A", "B11", "B12"), 20.0, 96, 0.567267),
    _s2("L2A", ("B01", "B09"), 60.0, 32, 0.571367),
    BandGroup("LULC_LULC", "image", "LULC", ("LULC",), 10.0, 192, (8, 24, 24), len(LULC_CLASSES), "one_hot",
              "land cover class", vae_scale_factor=0.464794, classes=LULC_CLASSES,
              vae_file=_vae("LULC_192x192_LULC_latent_8")),
    BandGroup("S2L1C_cloud_mask", "image", "S2L1C", ("cloud_mask",), 10.0, 192, (8, 24, 24), len(CLOUD_CLASSES),
              "one_hot", "cloud mask class", vae_scale_factor=0.557045, classes=CLOUD_CLASSES,
              vae_file=_vae("S2L1C_192x192_cloud_mask_latent_8")),
)

#: The native modalities in COP-GEN base's order (the order of the released network's tokens).
BAND_GROUPS: dict[str, BandGroup] = {g.name: g for g in _GROUPS}
COPGEN_BASE_ORDER: tuple[str, ...] = tuple(BAND_GROUPS)


def get_band_group(name: str) -> BandGroup:
    """A native modality by its COP-GEN name (case-insensitive)."""
    for key, group in BAND_GROUPS.items():
        if key.lower() == str(name).strip().lower():
            return group
    raise UnknownModalityError(f"unknown native modality {name!r}; valid: {', '.join(BAND_GROUPS)}")


def parse_band_groups(text: str) -> list[str]:
    """Native modality names from comma-separated text (case-insensitive; ``none`` or empty:
    none), each checked against the registry."""
    if text.strip().lower() in ("", "none"):
        return []
    return [get_band_group(name).name for name in text.split(",") if name.strip()]


def network_modalities(names=COPGEN_BASE_ORDER, patch_size: int = 2) -> dict[str, dict]:
    """``{name: network_spec}`` in the given order: the ``modalities`` argument of
    ``model.convert.from_cop_gen`` (COP-GEN base's twelve by default)."""
    return {n: get_band_group(n).network_spec(patch_size) for n in names}


# -- patch layout -----------------------------------------------------------------------------

@dataclass(frozen=True)
class NativePatch:
    """One patch of a band group: its place in the 6 x 6 layout, its pixel window in the band
    raster (``row_off``, ``col_off``, ``size_px`` at the group's resolution), its affine
    transform (CRS units, the product's UTM zone) and CRS."""

    group: str
    patch_row: int
    patch_col: int
    row_off: int
    col_off: int
    size_px: int
    transform: Affine
    crs: str

    @property
    def index(self) -> int:
        return self.patch_row * PATCHES_PER_SIDE + self.patch_col


def raster_px(group: BandGroup | str) -> int:
    """The side, in pixels, of the group's band raster in a Core product (1068 at 10 m, 534 at
    20 m, 178 at 60 m, 356 for the 30 m DEM)."""
    g = get_band_group(group) if isinstance(group, str) else group
    if g.is_scalar:
        raise ValueError(f"{g.name} is a scalar modality: it has no raster")
    return round(PRODUCT_BOX_M / g.resolution_m)


def patch_offsets(image_px: int, patch_px: int) -> list[int]:
    """Pixel offsets of the patches along one side (the official rule, see the module docstring)."""
    if image_px < patch_px:
        raise ValueError(f"a {image_px} px raster is smaller than one {patch_px} px patch")
    n = image_px // patch_px + 1
    return [k * patch_px for k in range(n - 1)] + [image_px - patch_px]


def patch_layout(group: BandGroup | str, band_transform: Affine, crs: str) -> list[NativePatch]:
    """The 6 x 6 patches of ``group`` in a product whose band raster (at the group's
    resolution) has ``band_transform``, row-major (index = row * 6 + col)."""
    g = get_band_group(group) if isinstance(group, str) else group
    offsets = patch_offsets(raster_px(g), g.patch_px)
    if len(offsets) != PATCHES_PER_SIDE:
        raise ValueError(f"{g.name}: {len(offsets)} patches per side, COP-GEN uses {PATCHES_PER_SIDE}")
    return [NativePatch(g.name, r, c, r0, c0, g.patch_px, fragment_transform(band_transform, r0, c0), crs)
            for r, r0 in enumerate(offsets) for c, c0 in enumerate(offsets)]


def cut_patches(values, group: BandGroup | str, band_transform: Affine, crs: str) -> list[tuple[NativePatch, np.ndarray]]:
    """Cut a product's band stack ``(bands, S, S)`` (physical values, the group's band order)
    into its georeferenced patches ``(bands, patch_px, patch_px)`` (views). A raster one pixel
    too large (S1 rasters of 1069 px) is cropped to the product grid first, as the official code."""
    g = get_band_group(group) if isinstance(group, str) else group
    v = np.asarray(values)
    side = raster_px(g)
    if v.ndim != 3 or v.shape[0] != len(g.bands) or min(v.shape[1:]) < side:
        raise ValueError(f"{g.name}: expected ({len(g.bands)}, {side}, {side}) values ({', '.join(g.bands)}), got {v.shape}")
    v = v[:, :side, :side]
    return [(p, v[:, p.row_off:p.row_off + p.size_px, p.col_off:p.col_off + p.size_px])
            for p in patch_layout(g, band_transform, crs)]


# -- values <-> model inputs ------------------------------------------------------------------

def _floor_positive(values: np.ndarray, floor: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return np.where(v <= 0, np.float32(floor), v)


def to_model(group: BandGroup | str, values) -> np.ndarray:
    """Physical values -> the VAE's input (float32), as the official pre-processing.

    Images: ``(..., bands, H, W)`` in the group's units (S2 DN, S1 linear power, DEM metres, class
    values) -> ``(..., img_channels, H, W)`` in [-1, 1] (log encodings may leave it for values
    beyond the official min/max). Scalars: ``(lat, lon)`` degrees or a date -> ``(1, 1, 3)``."""
    g = get_band_group(group) if isinstance(group, str) else group
    if g.encoding == "cartesian_xyz":
        return encode_lat_lon(*values)
    if g.encoding == "date":
        return encode_date(values)
    v = np.asarray(values)
    if v.ndim < 3 or v.shape[-3] != len(g.bands):
        raise ValueError(f"{g.name}: expected ({len(g.bands)}, H, W) values ({', '.join(g.bands)}), got {v.shape}")
    if g.encoding == "reflectance":
        x = v.astype(np.float32) / 10000.0
    elif g.encoding == "log_db":
        x = (10.0 * np.log10(_floor_positive(v, g.min_positive)) - g.min_db) / (g.max_db - g.min_db)
    elif g.encoding == "log1p":
        x = (np.log1p(_floor_positive(v, g.min_positive)) - g.min_db) / (g.max_db - g.min_db)
    elif g.encoding == "one_hot":
        index = np.zeros(v[..., 0, :, :].shape, dtype=np.int64)  # values outside the classes read as class 0 (no data)
        for i, value in enumerate(g.classes):
            index[v[..., 0, :, :] == value] = i
        x = (index[..., None, :, :] == np.arange(len(g.classes)).reshape(-1, 1, 1)).astype(np.float32)
    else:
        raise ValueError(f"{g.name}: unknown encoding {g.encoding!r}")
    return (x * 2.0 - 1.0).astype(np.float32)


def from_model(group: BandGroup | str, x) -> np.ndarray:
    """The VAE's output -> physical values, the inverse of :func:`to_model` as the official
    post-processing: S2 DN (float32), S1 linear power, DEM metres, class values (uint8),
    ``(lat, lon)`` degrees, or a ``datetime.date``."""
    g = get_band_group(group) if isinstance(group, str) else group
    if g.encoding == "cartesian_xyz":
        return decode_lat_lon(x)
    if g.encoding == "date":
        return decode_date(x)
    u = (np.asarray(x, dtype=np.float32) + 1.0) / 2.0
    if g.encoding == "reflectance":
        return u * 10000.0
    if g.encoding == "log_db":
        db = np.clip(u, 0.0, 1.0) * (g.max_db - g.min_db) + g.min_db
        return np.maximum(10.0 ** (db / 10.0), g.min_positive).astype(np.float32)
    if g.encoding == "log1p":
        logs = np.clip(u, 0.0, 1.0) * (g.max_db - g.min_db) + g.min_db
        return np.maximum(np.expm1(logs), g.min_positive).astype(np.float32)
    if g.encoding == "one_hot":
        return np.asarray(g.classes, dtype=np.uint8)[np.argmax(u, axis=-3)][..., None, :, :]
    raise ValueError(f"{g.name}: unknown encoding {g.encoding!r}")


def encode_lat_lon(lat: float, lon: float) -> np.ndarray:
    """(lat, lon) degrees -> ``(1, 1, 3)`` float32 unit vector (cos lat cos lon, cos lat sin lon, sin lat)."""
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 360.0):
        raise ValueError(f"latitude/longitude out of range: {lat}, {lon}")
    la, lo = math.radians(lat), math.radians(lon)
    return np.array([math.cos(la) * math.cos(lo), math.cos(la) * math.sin(lo), math.sin(la)],
                    dtype=np.float32).reshape(1, 1, 3)


def decode_lat_lon(xyz) -> np.ndarray:
    """``(..., 3)`` vectors (any length) -> ``(..., 2)`` (lat, lon) degrees."""
    v = np.asarray(xyz, dtype=np.float64)
    lat = np.degrees(np.arcsin(np.clip(v[..., 2] / np.maximum(np.linalg.norm(v, axis=-1), 1e-12), -1, 1)))
    return np.stack([lat, np.degrees(np.arctan2(v[..., 1], v[..., 0]))], axis=-1)


def _days_in(year: int) -> int:
    return 366 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 365


def encode_date(when: date | datetime | str) -> np.ndarray:
    """A date (or ISO text) -> ``(1, 1, 3)`` float32 (sin, cos of the day of year, scaled year)."""
    when = date.fromisoformat(when[:10]) if isinstance(when, str) else when
    doy, days = when.timetuple().tm_yday, _days_in(when.year)
    lo, hi = DATE_YEARS
    return np.array([math.sin(2 * math.pi * doy / days), math.cos(2 * math.pi * doy / days),
                     2.0 * (when.year - lo) / (hi - lo) - 1.0], dtype=np.float32).reshape(1, 1, 3)


def decode_date(enc) -> date:
    """The inverse of :func:`encode_date` for one ``(..., 3)`` token: the nearest date."""
    s, c, y = (float(v) for v in np.asarray(enc, dtype=np.float64).reshape(-1)[:3])
    lo, hi = DATE_YEARS
    year = int(round((y + 1.0) / 2.0 * (hi - lo) + lo))
    days = _days_in(year)
    angle = math.atan2(s, c) % (2 * math.pi)
    doy = int(round(angle * days / (2 * math.pi))) % days or days
    return date(year, 1, 1) + timedelta(days=doy - 1)
