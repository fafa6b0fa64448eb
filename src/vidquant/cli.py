"""The `vidquant` command line (typer)."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.table import Table

from . import __version__, formats

app = typer.Typer(add_completion=False, no_args_is_help=True, help=f"vidquant {__version__}: PTQ for video DiTs")
console = Console()


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command("formats")
def formats_cmd(long: bool = typer.Option(False, "--long", help="Also print each format's description.")) -> None:
    """Print the table of numeric formats."""
    table = Table(title="vidquant formats (vidquant formats --long adds descriptions)")
    for col in ("name", "bits/value", "block", "element", "scale", "max |value|"):
        table.add_column(col)
    for name in formats.names():
        f = formats.get(name)
        block = "row" if f.block_size is None else str(f.block_size)
        table.add_row(name, f"{f.bits_per_value:g}", block, f.element, f.scale, f"{f.max_value:.6g}")
    console.print(table)
    if long:
        for name in formats.names():
            console.print(f"[bold]{name}[/bold]: {formats.get(name).description}")
