"""The ``majortom-gen`` command line: parse, call the library, print. One module per command
group; :mod:`pipelines.cli.common` holds the app and what the commands share. Importing
the package registers every command."""

# the commands register in this order, the order of the help listing (the workflow's)
from pipelines.cli import world  # noqa: F401, I001
from pipelines.cli import store  # noqa: F401
from pipelines.cli import model  # noqa: F401
from pipelines.cli import generate  # noqa: F401
from pipelines.cli import evaluate  # noqa: F401
from pipelines.cli import demo  # noqa: F401
from pipelines.cli.common import app


def main() -> None:  # pragma: no cover - console-script shim
    app()


__all__ = ["app", "main"]
