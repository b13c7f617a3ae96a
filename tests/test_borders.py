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
    """model/ sees modalities and tensors only: nothing of the core, the glue or GIS libraries."""
    assert offending("model", "majortom_gen|pipelines|rasterio|pyproj|shapely|geopandas") == []


def test_core_imports_no_glue():
    """The core (grid, formats, store...) sits below the pipelines and the command line."""
    assert offending("majortom_gen", "pipelines") == []


def test_importing_every_core_module_loads_no_torch():
    """At run time too: no core module pulls torch in through a third package."""
    import subprocess
    import sys

    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "majortom_gen").rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(n for n in ('torch', 'diffusers', 'model', 'pipelines') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_core_commands_run_without_torch_and_the_others_say_what_to_install(tmp_path):
    """torch is the ``model`` extra: without it the core commands work and a model command
    names what to install (exit 2, no traceback)."""
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess:
        code = ("import sys; sys.modules['torch'] = None  # as if torch were not installed\n"
                f"sys.argv = ['majortom-gen', *{list(args)!r}]\n"
                "from pipelines.cli import app\napp()")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)

    located = run("grid", "locate", "--lat", "45.07", "--lon", "7.69")
    assert located.returncode == 0 and "501U_60R" in located.stdout, located.stderr[-2000:]
    synth = run("synth", "--cells", "501U_60R", "--out", str(tmp_path / "w"), "--modalities", "DEM", "--workers", "1")
    assert synth.returncode == 0, synth.stderr[-2000:]
    trained = run("train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"))
    assert trained.returncode == 2 and "majortom-gen[model]" in trained.stderr and "Traceback" not in trained.stderr
