"""From statistics and a recipe to a PTQ state (the wiring; the math lives in `vidquant.methods`).

    >>> state = vidquant.quantize(pipe, "tail-aware-hif4", load_stats("stats/"))
    >>> vidquant.apply(pipe, state); state.save("state/")
"""

from __future__ import annotations

import logging

import torch
from rich.progress import track

from .calib.stats import CalibStats
from .eval.probes import weight_bytes
from .methods.smoothing import activation_range, channel_mask, weight_channel_max
from .models import wan
from .recipes import Recipe, load_recipe, plan
from .state import LayerState, PTQState

logger = logging.getLogger(__name__)


def quantize(pipe, recipe: Recipe | str, stats: CalibStats | None, *, progress: bool = False) -> PTQState:
    """The PTQ state of ``pipe`` under ``recipe``, from its calibration ``stats``; ``pipe`` is not changed.

    Which Linears are quantized is decided first (`recipes.plan`: include / protect patterns, protected
    blocks), before any weight is touched; then each quantized Linear gets its smoothing mask (Eq. 8 of the
    tail-aware paper, with a = the calibration max or the p-th percentile of |x|, guarded by ``max_ratio``).
    """
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    smoothing = recipe.smoothing
    if smoothing.statistic != "none":
        if stats is None:
            raise ValueError(f"recipe '{recipe.name}' smooths with {smoothing.statistic} statistics: pass --stats")
        fingerprint = wan.fingerprint(pipe)
        if stats.meta["model_fingerprint"] != fingerprint:
            raise ValueError("these statistics were calibrated on another model (weights or dtype differ): "
                             f"{stats.meta['model_fingerprint'][:12]} vs {fingerprint[:12]}")
    the_plan = plan(pipe, recipe)
    logger.info("%s", the_plan.summary())
    experts = wan.experts(pipe)
    layers = {}
    for name in track(the_plan.quantized, description="quantizing", disable=not progress):
        expert, layer = name.split(".", 1)
        weight = experts[expert].get_submodule(layer).weight
        mask = None
        if smoothing.statistic != "none":
            tail_aware = smoothing.statistic == "percentile"
            a = activation_range(stats, expert, layer, smoothing.percentile if tail_aware else 100.0,
                                 smoothing.max_ratio if tail_aware else None)
            mask = channel_mask(weight_channel_max(weight), a.to(weight.device), smoothing.alpha, smoothing.eps)
        clip = None if recipe.act_clip is None else torch.tensor(recipe.act_clip, dtype=torch.float32)
        layers[name] = LayerState(recipe.weights, recipe.activations, wan.tensor_sha256(weight), mask, clip)
    base = {
        "config_sha256": wan.config_fingerprint(pipe),
        "stats_model_fingerprint": None if stats is None else stats.meta["model_fingerprint"],
        "transformer_bf16_bytes": weight_bytes(pipe).bf16,
    }
    return PTQState(layers, recipe.to_dict(), base, the_plan.to_dict())
