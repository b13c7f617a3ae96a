"""The packages' borders (docs/architecture.md): the core never imports torch or the model
package, even lazily inside a function; the model package never imports geography."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT = r"^\s*(?:from|import)\s+({})\b"


def offending(package: str, names: str) -> list[str]:
    pattern = re.compile(IMPORT.format(names), re.MULTILINE)
    return [f"{path.relative_to(ROOT)}: {m.group(0).strip()}"
            for path in sorted((ROOT / package).rglob("*.py")) for m in pattern.finditer(path.read_text())]


def test_core_imports_neither_torch_nor_model():
    assert offending("majortom_gen", "torch|torchvision|diffusers|model") == []


def test_model_imports_no_geography():
    assert offending("model", "majortom_gen\\.(?:grid|georef|regions|mosaic)|rasterio|pyproj|shapely|geopandas") == []
