"""Timestep-aware SVDQuant-GPTQ W4A4 (arXiv 2605.27003): the wiring around `methods.lowrank`, `methods.gptq`
and `methods.clip`.

Per quantized Linear, on top of its SmoothQuant mask m (inputs x·m, weight W/m):

1. a rank-r branch ``up · down ≈ W/m`` in BF16, refined against the rounding it leaves (SVDQuant);
2. GPTQ on the residual ``W/m - up · down`` with the Hessian of the smoothed inputs, in the weight format;
3. per timestep bin of the layer's expert, the activation clip ratio with the least layer-output MSE on
   that bin's calibration inputs.

The Hessians and per-bin inputs come from running the pipeline again on the calibration prompts
(`calib.layer_inputs`), as many layer inputs per pass as ``hessian_budget_bytes`` allows (one pass on
the tiny model; at 14B each fp32 Hessian is 100 MB, 764 MB for the FFN's 13824 inputs). With
``sequential_experts`` the low-noise expert's inputs are collected with the high-noise expert already
quantized (ModelOpt's lesson for Wan2.2). Finished layers are saved to ``checkpoint`` after every pass,
and a rerun with the same recipe and model picks them up.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from .. import formats
from ..calib.calibrate import CalibSettings
from ..calib.layer_inputs import collect_layer_inputs, hessian_nbytes
from ..checksum import tensor_sha256
from ..methods.clip import clip_search
from ..methods.gptq import gptq
from ..methods.lowrank import refine_lowrank
from ..methods.smoothing import residual_weight, sqnr_db
from ..models import wan
from ..nn import swap
from ..outputs import check_output
from ..recipes import Recipe
from ..state import STATE_FILES, LayerState, PTQState, load_state, quant_linear

logger = logging.getLogger(__name__)

Groups = dict[str, list[list[str]]]  # per expert, groups of target Linears that read one input


def quantize_layers(
    pipe,
    recipe: Recipe,
    masks: dict[str, Tensor | None],
    settings: CalibSettings,
    prompts: list[str],
    header: dict,
    *,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    hessian_budget_bytes: int = 16 * 2**30,
) -> tuple[dict[str, LayerState], dict[str, list[float]]]:
    """`LayerState` of every layer in ``masks`` ("expert.layer" -> its mask), and the timestep-bin edges."""
    experts = wan.experts(pipe)
    edges = wan.expert_bin_edges(pipe, recipe.clip_search.bins)
    layers = _resume(checkpoint, header, edges, masks)
    todo = {
        expert: [g for group in wan.input_groups(model)
                 if (g := [n for n in group if f"{expert}.{n}" in masks and f"{expert}.{n}" not in layers])]
        for expert, model in experts.items()
    }
    passes = [[e] for e in experts] if recipe.sequential_experts else [list(experts)]
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress)
    task = bar.add_task("svdquant-gptq layers", total=len(masks), completed=len(layers))
    prompt_task = bar.add_task("calibration pass: prompts", total=settings.num_prompts)
    try:
        bar.start()
        for pass_experts in passes:
            for chunk in _chunks({e: todo[e] for e in pass_experts}, experts, hessian_budget_bytes):
                bar.reset(prompt_task)
                records = collect_layer_inputs(pipe, prompts, settings, chunk, edges, recipe.clip_search.max_tokens,
                                               on_prompt=lambda: bar.advance(prompt_task))
                for expert, recs in records.items():
                    linears = wan.target_linears(experts[expert])
                    for first in list(recs):
                        rec = recs.pop(first)  # freed once its layers are done
                        hessian, samples = rec.mean_hessian(), rec.bin_samples()
                        for layer in rec.layers:
                            name = f"{expert}.{layer}"
                            layers[name] = quantize_layer(linears[layer], recipe, masks[name], hessian, samples, name)
                            bar.advance(task)
                        del rec, hessian, samples
                if checkpoint is not None:
                    PTQState(layers, **header, timestep_bins=edges).save(checkpoint)
            if recipe.sequential_experts:  # the next expert is calibrated behind this one, quantized
                for expert in pass_experts:
                    model = experts[expert]
                    for name, state in layers.items():
                        if name.startswith(f"{expert}."):
                            module_name = name.split(".", 1)[1]
                            new = quant_linear(model.get_submodule(module_name), state)
                            originals.append((model, module_name, swap(model, module_name, new)))
                wan.publish_timestep_bins(pipe, edges)
    finally:
        bar.stop()
        for model, module_name, module in reversed(originals):
            swap(model, module_name, module)
        if originals:
            wan.publish_timestep_bins(pipe, {})
    ordered = {name: layers[name] for name in masks}
    return ordered, edges if recipe.clip_search.enabled else {}


def quantize_layer(
    linear: nn.Linear,
    recipe: Recipe,
    mask: Tensor | None,
    hessian: Tensor,
    samples: list[Tensor | None],
    name: str,
) -> LayerState:
    """One Linear: low-rank branch, GPTQ residual (packed), per-bin clip ratios; ``hessian`` of its raw inputs."""
    weight = linear.weight.detach()
    fmt = formats.get(recipe.weights)
    h = hessian.to(weight.device)
    if mask is not None:  # the Hessian of the smoothed inputs x·m
        h = h * mask[:, None] * mask[None, :]
    lowrank = None
    rank = recipe.lowrank.rank_for(*weight.shape)
    if rank > 0:
        branch = refine_lowrank(residual_weight(weight, mask), rank, fmt.quantize_dequantize, hessian=h,
                                iters=recipe.lowrank.iters, dtype=weight.dtype)
        lowrank = (branch.down, branch.up)
        logger.debug("%s: rank-%d branch, relative error by iteration %s", name, rank,
                     [f"{e:.3g}" for e in branch.errors])
    residual = residual_weight(weight, mask, lowrank)
    g = recipe.gptq
    if g.enabled:
        encoded = gptq(residual, h, fmt, block_size=g.block_size, damp=g.damp, act_order=g.act_order,
                       dtype=weight.dtype, name=name).encoded
    else:
        encoded = fmt.encode(residual)
    del h, residual
    state = LayerState(recipe.weights, recipe.activations, tensor_sha256(weight), mask,
                       lowrank_down=None if lowrank is None else lowrank[0],
                       lowrank_up=None if lowrank is None else lowrank[1], weight_packed=fmt.pack(encoded))
    if recipe.clip_search.enabled:
        state.act_clip = _bin_clips(linear, state, samples, recipe.clip_search.grid, name)
    elif recipe.act_clip is not None:
        state.act_clip = torch.tensor(recipe.act_clip, dtype=torch.float32)
    return state


def _bin_clips(linear: nn.Linear, state: LayerState, samples: list[Tensor | None], grid: list[float],
               name: str) -> Tensor:
    """Per timestep bin, the clip ratio of ``grid`` with the least output MSE on that bin's inputs (1.0: none seen)."""
    layer = quant_linear(linear, state)
    weight = linear.weight.detach()

    def output(x: Tensor, ratio: float) -> Tensor:
        layer.act_clip = torch.tensor(ratio, dtype=torch.float32, device=weight.device)
        return layer(x)

    clips, gains = [], []
    with torch.no_grad():
        for x in samples:
            if x is None:
                clips.append(1.0)
                continue
            x = x.to(weight.device, weight.dtype)
            reference = F.linear(x, weight, linear.bias)
            ratio, _ = clip_search(x, reference, output, grid)
            clips.append(ratio)
            gains.append(sqnr_db(reference, output(x, ratio)) - sqnr_db(reference, output(x, 1.0)))
    logger.debug("%s: clip ratios per timestep bin %s (+%.2f dB output SQNR on average)", name, clips,
                 sum(gains) / max(len(gains), 1))
    return torch.tensor(clips, dtype=torch.float32)


def _chunks(groups: Groups, experts: dict[str, nn.Module], budget: int) -> list[Groups]:
    """Split the input groups into passes whose fp32 Hessians fit in ``budget`` bytes (one group at least)."""
    chunks: list[Groups] = []
    current: Groups = {}
    used = 0
    for expert, expert_groups in groups.items():
        linears = wan.target_linears(experts[expert])
        for group in expert_groups:
            size = hessian_nbytes(linears[group[0]].in_features)
            if size > budget:
                logger.warning("%s %s: its Hessian (%.2f GiB) alone exceeds the budget of %.2f GiB", expert,
                               group[0], size / 2**30, budget / 2**30)
            if current and used + size > budget:
                chunks.append(current)
                current, used = {}, 0
            current.setdefault(expert, []).append(group)
            used += size
    if current:
        chunks.append(current)
    if len(chunks) > 1:
        logger.info("the Hessians take %d calibration passes within a budget of %.1f GiB", len(chunks), budget / 2**30)
    return chunks


def _resume(checkpoint: str | Path | None, header: dict, edges: dict[str, list[float]],
            masks: dict[str, Tensor | None]) -> dict[str, LayerState]:
    """Layers a previous run of the same recipe on the same model saved in ``checkpoint``."""
    if checkpoint is None:
        return {}
    check_output(checkpoint, STATE_FILES, "checkpoint of finished layers (a PTQ state)")  # before any work
    if not (Path(checkpoint) / "manifest.json").is_file():
        return {}
    saved = load_state(checkpoint)
    found = {"recipe": saved.recipe, "base": saved.base, "plan": saved.plan, "timestep bins": saved.timestep_bins}
    wanted = {"recipe": header["recipe"], "base": header["base"], "plan": header["plan"], "timestep bins": edges}
    if differ := [key for key in found if found[key] != wanted[key]]:
        details = [f"{key} {k}" for key in differ if key == "base"
                   for k in wanted["base"] if found["base"].get(k) != wanted["base"][k]]
        logger.warning("%s holds layers made from other inputs (%s): starting over", checkpoint,
                       ", ".join(details or differ))
        return {}
    layers = {name: s for name, s in saved.layers.items() if name in masks}
    logger.info("resuming from %s: %d of %d layers done", checkpoint, len(layers), len(masks))
    return layers
