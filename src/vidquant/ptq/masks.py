"""The recipe's smoothing masks per layer: calibration statistics in, `methods.smoothing` math out."""

from __future__ import annotations

from torch import Tensor, nn

from ..calib.stats import CalibStats
from ..methods.smoothing import channel_mask, weight_channel_max
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
