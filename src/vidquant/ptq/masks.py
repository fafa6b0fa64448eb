"""The recipe's smoothing masks (and input rotations) per layer: statistics in, `methods` math out."""

from __future__ import annotations

from torch import Tensor, nn

from ..calib.stats import CalibStats
from ..methods.smoothing import channel_mask, weight_channel_max
from ..nn.hadamard import HadamardRotation, rotation_tensors
from ..recipes import Recipe


def layer_mask(recipe: Recipe, stats: CalibStats | None, expert: str, layer: str, linear: nn.Linear) -> Tensor | None:
    """The recipe's SmoothQuant mask of one Linear (Eq. 8 with a = the max or the guarded p-th percentile of |x|;
    None without smoothing)."""
    s = recipe.smoothing
    if s.statistic == "none":
        return None
    if stats is None:
        raise ValueError(f"recipe '{recipe.name}' smooths with calibration statistics: pass them (--stats)")
    tail_aware = s.statistic == "percentile"
    a = stats.activation_range(expert, layer, s.percentile if tail_aware else 100.0,
                               s.max_ratio if tail_aware else None)
    weight = linear.weight
    return channel_mask(weight_channel_max(weight), a.to(weight.device), s.alpha, s.eps)


def layer_rotation(recipe: Recipe, name: str, linear: nn.Linear) -> dict[str, Tensor]:
    """The recipe's Hadamard rotation of one Linear's input as state tensors (`nn.hadamard`; {} without one).

    Every method stores these with the layer and fits (low-rank, GPTQ) on the rotated weight and Hessian.
    """
    r = recipe.rotation
    if r is None:
        return {}
    return rotation_tensors(linear.in_features, r.block, r.seed, where=f"layer {name}")


def rotate_fit(rotation: dict[str, Tensor], weight: Tensor, hessian: Tensor, rows: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """What a method fits in the rotated basis: ``W R`` (rows of the folded weight), ``R^T H R`` and input rows
    ``x R`` (held-out rows, already smoothed); all as given without a rotation (`layer_rotation`'s tensors)."""
    part = HadamardRotation.from_tensors(rotation, weight.device)
    if part is None:
        return weight, hessian, rows
    return part.fold(weight), part.fold_hessian(hessian.to(weight.device)), None if rows is None else part(rows)
