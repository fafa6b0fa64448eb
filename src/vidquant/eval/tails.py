"""The report's activation-tail panel: the layer inputs whose calibration max sits furthest above their p99.9."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..calib.stats import CalibStats, token_bucket_edges
from .report import ActivationTail

TAIL_PERCENTILE = 99.9


@dataclass
class TailRow:
    """One distinct layer input: its largest ``max |x| / p99.9`` over channels and what it is made of."""

    ratio: float
    expert: str
    observer: str
    absmax: Tensor
    percentile: Tensor


def tail_rows(stats: CalibStats) -> list[TailRow]:
    """Every distinct layer input, longest tail first (the tails percentile masks clip)."""
    rows = []
    for expert in stats.experts():
        for name in stats.inputs[expert]:
            absmax, pct = stats.absmax(expert, name), stats.percentile(expert, name, TAIL_PERCENTILE)
            rows.append(TailRow(float((absmax / pct.clamp(min=1e-30)).max()), expert, name, absmax, pct))
    return sorted(rows, key=lambda r: -r.ratio)


def worst_tails(stats: CalibStats, count: int = 4) -> list[ActivationTail]:
    """The report's panel: the ``count`` layer inputs with the longest tails, with their per-token histograms."""
    edges = token_bucket_edges()
    return [ActivationTail(layer=r.observer, expert=r.expert, absmax=r.absmax.numpy(), percentile=r.percentile.numpy(),
                           token_counts=stats.inputs[r.expert][r.observer].token_absmax.sum((0, 1)).numpy(),
                           token_edges=edges)
            for r in tail_rows(stats)[:count]]
