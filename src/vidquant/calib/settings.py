"""What a calibration run is: the generation protocol it samples, how many prompts, and how statistics are keyed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..eval.protocol import Protocol

TAIL_KEYS = ("total", "bin_branch")
MAX_BINS = 64  # timestep bins per expert: statistics and samples grow with them


class CalibSettings(Protocol):
    """The generation protocol of the calibration run, plus how much to run and how to key statistics."""

    num_prompts: int = Field(16, ge=1)
    bins: int = Field(4, ge=1, le=MAX_BINS)
    tail_keys: Literal[TAIL_KEYS] = "total"  # type: ignore[valid-type]
