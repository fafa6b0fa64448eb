"""`python -m vidquant` runs the CLI (torchrun launches it this way)."""

from .cli import app

app()
