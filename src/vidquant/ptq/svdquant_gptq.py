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
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from .. import formats
from ..calib.layer_inputs import collect_layer_inputs, hessian_nbytes
from ..calib.settings import MAX_BINS
from ..checksum import tensor_sha256
from ..methods.clip import clip_search
from ..methods.gptq import gptq
from ..methods.lowrank import DEFAULT_ITERS as DEFAULT_LOWRANK_ITERS
from ..methods.lowrank import refine_lowrank
from ..methods.smoothing import residual_weight, sqnr_db
from ..models import ModelAdapter, qualify, split_name
from ..nn import StepContext, swap
from ..outputs import check_output
from ..progress import progress_bar
from ..recipes import Recipe
from ..state import STATE_FILES, LayerState, PTQState, load_state, quant_linear
from .registry import Method, QuantizeRun, register_method

logger = logging.getLogger(__name__)

Groups = dict[str, list[list[str]]]  # per expert, groups of target Linears that read one input
MAX_SAMPLE_TOKENS = 65536  # sample rows kept per timestep bin and layer input


class LowRank(BaseModel):
    """SVDQuant's low-rank branch: ``W/m ≈ up · down`` of rank r kept in BF16, the residual quantized.

    The rank is capped at ``max_fraction · min(N, K)`` so that on a narrow layer the branch stays a small
    correction instead of a full-precision copy of the weight (at Wan's 5120 the cap is 640, far above 32).
    ``iters``: refinement rounds (re-SVD of what rounding leaves, keep the best; 0: the plain SVD branch).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rank: int = Field(32, ge=0, le=4096)  # 0: no branch
    max_fraction: float = Field(0.125, gt=0.0, le=1.0)
    iters: int = Field(DEFAULT_LOWRANK_ITERS, ge=0, le=100)  # methods.lowrank's default

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The rank used for an ``(out_features, in_features)`` weight."""
        return min(self.rank, int(self.max_fraction * min(out_features, in_features)))


class GPTQ(BaseModel):
    """GPTQ on the residual (Frantar et al.): damping relative to mean(diag H), lazy block size, act order."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    block_size: int = Field(128, ge=1, le=8192)
    damp: float = Field(0.01, gt=0.0)
    act_order: bool = False


class ClipSearch(BaseModel):
    """Per layer, expert and timestep bin, the activation clip ratio of ``grid`` with the least output MSE.

    ``bins`` equal timestep bins over each expert's share of the schedule; ``max_tokens`` calibration rows
    are kept per bin and layer input to score the grid.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    bins: int = Field(4, ge=1, le=MAX_BINS)
    grid: list[float] = Field([0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0], max_length=256)
    max_tokens: int = Field(256, ge=1, le=MAX_SAMPLE_TOKENS)

    @field_validator("grid")
    @classmethod
    def _ratios(cls, grid: list[float]) -> list[float]:
        if not grid or not all(0.0 < c <= 1.0 for c in grid):
            raise ValueError("clip ratios must be in (0, 1]")
        if 1.0 not in grid:
            raise ValueError("the grid must hold 1.0 (no clipping), so the search can never do worse than none")
        return sorted(set(grid))


class Options(BaseModel):
    """The recipe section ``svdquant-gptq:``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lowrank: LowRank = LowRank()
    gptq: GPTQ = GPTQ()
    clip_search: ClipSearch = ClipSearch()
    sequential_experts: bool = False  # calibrate transformer_2 on inputs made with transformer quantized


@register_method("svdquant-gptq")
class SVDQuantGPTQ(Method):
    """Timestep-aware SVDQuant-GPTQ: low-rank branch, GPTQ residual, per-timestep-bin clip ratios."""

    Options = Options
    needs_layer_inputs = True

    def check(self, recipe: Recipe) -> None:
        if recipe.act_clip is not None and recipe.options.clip_search.enabled:
            raise ValueError("act_clip: a fixed clip ratio and clip_search exclude each other (disable clip_search)")

    def quantize(self, run: QuantizeRun) -> tuple[dict[str, LayerState], dict[str, list[float]]]:
        return quantize_layers(run)


def quantize_layers(run: QuantizeRun) -> tuple[dict[str, LayerState], dict[str, list[float]]]:
    """`LayerState` of every layer of ``run.masks`` ("expert.layer" -> its mask), and the timestep-bin edges."""
    recipe, adapter, masks, options = run.recipe, run.adapter, run.masks, run.recipe.options
    experts = adapter.experts()
    edges = adapter.bin_edges(options.clip_search.bins)
    layers = _resume(run.checkpoint, run.header, edges, masks)
    todo = {
        expert: [g for group in adapter.input_groups(expert)
                 if (g := [n for n in group if qualify(expert, n) in masks and qualify(expert, n) not in layers])]
        for expert in experts
    }
    passes = [[e] for e in experts] if options.sequential_experts else [list(experts)]
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    contexts = {expert: StepContext() for expert in experts}
    units = run.settings.num_prompts if isinstance(run.data, list) else None
    try:
        with progress_bar(run.progress) as bar:
            task = bar.add_task("svdquant-gptq layers", total=len(masks), completed=len(layers))
            prompt_task = bar.add_task("calibration pass", total=units)
            for pass_experts in passes:
                for chunk in _chunks({e: todo[e] for e in pass_experts}, adapter, run.hessian_budget_bytes):
                    bar.reset(prompt_task)
                    records = collect_layer_inputs(run.model, run.data, run.settings, chunk, edges,
                                                   options.clip_search.max_tokens,
                                                   on_prompt=lambda: bar.advance(prompt_task))
                    for expert, recs in records.items():
                        linears = adapter.target_linears(expert)
                        for first in list(recs):
                            rec = recs.pop(first)  # freed once its layers are done
                            hessian, samples = rec.mean_hessian(), rec.bin_samples()
                            for layer in rec.layers:
                                name = qualify(expert, layer)
                                layers[name] = quantize_layer(linears[layer], recipe, masks[name], hessian, samples,
                                                              name)
                                bar.advance(task)
                            del rec, hessian, samples
                    if run.checkpoint is not None:
                        PTQState(layers, **run.header, timestep_bins=edges).save(run.checkpoint)
                if options.sequential_experts:  # the next expert is calibrated behind this one, quantized
                    for name, state in layers.items():
                        expert, module_name = split_name(name)
                        if expert in pass_experts:
                            model = experts[expert]
                            new = quant_linear(model.get_submodule(module_name), state, contexts[expert], name)
                            originals.append((model, module_name, swap(model, module_name, new)))
                    adapter.publish_bins(edges, lambda expert, b: setattr(contexts[expert], "timestep_bin", b))
    finally:
        for model, module_name, module in reversed(originals):
            swap(model, module_name, module)
        if originals:
            adapter.publish_bins({}, None)
    ordered = {name: layers[name] for name in masks}
    return ordered, edges if options.clip_search.enabled else {}


def quantize_layer(
    linear: nn.Linear,
    recipe: Recipe,
    mask: Tensor | None,
    hessian: Tensor,
    samples: list[Tensor | None],
    name: str,
) -> LayerState:
    """One Linear: low-rank branch, GPTQ residual (packed), per-bin clip ratios; ``hessian`` of its raw inputs."""
    options = recipe.options
    weight = linear.weight.detach()
    fmt = formats.get(recipe.weights)
    h = hessian.to(weight.device)
    if mask is not None:  # the Hessian of the smoothed inputs x·m
        h = h * mask[:, None] * mask[None, :]
    lowrank = None
    rank = options.lowrank.rank_for(*weight.shape)
    if rank > 0:
        branch = refine_lowrank(residual_weight(weight, mask), rank, fmt.quantize_dequantize, hessian=h,
                                iters=options.lowrank.iters, dtype=weight.dtype)
        lowrank = (branch.down, branch.up)
        logger.debug("%s: rank-%d branch, relative error by iteration %s", name, rank,
                     [f"{e:.3g}" for e in branch.errors])
    residual = residual_weight(weight, mask, lowrank)
    g = options.gptq
    if g.enabled:
        encoded = gptq(residual, h, fmt, block_size=g.block_size, damp=g.damp, act_order=g.act_order,
                       dtype=weight.dtype, name=name).encoded
    else:
        encoded = fmt.encode(residual)
    del h, residual
    tensors = {"mask": mask, "weight_packed": fmt.pack(encoded)}
    if lowrank is not None:
        tensors["lowrank_down"], tensors["lowrank_up"] = lowrank
    state = LayerState(recipe.weights, recipe.activations, tensor_sha256(weight),
                       {k: v for k, v in tensors.items() if v is not None})
    if options.clip_search.enabled:
        state.tensors["act_clip"] = _bin_clips(linear, state, samples, options.clip_search.grid, name)
    elif recipe.act_clip is not None:
        state.tensors["act_clip"] = torch.tensor(recipe.act_clip, dtype=torch.float32)
    return state


def _bin_clips(linear: nn.Linear, state: LayerState, samples: list[Tensor | None], grid: list[float],
               name: str) -> Tensor:
    """Per timestep bin, the clip ratio of ``grid`` with the least output MSE on that bin's inputs (1.0: none seen)."""
    layer = quant_linear(linear, state, name=name)
    weight = linear.weight.detach()

    def output(x: Tensor, ratio: float) -> Tensor:
        layer.act.act_clip = torch.tensor(ratio, dtype=torch.float32, device=weight.device)
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


def _chunks(groups: Groups, adapter: ModelAdapter, budget: int) -> list[Groups]:
    """Split the input groups into passes whose fp32 Hessians fit in ``budget`` bytes (one group at least)."""
    chunks: list[Groups] = []
    current: Groups = {}
    used = 0
    for expert, expert_groups in groups.items():
        linears = adapter.target_linears(expert)
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
