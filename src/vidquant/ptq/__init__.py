"""From statistics and a recipe to a PTQ state (the wiring; the math lives in `vidquant.methods`).

    >>> state = vidquant.quantize(pipe, "tail-aware-hif4", load_stats("stats/"))
    >>> vidquant.apply(pipe, state); state.save("state/")

Method ``smoothquant`` needs only the statistics (masks and a fixed clip); method ``svdquant-gptq`` also
runs the pipeline again on the calibration prompts to collect each layer's Hessian and per-timestep-bin
inputs (`svdquant_gptq`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from rich.progress import track
from torch import Tensor, nn

from ..calib.calibrate import CalibSettings
from ..calib.prompts import default_prompts, prompt_set_hash
from ..calib.stats import CalibStats
from ..checksum import tensor_sha256
from ..eval.probes import weight_bytes
from ..methods.smoothing import activation_range, channel_mask, weight_channel_max
from ..models import wan
from ..recipes import Recipe, load_recipe, plan
from ..state import LayerState, PTQState
from . import svdquant_gptq

logger = logging.getLogger(__name__)

DEFAULT_HESSIAN_BUDGET_GB = 16.0


def quantize(
    pipe,
    recipe: Recipe | str,
    stats: CalibStats | None,
    *,
    prompts: list[str] | None = None,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    hessian_budget_gb: float = DEFAULT_HESSIAN_BUDGET_GB,
) -> PTQState:
    """The PTQ state of ``pipe`` under ``recipe``, from its calibration ``stats``; ``pipe`` is not changed.

    Which Linears are quantized is decided first (`recipes.plan`: include / protect patterns, protected
    blocks), before any weight is touched; then each quantized Linear gets its smoothing mask (Eq. 8 of the
    tail-aware paper, with a = the calibration max or the p-th percentile of |x|, guarded by ``max_ratio``).
    For ``svdquant-gptq``: ``prompts`` are the calibration prompts the statistics were made from (default:
    the bundled ones; their hash must match), ``checkpoint`` a directory where finished layers are saved
    after every pass and picked up by a rerun, ``hessian_budget_gb`` the fp32 Hessians held at once.
    """
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.smoothing.statistic != "none" or recipe.method == "svdquant-gptq":
        _check_stats(pipe, recipe, stats)
    the_plan = plan(pipe, recipe)
    logger.info("%s", the_plan.summary())
    experts = wan.experts(pipe)
    masks = {}
    for name in the_plan.quantized:
        expert, layer = name.split(".", 1)
        masks[name] = layer_mask(recipe, stats, expert, layer, experts[expert].get_submodule(layer))
    header = _header(pipe, recipe, stats, the_plan)
    bins: dict[str, list[float]] = {}
    if recipe.method == "smoothquant":
        clip = None if recipe.act_clip is None else torch.tensor(recipe.act_clip, dtype=torch.float32)
        layers = {}
        for name in track(the_plan.quantized, description="quantizing", disable=not progress):
            expert, layer = name.split(".", 1)
            weight = experts[expert].get_submodule(layer).weight
            layers[name] = LayerState(recipe.weights, recipe.activations, tensor_sha256(weight), masks[name], clip)
    else:
        prompts = _calibration_prompts(stats, prompts)
        settings = CalibSettings.model_validate(stats.meta["settings"])
        layers, bins = svdquant_gptq.quantize_layers(
            pipe, recipe, masks, settings, prompts, header, progress=progress, checkpoint=checkpoint,
            hessian_budget_bytes=int(hessian_budget_gb * 2**30))
    return PTQState(layers, **header, timestep_bins=bins)


def layer_mask(recipe: Recipe, stats: CalibStats | None, expert: str, layer: str, linear: nn.Linear) -> Tensor | None:
    """The recipe's SmoothQuant mask of one Linear (None without smoothing)."""
    s = recipe.smoothing
    if s.statistic == "none":
        return None
    tail_aware = s.statistic == "percentile"
    a = activation_range(stats, expert, layer, s.percentile if tail_aware else 100.0,
                         s.max_ratio if tail_aware else None)
    weight = linear.weight
    return channel_mask(weight_channel_max(weight), a.to(weight.device), s.alpha, s.eps)


def _header(pipe, recipe: Recipe, stats: CalibStats | None, the_plan) -> dict:
    """Everything of a `PTQState` but its layers and bins."""
    base = {
        "config_sha256": wan.config_fingerprint(pipe),
        "stats_model_fingerprint": None if stats is None else stats.meta["model_fingerprint"],
        "stats_fingerprint": None if stats is None else stats.fingerprint(),  # what a rerun must match
        "transformer_bf16_bytes": weight_bytes(pipe).bf16,
    }
    return {"recipe": recipe.to_dict(), "base": base, "plan": the_plan.to_dict()}


def _check_stats(pipe, recipe: Recipe, stats: CalibStats | None) -> None:
    if stats is None:
        why = "takes its calibration protocol from" if recipe.method == "svdquant-gptq" else "smooths with"
        raise ValueError(f"recipe '{recipe.name}' {why} calibration statistics: pass --stats")
    fingerprint = wan.fingerprint(pipe)
    if stats.meta["model_fingerprint"] != fingerprint:
        raise ValueError("these statistics were calibrated on another model (weights or dtype differ): "
                         f"{stats.meta['model_fingerprint'][:12]} vs {fingerprint[:12]}")


def _calibration_prompts(stats: CalibStats, prompts: list[str] | None) -> list[str]:
    """The prompts the statistics were calibrated on (checked by hash), for the second calibration pass."""
    n = stats.meta["settings"]["num_prompts"]
    prompts = (default_prompts() if prompts is None else prompts)[:n]
    if prompt_set_hash(prompts) != stats.meta["prompt_set_hash"]:
        raise ValueError("these statistics were calibrated on other prompts than the ones given (prompt set hash "
                         "differs): pass the calibration prompts (--calib-prompts / --prompts) they were made from")
    return prompts
