"""One cell's synthetic scene: physically linked rasters for the four Core modalities.

A procedural terrain (elevation, metres, at 10 m) gives the DEM (3x3 block mean -> 30 m):
coastal plains, rolling hills inland and ridged mountains, with no relief finer than about a
kilometre, so that what the DEM hillshade shows (slopes) also shows in the other modalities.
Land cover follows terrain (fields and towns on the flat, bare rock on steep slopes, snow
high up) and a moisture field. S2 L2A surface reflectance comes from per-class spectra, lit
by the terrain (sun 30 degrees up in the south-south-east, as a mid-latitude morning pass);
S2 L1C adds an atmosphere (path radiance, transmittance, water vapour and cirrus); S1
VV/VH backscatter depends on land cover, on the slope facing the radar, and carries
speckle. All fields are functions of UTM position, so overlapping cells agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from majortom_gen.georef import ProductBox
from majortom_gen.modalities import get_modality
from majortom_gen.synth.noise import fbm, hash01

RES = 10.0
PX = 1068

# land-cover classes
WATER, FOREST, GRASS, CROP, BARE, URBAN, SNOW = range(7)
CLASS_NAMES = ("water", "forest", "grassland", "cropland", "bare", "urban", "snow")

S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
# Typical surface reflectance (0..1) per class and band (B10 cirrus: ~0 at the surface).
_SPECTRA = np.array([
    # B01   B02   B03   B04   B05   B06   B07   B08   B8A   B09   B10    B11   B12
    [0.060, 0.055, 0.050, 0.030, 0.025, 0.020, 0.018, 0.015, 0.012, 0.008, 0.001, 0.006, 0.004],  # water
    [0.025, 0.030, 0.055, 0.030, 0.085, 0.230, 0.290, 0.310, 0.320, 0.300, 0.001, 0.150, 0.070],  # forest
    [0.040, 0.050, 0.085, 0.070, 0.130, 0.260, 0.310, 0.330, 0.340, 0.320, 0.001, 0.250, 0.140],  # grassland
    [0.045, 0.060, 0.095, 0.080, 0.140, 0.280, 0.340, 0.360, 0.370, 0.340, 0.001, 0.240, 0.130],  # cropland (green)
    [0.100, 0.120, 0.150, 0.185, 0.205, 0.220, 0.240, 0.255, 0.265, 0.260, 0.001, 0.320, 0.280],  # bare soil/rock
    [0.110, 0.105, 0.115, 0.125, 0.140, 0.155, 0.165, 0.175, 0.180, 0.170, 0.001, 0.200, 0.180],  # urban
    [0.850, 0.860, 0.850, 0.830, 0.800, 0.760, 0.720, 0.700, 0.680, 0.600, 0.002, 0.050, 0.030],  # snow
])
# Reflectance of a thick cloud per band.
_CLOUD = np.array([0.62, 0.64, 0.65, 0.66, 0.66, 0.66, 0.65, 0.64, 0.63, 0.55, 0.30, 0.45, 0.35])
_S2 = get_modality("S2L1C")
# Backscatter (dB) per class: VV, VH.
_SIGMA_DB = np.array([[-21.0, -28.0], [-7.5, -13.5], [-11.0, -18.0], [-10.0, -17.0],
                      [-13.0, -22.0], [-1.0, -8.0], [-14.0, -22.0]])
# Atmosphere for L1C: path radiance (reflectance units) and transmittance per band.
_PATH = np.array([0.110, 0.080, 0.050, 0.030, 0.026, 0.022, 0.019, 0.016, 0.015, 0.010, 0.000, 0.006, 0.003])
_TRANS = np.array([0.78, 0.83, 0.88, 0.91, 0.92, 0.93, 0.94, 0.95, 0.95, 0.55, 0.02, 0.97, 0.98])


@dataclass
class Acquisition:
    """Per-product random choices, drawn from the cell's generator."""

    cloud_fraction: float  # target share of thick+thin cloud, 0..1
    aerosol: float  # scales L1C path radiance
    s2_swath_edge: float | None  # if set, the S2 product is cut by a swath edge at this offset
    s1_ascending: bool
    s1_edge: float | None  # if set, an S1 nodata strip of this width share
    speckle_seed: int


@dataclass
class Scene:
    """Everything a cell's products are made of, on the 10 m 1068 px grid unless stated."""

    elevation: np.ndarray  # float32 metres (1068, 1068)
    dem30: np.ndarray  # float32 metres (356, 356)
    landcover: np.ndarray  # uint8 class ids
    l2a: dict[str, np.ndarray]  # uint16 DN per band, at the band's resolution
    l1c: dict[str, np.ndarray]
    cloud_mask: np.ndarray  # uint8 (1068, 1068): 0 clear, 1 thick, 2 thin, 3 shadow
    s2_valid: np.ndarray  # bool (1068, 1068)
    vv: np.ndarray  # float32 linear power, nodata -32768
    vh: np.ndarray


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k pixel blocks, as k*k strided adds (far faster than a reshape-mean)."""
    h, w = a.shape
    out = np.zeros((h // k, w // k), dtype=np.float64 if a.dtype == np.float64 else np.float32)
    for i in range(k):
        for j in range(k):
            out += a[i::k, j::k]
    return out / (k * k)


def terrain(xs: np.ndarray, ys: np.ndarray, key: int) -> np.ndarray:
    """Elevation (metres) at pixel centres; negative values are sea.

    Landforms are kilometre-scale (no relief finer than ~1.5 km): plains, rolling hills where
    a hilliness field is high, ridged mountains. Their slopes are what the DEM hillshade shows,
    and they are steep enough for the terrain's shading to show in S2 too, as in real imagery."""
    continent = fbm(xs, ys, 60_000, 3, key + 1)
    relief = fbm(xs, ys, 12_000, 4, key + 2, persistence=0.5)
    hilliness = np.clip((fbm(xs, ys, 20_000, 2, key + 5) - 0.4) * 4, 0, 1)
    hills = fbm(xs, ys, 3_200, 3, key + 6, persistence=0.45)
    ridges = 1 - np.abs(2 * fbm(xs, ys, 6_000, 3, key + 3, persistence=0.4) - 1)
    mountain_mask = np.clip((fbm(xs, ys, 40_000, 2, key + 4) - 0.55) * 4, 0, 1)
    lowland = (continent - 0.36) * 1400 + 260 * (relief - 0.45)
    inland = np.clip(lowland / 150, 0, 1)  # hills rise inland: coasts are plains, the sea floor stays flat
    return lowland + inland * hilliness * 900 * (hills - 0.5) + mountain_mask * 2400 * ridges**3


def _slope_aspect(elev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit surface normals (nx east, ny north, nz up) of a 10 m grid (rows go south)."""
    d_row, d_col = np.gradient(elev, RES)
    nx, ny, nz = -d_col, d_row, np.ones_like(elev)  # d/dnorth = -d/drow
    norm = np.sqrt(nx**2 + ny**2 + nz**2)
    return nx / norm, ny / norm, nz / norm


def landcover(elev: np.ndarray, nz: np.ndarray, xs: np.ndarray, ys: np.ndarray, key: int) -> np.ndarray:
    moisture = fbm(xs, ys, 9_000, 5, key + 10) + 0.15 * np.clip(1 - elev / 600, 0, 1)
    urban_field = fbm(xs, ys, 4_000, 4, key + 11)
    snowline = 2300 + 300 * (fbm(xs, ys, 5_000, 2, key + 12) - 0.5)
    slope_deg = np.degrees(np.arccos(np.clip(nz, -1, 1)))
    lc = np.full(elev.shape, GRASS, dtype=np.uint8)
    lc[(moisture > 0.3) & (elev < 500) & (slope_deg < 6)] = CROP
    lc[(moisture > 0.55) & (slope_deg < 25) & (elev < 1900)] = FOREST
    lc[(urban_field > 0.66) & (elev < 400) & (slope_deg < 6)] = URBAN
    lc[(slope_deg > 25) | ((elev > 1900) & (moisture < 0.6))] = BARE
    lc[elev > snowline] = SNOW
    lc[elev <= 0] = WATER
    return lc


def _surface_modulation(lc: np.ndarray, xs: np.ndarray, ys: np.ndarray, illum: np.ndarray, key: int):
    """Per-pixel factors shared by all bands: crop greenness (1 outside crops) and
    texture x illumination."""
    # crop parcels: each ~300 x 200 m field has its own phenology (green crop .. bare soil)
    px = np.floor(xs / 300.0).astype(np.int64)
    py = np.floor(ys / 200.0).astype(np.int64)
    parcel = hash01(px[None, :], py[:, None], key + 21)
    greenness = np.where(lc == CROP, parcel, 1.0).astype(np.float32)
    texture = 1 + 0.2 * (fbm(xs, ys, 120, 3, key + 22) - 0.5)
    lit = np.where(lc == WATER, 1.0, illum) * texture
    return greenness, lit.astype(np.float32)


def _clouds(xs, ys, fraction: float, key: int) -> np.ndarray:
    """Cloud mask 0 clear, 1 thick, 2 thin, 3 shadow for a target cloud fraction."""
    mask = np.zeros((len(ys), len(xs)), dtype=np.uint8)
    if fraction <= 0:
        return mask
    field = fbm(xs, ys, 2_500, 5, key + 30)
    thin_level = np.quantile(field, 1 - fraction)
    thick_level = np.quantile(field, 1 - 0.55 * fraction)
    cloudy = field >= thin_level
    shadow = np.roll(np.roll(cloudy, 35, axis=0), -25, axis=1)  # sun from the south-east
    mask[shadow & ~cloudy] = 3
    mask[cloudy] = 2
    mask[field >= thick_level] = 1
    return mask


def _to_dn(refl: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(refl * 10_000), 1, 65535).astype(np.uint16)


def _to_native(band: str, refl10: np.ndarray, valid_at: dict[int, np.ndarray]) -> np.ndarray:
    """10 m reflectance of one band -> DN at the band's native resolution (block mean);
    ``valid_at[k]`` is the valid-pixel mask at k x 10 m."""
    k = round(_S2.band(band).resolution_m / RES)
    dn = _to_dn(refl10 if k == 1 else _block_mean(refl10, k))
    dn[~valid_at[k]] = 0
    return dn


def make_scene(box: ProductBox, world_key: int, acq: Acquisition) -> Scene:
    """All rasters of one cell from its product box (UTM metres) and acquisition choices."""
    xs = box.west + (np.arange(PX) + 0.5) * RES  # pixel-centre eastings
    ys = box.north - (np.arange(PX) + 0.5) * RES  # pixel-centre northings (rows go south)
    elev = terrain(xs, ys, world_key)
    nx, ny, nz = _slope_aspect(elev)
    lc = landcover(elev, nz, xs, ys, world_key)
    dem = np.maximum(elev, 0.0)  # the Copernicus DEM holds 0 over the sea

    # sun from the south-south-east, 30 degrees up (a mid-latitude morning overpass)
    az, alt = np.radians(150), np.radians(30)
    sun = np.array([np.sin(az) * np.cos(alt), np.cos(az) * np.cos(alt), np.sin(alt)])
    cos_i = nx * sun[0] + ny * sun[1] + nz * sun[2]
    illum = np.clip(cos_i / sun[2], 0.1, 1.9)
    greenness, lit = _surface_modulation(lc, xs, ys, illum, world_key)

    # S2 acquisition: clouds, swath edge; bands one at a time (float32) to bound memory
    cloud = _clouds(xs, ys, acq.cloud_fraction, world_key + acq.speckle_seed)
    valid = np.ones((PX, PX), dtype=bool)
    if acq.s2_swath_edge is not None:
        r, c = np.mgrid[0:PX, 0:PX]
        valid = (r + 0.35 * c) / PX < 1.35 - acq.s2_swath_edge
    valid_at = {k: valid if k == 1 else _block_mean(valid.astype(np.float32), k) > 0.5 for k in (1, 2, 6)}
    keep = np.select([cloud == 1, cloud == 2, cloud == 3], [0.0, 0.55, 0.35], 1.0).astype(np.float32)
    cloud_add = np.select([cloud == 1, cloud == 2], [1.0, 0.45], 0.0).astype(np.float32)
    bare = _SPECTRA[BARE] * 0.8
    l2a, l1c = {}, {}
    for i, name in enumerate(S2_BANDS):
        table = _SPECTRA[:, i].astype(np.float32)
        surface = table[lc]
        surface = (greenness * surface + (1 - greenness) * np.float32(bare[i])) * lit
        toa_surface = surface * keep + cloud_add * np.float32(_CLOUD[i])
        if name != "B10":
            l2a[name] = _to_native(name, toa_surface, valid_at)
        if name == "B10":
            toa = 0.002 + 0.05 * (cloud == 2) + 0.02 * (cloud == 1)
        else:
            toa = toa_surface * np.float32(_TRANS[i]) + np.float32(acq.aerosol * _PATH[i])
        l1c[name] = _to_native(name, toa, valid_at)
    cloud_mask = np.where(valid, cloud, 0).astype(np.uint8)

    # S1: land-cover backscatter, slope toward the radar, wind on water, speckle
    look_east = 1.0 if acq.s1_ascending else -1.0  # right-looking: ascending looks east
    to_sensor = np.array([-look_east * np.sin(np.radians(38)), 0.0, np.cos(np.radians(38))])
    facing = nx * to_sensor[0] + nz * to_sensor[2] - to_sensor[2]
    sig_db = _SIGMA_DB[lc]  # (H, W, 2)
    wind = 4.0 * (fbm(xs, ys, 3_000, 3, world_key + acq.speckle_seed + 40) - 0.5)
    topo = 12.0 * facing
    rng = np.random.default_rng(acq.speckle_seed)
    # bright point scatterers: dense in towns, rare elsewhere on land (corner reflections)
    p_bright = np.where(lc == URBAN, 0.04, np.where(lc == WATER, 0.0, 2e-4))
    bright = np.where(rng.random((PX, PX)) < p_bright, rng.uniform(8.0, 22.0, (PX, PX)), 0.0)
    topo = topo + bright
    looks = 4.4
    speckle = rng.gamma(looks, 1 / looks, size=(2, PX, PX))
    vv = (10 ** ((sig_db[..., 0] + topo + np.where(lc == WATER, wind, 0)) / 10) * speckle[0]).astype(np.float32)
    vh = (10 ** ((sig_db[..., 1] + topo + np.where(lc == WATER, wind, 0)) / 10) * speckle[1]).astype(np.float32)
    if acq.s1_edge is not None:
        cut = np.arange(PX) < int(acq.s1_edge * PX)
        cols = cut[None, :] if acq.s1_ascending else cut[None, ::-1]
        vv[:, cols[0]] = -32768.0
        vh[:, cols[0]] = -32768.0

    return Scene(
        elevation=elev.astype(np.float32),
        dem30=_block_mean(dem, 3).astype(np.float32),
        landcover=lc,
        l2a=l2a,
        l1c=l1c,
        cloud_mask=cloud_mask,
        s2_valid=valid,
        vv=vv,
        vh=vh,
    )
