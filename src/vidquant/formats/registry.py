"""The format registry: one `Format` value object per name."""

from __future__ import annotations

from .base import Format

_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add ``fmt`` under its name (names are unique)."""
    if fmt.name in _FORMATS:
        raise ValueError(f"format '{fmt.name}' is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    """The format called ``name`` (see `names`)."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format '{name}'; known formats: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered format names, in registration order."""
    return list(_FORMATS)
