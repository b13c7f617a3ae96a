"""``python -m pipelines.cli`` (e.g. ``accelerate launch -m pipelines.cli train ...``)."""

from pipelines.cli import app

app()
