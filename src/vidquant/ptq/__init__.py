"""From statistics and a recipe to a PTQ state: the generic wiring; each method is a registered unit.

    >>> state = vidquant.quantize(model_or_pipe, "tail-aware-hif4", stats, forward_loop=loop)
    >>> vidquant.apply(model_or_pipe, state); state.save("state/")

Which Linears are quantized is decided first (`recipes.plan`: include / protect patterns, protected blocks),
before any weight is touched; each quantized Linear gets the recipe's smoothing mask (`ptq.masks`); then the
recipe's method (`ptq.registry`: ``smoothquant``, ``svdquant-gptq``, ...) makes each layer's state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..calib.calibrate import CalibSettings
from ..calib.data import ForwardLoop, is_prompts
from ..calib.prompts import default_prompts, prompt_set_hash
from ..calib.stats import CalibStats
from ..eval.probes import weight_bytes
from ..models import adapter_for, split_name
from ..recipes import Recipe, load_recipe, plan
from ..state import PTQState
from .masks import layer_mask
from .registry import Method, QuantizeRun, method_class, method_names, register_method

__all__ = ["Method", "QuantizeRun", "method_class", "method_names", "quantize", "register_method"]

logger = logging.getLogger(__name__)

DEFAULT_HESSIAN_BUDGET_GB = 16.0


def quantize(
    model: Any,
    recipe: Recipe | str,
    stats: CalibStats | None = None,
    *,
    forward_loop: ForwardLoop | None = None,
    prompts: list[str] | None = None,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    hessian_budget_gb: float = DEFAULT_HESSIAN_BUDGET_GB,
) -> PTQState:
    """The PTQ state of ``model`` (a pipeline or any nn.Module) under ``recipe``; ``model`` is not changed.

    Methods that run the calibration data again (``svdquant-gptq``: Hessians, per-bin samples) take it from
    ``forward_loop`` for a plain module, or from ``prompts`` for a pipeline (default: the bundled prompts the
    statistics were made from; their hash must match). ``checkpoint``: a directory where finished layers are
    saved and picked up by a rerun; ``hessian_budget_gb``: the fp32 Hessians held at once.
    """
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    method: Method = method_class(recipe.method)()
    adapter = adapter_for(model)
    if method.needs_stats(recipe):
        _check_stats(adapter, recipe, method, stats)
    the_plan = plan(adapter, recipe)
    logger.info("%s", the_plan.summary())
    masks = {}
    for name in the_plan.quantized:
        expert, layer = split_name(name)
        masks[name] = layer_mask(recipe, stats, expert, layer, adapter.linear(name))
    header = _header(adapter, recipe, stats, the_plan)
    run = QuantizeRun(model, adapter, recipe, the_plan, stats, masks, header, progress=progress,
                      checkpoint=checkpoint, hessian_budget_bytes=int(hessian_budget_gb * 2**30))
    if method.needs_layer_inputs:
        run.data, run.settings = _calibration_data(adapter, stats, prompts, forward_loop)
    layers, bins = method.quantize(run)
    return PTQState(layers, **header, timestep_bins=bins)


def _header(adapter, recipe: Recipe, stats: CalibStats | None, the_plan) -> dict:
    """Everything of a `PTQState` but its layers and bins: what the state is made from."""
    base = {
        "config_sha256": adapter.config_fingerprint(),
        "model_family": adapter.family,
        "stats_model_fingerprint": None if stats is None else stats.meta["model_fingerprint"],
        "stats_fingerprint": None if stats is None else stats.fingerprint(),  # what a rerun must match
        "transformer_bf16_bytes": weight_bytes(adapter).bf16,
    }
    return {"recipe": recipe.to_dict(), "base": base, "plan": the_plan.to_dict()}


def _check_stats(adapter, recipe: Recipe, method: Method, stats: CalibStats | None) -> None:
    if stats is None:
        why = "takes its calibration protocol from" if method.needs_layer_inputs else "smooths with"
        raise ValueError(f"recipe '{recipe.name}' {why} calibration statistics: pass --stats")
    fingerprint = adapter.fingerprint()
    if stats.meta["model_fingerprint"] != fingerprint:
        raise ValueError("these statistics were calibrated on another model (weights or dtype differ): "
                         f"{stats.meta['model_fingerprint'][:12]} vs {fingerprint[:12]}")


def _calibration_data(adapter, stats: CalibStats, prompts: list[str] | None,
                      forward_loop: ForwardLoop | None) -> tuple[Any, CalibSettings]:
    """The data the statistics were calibrated on, checked by hash, for the method's second pass."""
    settings = CalibSettings.model_validate(stats.meta["settings"])
    if stats.meta.get("data_kind", "prompts") == "forward_loop":
        if forward_loop is None:
            raise ValueError("these statistics come from a forward loop: pass the same forward_loop to quantize")
        return forward_loop, settings
    if forward_loop is not None and not is_prompts(forward_loop):
        raise ValueError("these statistics were calibrated on prompts: pass the prompts, not a forward loop")
    n = settings.num_prompts
    prompts = (default_prompts() if prompts is None else list(prompts))[:n]
    if prompt_set_hash(prompts) != stats.meta["prompt_set_hash"]:
        raise ValueError("these statistics were calibrated on other prompts than the ones given (prompt set hash "
                         "differs): pass the calibration prompts (--calib-prompts / --prompts) they were made from")
    return prompts, settings
