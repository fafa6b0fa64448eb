"""The report's activation-tail panel: the layer inputs whose calibration max sits furthest above their p99.9."""

from __future__ import annotations

from ..calib.stats import CalibStats, token_bucket_edges
from .report import ActivationTail

TAIL_PERCENTILE = 99.9


def worst_tails(stats: CalibStats, count: int = 4) -> list[ActivationTail]:
    """The ``count`` layer inputs with the largest ``max |x| / p99.9`` over channels (the tails masks clip)."""
    scored = []
    for expert in stats.experts():
        for name, obs in stats.inputs[expert].items():
            absmax, pct = stats.absmax(expert, name), stats.percentile(expert, name, TAIL_PERCENTILE)
            ratio = float((absmax / pct.clamp(min=1e-30)).max())
            scored.append((ratio, expert, name, absmax, pct, obs.token_absmax.sum((0, 1))))
    scored.sort(key=lambda t: -t[0])
    edges = token_bucket_edges()
    return [ActivationTail(layer=name, expert=expert, absmax=absmax.numpy(), percentile=pct.numpy(),
                           token_counts=counts.numpy(), token_edges=edges)
            for _, expert, name, absmax, pct, counts in scored[:count]]
