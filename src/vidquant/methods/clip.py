"""Activation clip-ratio search per timestep bin (timestep-aware SVDQuant-GPTQ, arXiv 2605.27003, § method 3).

Activations of a video DiT change across the denoising trajectory, so one clip ratio per layer is a
compromise; the paper searches a ratio per layer, per timestep bin and per expert, minimizing the
layer-output MSE on that bin's calibration inputs. The ratio clamps every token to ±ratio · its own max
|x·m| before activation quantization (`smoothing.quantize_input`): a smaller ratio trades the error of
the few largest values for a finer grid for all the others.

A ratio chosen on the calibration rows is a fit, so `choose_clip` verifies it on held-out rows of the same
bin (rows the search did not see) and falls back to 1.0 (no clipping) when it does not beat 1.0 there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def clip_search(
    x: Tensor, reference: Tensor, output: Callable[[Tensor, float], Tensor], grid: Sequence[float]
) -> tuple[float, list[float]]:
    """The ratio of ``grid`` whose quantized ``output(x, ratio)`` is closest (MSE) to ``reference``, and every MSE.

    ``output`` is the fake-quantized layer with activation clip ``ratio``; ``reference`` its unquantized
    output on ``x``. Ties go to the larger ratio (less clipping). MSEs are accumulated in float64.
    """
    if not grid:
        raise ValueError("clip_search: the grid of ratios is empty")
    errors = []
    for ratio in grid:
        diff = output(x, ratio).to(torch.float64) - reference.to(torch.float64)
        errors.append(float(diff.square().mean()))
    best = min(range(len(grid)), key=lambda i: (errors[i], -grid[i]))
    return float(grid[best]), errors


@dataclass(frozen=True)
class ClipChoice:
    """A bin's clip ratio after the held-out check, with the evidence for it."""

    ratio: float  # the ratio kept
    searched: float  # the ratio the calibration rows chose
    held_out_gain_db: float | None  # held-out output SQNR of ``searched`` over no clipping (None: no held-out rows)
    fell_back: bool  # the searched ratio did not beat 1.0 on the held-out rows, so 1.0 is kept


def choose_clip(
    x: Tensor,
    reference: Tensor,
    output: Callable[[Tensor, float], Tensor],
    grid: Sequence[float],
    held_out: Tensor | None = None,
    held_out_reference: Tensor | None = None,
) -> ClipChoice:
    """`clip_search` on ``x``, then the chosen ratio verified on ``held_out`` (its unquantized output
    ``held_out_reference``): kept if its held-out MSE is below that of 1.0, else 1.0."""
    searched, _ = clip_search(x, reference, output, grid)
    if held_out is None or held_out.shape[0] == 0 or searched == 1.0:
        return ClipChoice(searched, searched, None if held_out is None or searched != 1.0 else 0.0, False)
    if held_out_reference is None:
        raise ValueError("choose_clip: held_out rows need their reference output")
    ref = held_out_reference.to(torch.float64)
    mse = {r: float((output(held_out, r).to(torch.float64) - ref).square().mean()) for r in (searched, 1.0)}
    if mse[searched] > 0 and mse[1.0] > 0:
        gain = 10 * math.log10(mse[1.0] / mse[searched])
    else:  # an exact output on one side
        gain = 0.0 if mse[searched] == mse[1.0] else math.inf if mse[searched] == 0 else -math.inf
    keep = mse[searched] < mse[1.0]
    return ClipChoice(searched if keep else 1.0, searched, gain, not keep)
