"""The registry of the four Major TOM Core modalities, declared as data.

One source of truth for modality names and order (DEM, S1RTC, S2L1C, S2L2A: the order of
COP-GEN-Beta's released checkpoint), hub datasets, shard and metadata columns, and each
band's resolution, size, dtype and nodata. Every product covers the same 10,680 m box
(see :mod:`majortom_gen.georef`), so ``size_px * resolution_m == 10680`` for every band.
"""

from __future__ import annotations

from dataclasses import dataclass

from majortom_gen.errors import UnknownModalityError

PRODUCT_BOX_M = 10_680.0  # side of a Core product's square footprint, metres
THUMBNAIL_PX = 1068  # side of an S1/S2 thumbnail (10 m); DEM thumbnails are 356 px (30 m)


@dataclass(frozen=True)
class Band:
    """One image column holding a single-band GeoTIFF."""

    name: str
    resolution_m: float  # pixel size, metres
    dtype: str  # numpy dtype name of the raster
    nodata: float | None
    description: str

    @property
    def size_px(self) -> int:
        """Raster side in pixels (square)."""
        return round(PRODUCT_BOX_M / self.resolution_m)


@dataclass(frozen=True)
class Modality:
    """A Core dataset: its hub repo, shard schema, bands and thumbnail rule."""

    name: str  # registry key and latent-store column name
    hub_repo: str  # Hugging Face dataset id
    shard_columns: tuple[str, ...]  # columns of images/part_*.parquet, in order
    bands: tuple[Band, ...]  # GeoTIFF columns
    metadata_columns: tuple[str, ...]  # columns of metadata.parquet, in order
    thumbnail_px: int  # thumbnail side in pixels
    thumbnail_mode: str  # PIL mode: "RGB" or "L"
    thumbnail_format: str  # how the Core dataset encodes it: "JPEG" or "PNG"
    thumbnail_rule: str  # human description of the visualisation (never physical values)
    aliases: tuple[str, ...] = ()

    def band(self, name: str) -> Band:
        for b in self.bands:
            if b.name == name:
                return b
        raise UnknownModalityError(f"{self.name} has no band {name!r}; bands: {', '.join(b.name for b in self.bands)}")

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    @property
    def hub_url(self) -> str:
        return f"https://huggingface.co/datasets/{self.hub_repo}/resolve/main"


def _s2_bands(level: str) -> tuple[Band, ...]:
    spec = [
        ("B01", 60, "coastal aerosol 443 nm"), ("B02", 10, "blue 490 nm"), ("B03", 10, "green 560 nm"),
        ("B04", 10, "red 665 nm"), ("B05", 20, "red edge 705 nm"), ("B06", 20, "red edge 740 nm"),
        ("B07", 20, "red edge 783 nm"), ("B08", 10, "NIR 842 nm"), ("B8A", 20, "narrow NIR 865 nm"),
        ("B09", 60, "water vapour 945 nm"), ("B10", 60, "cirrus 1375 nm"), ("B11", 20, "SWIR 1610 nm"),
        ("B12", 20, "SWIR 2190 nm"),
    ]
    kind = "surface reflectance x 10000 (L2A)" if level == "L2A" else "top-of-atmosphere reflectance x 10000 (L1C)"
    bands = tuple(
        Band(name, float(res), "uint16", 0.0, f"{desc}, {kind}")
        for name, res, desc in spec
        if not (level == "L2A" and name == "B10")
    )
    return bands + (Band("cloud_mask", 10.0, "uint8", None, "0 clear, 1 thick cloud, 2 thin cloud, 3 cloud shadow"),)


_COMMON_META = ("grid_cell", "grid_row_u", "grid_col_r")
_TAIL_META = ("centre_lat", "centre_lon", "crs", "parquet_url", "parquet_row")


def _s2(level: str) -> Modality:
    bands = _s2_bands(level)
    return Modality(
        name=f"S2{level}",
        hub_repo=f"Major-TOM/Core-S2{level}",
        shard_columns=("product_id", "grid_cell", "product_datetime", "thumbnail") + tuple(b.name for b in bands),
        bands=bands,
        metadata_columns=_COMMON_META + ("product_id", "timestamp", "cloud_cover", "nodata") + _TAIL_META,
        thumbnail_px=1068,
        thumbnail_mode="RGB",
        thumbnail_format="JPEG",
        thumbnail_rule="true colour [B04, B03, B02]: uint8(clip(1.3 * (DN/10000)**0.6, 0, 1) * 255)",
        aliases=(f"s2_{level.lower()}", f"s2{level.lower()}"),
    )


S1RTC = Modality(
    name="S1RTC",
    hub_repo="Major-TOM/Core-S1RTC",
    shard_columns=("product_id", "grid_cell", "product_datetime", "thumbnail", "vv", "vh"),
    bands=(
        Band("vv", 10.0, "float32", -32768.0, "VV backscatter, linear power (gamma0, RTC)"),
        Band("vh", 10.0, "float32", -32768.0, "VH backscatter, linear power (gamma0, RTC)"),
    ),
    metadata_columns=_COMMON_META + ("product_id", "timestamp", "nodata", "orbit_state") + _TAIL_META,
    thumbnail_px=1068,
    thumbnail_mode="RGB",
    thumbnail_format="PNG",
    thumbnail_rule="false colour R: VV dB, G: VV+VH, B: VH dB, each min-max scaled per image",
    aliases=("s1_rtc", "s1rtc", "s1"),
)

DEM = Modality(
    name="DEM",
    hub_repo="Major-TOM/Core-DEM",
    shard_columns=("grid_cell", "thumbnail", "compressed", "DEM"),
    bands=(Band("DEM", 30.0, "float32", -32768.0, "elevation, metres (Copernicus DEM GLO-30)"),),
    metadata_columns=_COMMON_META + ("nodata", "min_val", "max_val") + _TAIL_META,
    thumbnail_px=356,
    thumbnail_mode="L",
    thumbnail_format="PNG",
    thumbnail_rule="hillshade, matplotlib LightSource(azdeg=315, altdeg=45), per-image contrast",
    aliases=("dem", "cop_dem", "copdem"),
)

#: Registry in the canonical order (COP-GEN-Beta's modality order: dem, s1_rtc, s2_l1c, s2_l2a).
MODALITIES: dict[str, Modality] = {m.name: m for m in (DEM, S1RTC, _s2("L1C"), _s2("L2A"))}
MODALITY_NAMES: tuple[str, ...] = tuple(MODALITIES)


def get_modality(name: str) -> Modality:
    """Look a modality up by name (``'S2L2A'``) or alias (``'s2_l2a'``, case-insensitive)."""
    if isinstance(name, Modality):
        return name
    key = str(name).strip()
    if key in MODALITIES:
        return MODALITIES[key]
    low = key.lower()
    for m in MODALITIES.values():
        if low == m.name.lower() or low in m.aliases or low == m.hub_repo.lower().split("/")[-1].lower().removeprefix("core-"):
            return m
    raise UnknownModalityError(f"unknown modality {name!r}; valid modalities: {', '.join(MODALITY_NAMES)}")


def parse_modalities(names: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``'dem, S1RTC'`` or ``['dem', 'S1RTC']`` -> canonical names in registry order, no repeats."""
    items = [n for n in (names.split(",") if isinstance(names, str) else names) if str(n).strip()]
    if not items:
        raise UnknownModalityError(f"no modality given; valid modalities: {', '.join(MODALITY_NAMES)}")
    chosen = {get_modality(n).name for n in items}
    return tuple(n for n in MODALITY_NAMES if n in chosen)
