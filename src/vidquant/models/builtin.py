"""The offline tiny models a user can name instead of a folder (``--model tiny``), and the loader for both.

Each is a real diffusers pipeline with random weights and planted activation outliers, built in well under a
second; `tiny_sizes` gives a frame size and count on its family's grid that generates fast on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vidquant.models.loading import load_pipeline


@dataclass(frozen=True)
class TinyModel:
    build: Callable[..., Any]
    sizes: dict[str, int]  # height, width, frames for calibration; runs may use larger ones on the same grid
    i2v: bool = False  # whether an image-to-video variant exists (``--i2v``)


def _wan(**kwargs: Any) -> Any:
    from vidquant.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(**kwargs)


def _wan21(**kwargs: Any) -> Any:
    from vidquant.models.tiny_wan21 import build_tiny_wan21_pipeline

    return build_tiny_wan21_pipeline(**kwargs)


def _cogvideox(**kwargs: Any) -> Any:
    from vidquant.models.tiny_cogvideox import build_tiny_cogvideox_pipeline

    return build_tiny_cogvideox_pipeline(**kwargs)


def _ltx(**kwargs: Any) -> Any:
    from vidquant.models.tiny_ltx import build_tiny_ltx_pipeline

    return build_tiny_ltx_pipeline(**kwargs)


TINY_MODELS: dict[str, TinyModel] = {
    "tiny": TinyModel(_wan, {"height": 32, "width": 32, "frames": 9}, i2v=True),  # Wan2.2 A14B layout
    "tiny-wan21": TinyModel(_wan21, {"height": 32, "width": 32, "frames": 9}, i2v=True),  # Wan2.1: 1 expert, 8 blocks
    "tiny-cogvideox": TinyModel(_cogvideox, {"height": 32, "width": 32, "frames": 9}),
    "tiny-ltx": TinyModel(_ltx, {"height": 32, "width": 32, "frames": 9}),
}


def tiny_sizes(model: str) -> dict[str, int] | None:
    """The default sizes of a tiny model's name (None: not a tiny model)."""
    tiny = TINY_MODELS.get(model)
    return None if tiny is None else dict(tiny.sizes)


def load_model(model: str, *, i2v: bool = False) -> Any:
    """A tiny model by name, or a pipeline of any registered family from a folder or hub id."""
    tiny = TINY_MODELS.get(model)
    if tiny is None:
        return load_pipeline(model, i2v=i2v or None)
    if i2v and not tiny.i2v:
        raise ValueError(f"--i2v: the tiny model '{model}' has no image-to-video variant")
    return tiny.build(i2v=True) if i2v else tiny.build()
