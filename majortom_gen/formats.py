"""Decoders and encoders for the binary image columns of Major TOM shards.

Band columns hold whole single-band GeoTIFF files (read with a rasterio MemoryFile);
thumbnail columns hold PNG or JPEG files (detected by magic bytes, decoded with Pillow).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from PIL import Image, UnidentifiedImageError
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.io import MemoryFile

from majortom_gen.errors import DecodeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class Raster:
    """A single-band raster with its georeferencing.

    ``array`` is (rows, cols); ``crs`` is ``'EPSG:xxxx'``; ``transform`` maps pixel
    (col, row) to CRS coordinates (metres for UTM); ``nodata`` may be None."""

    array: np.ndarray
    crs: str | None
    transform: Affine
    nodata: float | None

    @property
    def resolution(self) -> float:
        return float(self.transform.a)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in CRS units."""
        h, w = self.array.shape
        west, north = self.transform @ (0, 0)
        east, south = self.transform @ (w, h)
        return (west, south, east, north)


def image_format(data: bytes) -> str:
    """'PNG', 'JPEG' or 'TIFF' from the magic bytes, else 'unknown'."""
    head = bytes(data[:8])
    if head.startswith(PNG_MAGIC):
        return "PNG"
    if head.startswith(JPEG_MAGIC):
        return "JPEG"
    if head[:4] in TIFF_MAGICS:
        return "TIFF"
    return "unknown"


def decode_geotiff(data: bytes, *, item: str = "band") -> Raster:
    """Decode single-band GeoTIFF bytes to a :class:`Raster`.

    ``item`` names what is decoded (e.g. ``'part_00001.parquet row group 3, column B04'``)
    for error messages."""
    if data is None or len(data) == 0:
        raise DecodeError(f"{item}: empty value where a GeoTIFF was expected")
    if image_format(data) != "TIFF":
        raise DecodeError(f"{item}: not a GeoTIFF (starts with {bytes(data[:8])!r}, detected {image_format(data)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with MemoryFile(bytes(data)) as mem, mem.open() as ds:
                array = ds.read(1)
                crs = ds.crs.to_string() if ds.crs is not None else None
                return Raster(array, crs, ds.transform, ds.nodata)
    except (RasterioIOError, rasterio.errors.RasterioError) as exc:
        raise DecodeError(f"{item}: unreadable GeoTIFF ({exc})") from exc


def encode_geotiff(
    array: np.ndarray,
    *,
    crs: str,
    transform: Affine,
    nodata: float | None = None,
    compress: str = "deflate",
    predictor: int | None = None,
    zlevel: int | None = None,
) -> bytes:
    """Encode a 2-D array as single-band GeoTIFF bytes (tiled 256 when large enough)."""
    if array.ndim != 2:
        raise ValueError(f"encode_geotiff takes a 2-D array, got shape {array.shape}")
    h, w = array.shape
    profile = dict(driver="GTiff", height=h, width=w, count=1, dtype=array.dtype.name, crs=crs,
                   transform=transform, nodata=nodata, compress=compress)
    if predictor is not None:
        profile["predictor"] = predictor
    if zlevel is not None:
        profile["zlevel"] = zlevel
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(array, 1)
        return bytes(mem.read())


def decode_thumbnail(data: bytes, *, item: str = "thumbnail") -> np.ndarray:
    """Decode PNG/JPEG thumbnail bytes to a read-only uint8 array, (H, W, 3) for RGB or
    (H, W) for greyscale.

    Truncated or corrupt files raise :class:`DecodeError` naming ``item``."""
    if data is None or len(data) == 0:
        raise DecodeError(f"{item}: empty value where a PNG/JPEG thumbnail was expected")
    kind = image_format(data)
    if kind not in ("PNG", "JPEG"):
        raise DecodeError(f"{item}: not a PNG or JPEG image (starts with {bytes(data[:8])!r})")
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()  # forces a full decode: truncated files fail here
            if img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8)  # read-only view of the decoded bytes
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DecodeError(f"{item}: corrupt or truncated {kind} ({exc})") from exc


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 (H, W) or (H, W, 3), or uint16 (H, W), as PNG bytes (zlib level 0-9)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """uint8 (H, W, 3) as JPEG bytes (the encoding of Core S2 thumbnails)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
