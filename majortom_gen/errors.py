"""One exception root for the project, with specific subclasses.

Every message names the item at fault and what to change, so the CLI can print it as a
single line.
"""


class MajorTomGenError(Exception):
    """Root of every error raised on purpose by majortom-gen."""


class InvalidCellIdError(MajorTomGenError, ValueError):
    """A grid cell id is malformed or names a row/column that does not exist."""


class OutsideGridError(MajorTomGenError, ValueError):
    """A coordinate lies outside the grid's lattice (or is not a finite number)."""


class RegionError(MajorTomGenError, ValueError):
    """A region (polygon, bbox, WKT, vector file) is empty, invalid or unreadable."""


class UnknownModalityError(MajorTomGenError, ValueError):
    """A modality name is not in the registry."""


class MetadataError(MajorTomGenError):
    """A metadata table lacks columns or holds values that cannot be parsed."""


class ShardError(MajorTomGenError):
    """An image shard or one of its row groups cannot be read."""


class DecodeError(MajorTomGenError):
    """Bytes in an image column are not the GeoTIFF/PNG/JPEG they should be."""


class StoreError(MajorTomGenError):
    """The store is missing, inconsistent, or asked to mix codecs."""
