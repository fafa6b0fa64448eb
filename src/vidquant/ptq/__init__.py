"""From statistics and a recipe to a PTQ state: the generic wiring; each method is a registered unit.

    >>> state = vidquant.quantize(model_or_pipe, "tail-aware-hif4", stats, forward_loop=loop)
    >>> vidquant.apply(model_or_pipe, state); state.save("state/")

Which Linears are quantized is decided first (`recipes.plan`: include / protect patterns, protected blocks),
before any weight is touched; each quantized Linear gets the recipe's smoothing mask (`ptq.masks`); then the
recipe's method (`ptq.registry`: ``smoothquant``, ``svdquant-gptq``, ...) makes each layer's state.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

from .. import dist
from ..calib.capture import capture_calls
from ..calib.data import ForwardLoop, calibration_data, is_prompts
from ..calib.stats import CalibStats
from ..eval.blocks import block_sensitivity, trajectory_sensitivity
from ..eval.fidelity import HELD_OUT_SEED_OFFSET
from ..eval.probes import weight_bytes
from ..models import adapter_for, split_name
from ..recipes import Recipe, load_recipe, plan
from ..state import PTQState, checkpoint_of, load_state, remove_state
from .masks import layer_mask
from .registry import Method, QuantizeRun, method_class, method_names, register_method

__all__ = ["Method", "QuantizeRun", "method_class", "method_names", "quantize", "quantize_into", "register_method"]

logger = logging.getLogger(__name__)

DEFAULT_HESSIAN_BUDGET_GB = 16.0
AUTO_PROMPTS = 2  # held-out prompts (calibration prompts, other seeds) whose expert calls rank the blocks
AUTO_CALLS = 8  # replayed calls per expert: one forward each per block
AUTO_TRAJECTORY_CANDIDATES = 16  # auto_sensitivity: trajectory: blocks measured by whole denoising runs


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
    if method.needs_layer_inputs or recipe.auto_protect:
        run.data, run.settings = calibration_data(stats, prompts, forward_loop)
    if recipe.auto_protect and recipe.auto_sensitivity == "trajectory" and not is_prompts(run.data):
        raise ValueError(f"recipe '{recipe.name}': auto_sensitivity: trajectory runs whole denoising trajectories, "
                         "so it needs a video pipeline calibrated on prompts (use auto_sensitivity: call)")
    layers, bins = method.quantize(run)
    state = PTQState(layers, **header, timestep_bins=bins)
    return _auto_protect(run, state) if recipe.auto_protect else state


def quantize_into(
    model: Any,
    recipe: Recipe,
    stats: CalibStats | None,
    out: str | Path,
    *,
    prompts: list[str] | None = None,
    progress: bool = True,
    hessian_budget_gb: float = DEFAULT_HESSIAN_BUDGET_GB,
) -> PTQState:
    """`quantize` into the state folder ``out``, finished layers kept in its checkpoint for a rerun (removed once
    the state is saved); the state, on every rank.

    Under torchrun a method that deals its layers (`Method.deals_layers`: svdquant-gptq) runs on every rank, each
    on its share, exchanged through per-rank checkpoints; any other method runs on rank 0 alone (it is cheap)
    while the others wait. Rank 0 saves the state; the other ranks then load it from ``out``.
    """
    deals = method_class(recipe.method).deals_layers
    state: PTQState | None = None
    partial = checkpoint_of(out)

    def save() -> None:
        nonlocal state
        if state is None:
            state = quantize(model, recipe, stats, prompts=prompts, progress=progress, checkpoint=partial,
                             hessian_budget_gb=hessian_budget_gb)
        state.save(out)
        for path in dist.rank_paths(partial):  # every rank has read them (`quantize` ends on a barrier)
            remove_state(path)

    if deals and dist.world() > 1:
        state = quantize(model, recipe, stats, prompts=prompts, progress=progress, checkpoint=partial,
                         hessian_budget_gb=hessian_budget_gb)
    dist.on_main(save)
    return state if state is not None else load_state(out)


def _auto_protect(run: QuantizeRun, state: PTQState) -> PTQState:
    """``protect_blocks: auto``: measure every block's sensitivity under the all-blocks ``state`` on held-out
    calls (the first `AUTO_PROMPTS` calibration prompts under held-out seeds), let `recipes.choose_blocks` pick
    within the budget, and drop the chosen blocks' layers from the state (the plan records why)."""
    data = run.data[:AUTO_PROMPTS] if is_prompts(run.data) else run.data
    calls = capture_calls(run.model, data, run.settings, AUTO_CALLS, seed_offset=HELD_OUT_SEED_OFFSET)
    measured = block_sensitivity(run.model, state, calls, progress=run.progress)
    sensitivity = {expert: s["blocks"] for expert, s in measured.items()}
    if run.recipe.auto_sensitivity == "trajectory":
        sensitivity = _trajectory_sensitivity(run, state, data, sensitivity)
    final = plan(run.adapter, run.recipe, sensitivity=sensitivity)
    logger.info("protect_blocks auto:\n%s", final.summary())
    layers = {name: layer for name, layer in state.layers.items() if name in set(final.quantized)}
    return PTQState(layers, **_header(run.adapter, run.recipe, run.stats, final), timestep_bins=state.timestep_bins)


def _trajectory_sensitivity(run: QuantizeRun, state: PTQState, prompts: list[str],
                            by_call: dict[str, list[float]]) -> dict[str, list[float]]:
    """``auto_sensitivity: trajectory``: the `AUTO_TRAJECTORY_CANDIDATES` blocks most sensitive on one call are
    measured again over whole held-out denoising runs (`eval.blocks.trajectory_sensitivity`: the final latents'
    error, which sees a block's error compound over the steps); a block left out (a deep model: 80 pairs at A14B)
    keeps its one-call value scaled by the median ratio of the two measures over the candidates."""
    pairs = sorted(((v, e, b) for e, values in by_call.items() for b, v in enumerate(values)), key=lambda p: -p[0])
    candidates: dict[str, list[int]] = {}
    for _, expert, block in pairs[:AUTO_TRAJECTORY_CANDIDATES]:
        candidates.setdefault(expert, []).append(block)
    measured = trajectory_sensitivity(run.model, state, prompts, run.settings, HELD_OUT_SEED_OFFSET, candidates,
                                      progress=run.progress)
    ratios = [measured[e]["blocks"][b] / by_call[e][b] for e, blocks in candidates.items() for b in blocks
              if by_call[e][b] > 0]
    scale = statistics.median(ratios) if ratios else 1.0
    return {e: [measured[e]["blocks"][b] if b in candidates.get(e, []) else v * scale for b, v in enumerate(values)]
            for e, values in by_call.items()}


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
