"""Activation clip-ratio search per timestep bin (timestep-aware SVDQuant-GPTQ, arXiv 2605.27003, § method 3).

Activations of a video DiT change across the denoising trajectory, so one clip ratio per layer is a
compromise; the paper searches a ratio per layer, per timestep bin and per expert, minimizing the
layer-output MSE on that bin's calibration inputs. The ratio clamps every token to ±ratio · its own max
|x·m| before activation quantization (`smoothing.quantize_input`): a smaller ratio trades the error of
the few largest values for a finer grid for all the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
