"""majortom-gen core: the Major TOM grid, modalities, formats, thumbnails, sources and
the synthetic Major TOM world. Free of torch by design (see docs/architecture)."""

from majortom_gen.errors import MajorTomGenError

__all__ = ["MajorTomGenError"]
__version__ = "0.1.0"
