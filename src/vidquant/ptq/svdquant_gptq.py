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

Held-out rule (``held_out:``): per layer input and timestep bin, a seeded share of the calibration rows is
held out of the Hessian and of the clip-search samples (`calib.layer_inputs`). On those rows, and only
there, the method judges what it fitted: the low-rank refinement stops when the held-out output error
stops improving (by ``lowrank.tol``, at most ``lowrank.iters`` iterations), GPTQ's damping is chosen from
``gptq.damp`` and RTN is kept where no damping beats it (``gptq.keep_rtn``), and a bin's clip ratio
falls back to 1.0 where it does not beat no clipping. The choices go to the state's manifest per layer
(``info``), and a layer whose Hessian saw fewer than ``held_out.min_tokens_factor`` x its input width
tokens is warned about by name (`vidquant inspect` lists them).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from .. import dist, formats
from ..calib.layer_inputs import HELD_OUT_FRACTION, collect_layer_inputs, hessian_nbytes
from ..calib.settings import MAX_BINS
from ..checksum import tensor_sha256
from ..methods.clip import choose_clip
from ..methods.gptq import DAMP_GRID, gptq, gptq_held_out
from ..methods.lowrank import DEFAULT_TOL as DEFAULT_LOWRANK_TOL
from ..methods.lowrank import MAX_ITERS as MAX_LOWRANK_ITERS
from ..methods.lowrank import refine_lowrank
from ..methods.smoothing import residual_weight
from ..models import ModelAdapter, qualify, split_name
from ..nn import StepContext, swap
from ..outputs import check_output
from ..progress import progress_bar
from ..recipes import Recipe
from ..state import STATE_FILES, LayerState, PTQState, load_state, quant_linear
from .masks import layer_rotation, rotate_fit
from .registry import Method, QuantizeRun, register_method

logger = logging.getLogger(__name__)

Groups = dict[str, list[list[str]]]  # per expert, groups of target Linears that read one input
MAX_SAMPLE_TOKENS = 65536  # sample rows kept per timestep bin and layer input


class LowRank(BaseModel):
    """SVDQuant's low-rank branch: ``W/m ≈ up · down`` of rank r kept in BF16, the residual quantized.

    The rank is capped at ``max_fraction · min(N, K)`` so that on a narrow layer the branch stays a small
    correction instead of a full-precision copy of the weight (at Wan's 5120 the cap is 640, far above 32).
    Refinement (re-SVD of what rounding leaves, keep the best) runs while an iteration lowers the held-out
    output error by more than ``tol`` (relative), at most ``iters`` iterations (a safety bound; 0: the
    plain SVD branch); without held-out rows the calibration Hessian's error is used the same way.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rank: int = Field(32, ge=0, le=4096)  # 0: no branch
    max_fraction: float = Field(0.125, gt=0.0, le=1.0)
    iters: int = Field(MAX_LOWRANK_ITERS, ge=0, le=1000)
    tol: float = Field(DEFAULT_LOWRANK_TOL, ge=0.0, lt=1.0)

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The rank used for an ``(out_features, in_features)`` weight."""
        return min(self.rank, int(self.max_fraction * min(out_features, in_features)))


class GPTQ(BaseModel):
    """GPTQ on the residual (Frantar et al.): damping relative to mean(diag H), lazy block size, act order.

    ``damp``: a number, a list of candidates, or ``auto`` (`methods.gptq.DAMP_GRID`: 0.01, 0.1, 1.0); with
    held-out rows the candidate with the least held-out output error is kept, and RTN where none beats it
    (``keep_rtn``); without them the first candidate is used as is.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    block_size: int = Field(128, ge=1, le=8192)
    damp: list[float] = Field(default_factory=lambda: list(DAMP_GRID), min_length=1, max_length=16)
    keep_rtn: bool = True
    # columns in descending diag(H), static groups: on by held-out evidence (bench/methods.py, tiny Wan2.2, 8
    # calibration / 4 held-out prompts: hif4 +0.18 dB, nvfp4 +0.11 dB mean layer-output SQNR, better on 34 of 40
    # layers each)
    act_order: bool = True

    @field_validator("damp", mode="before")
    @classmethod
    def _damp_grid(cls, damp: object) -> object:
        if damp == "auto":
            return list(DAMP_GRID)
        if isinstance(damp, (int, float)) and not isinstance(damp, bool):
            return [damp]
        return damp

    @field_validator("damp")
    @classmethod
    def _positive(cls, damp: list[float]) -> list[float]:
        if not all(math.isfinite(d) and d > 0 for d in damp):
            raise ValueError(f"dampings must be positive finite numbers, got {damp}")
        return list(dict.fromkeys(damp))


class HeldOut(BaseModel):
    """Calibration rows held out of every fit, to judge it: up to ``max_tokens`` per timestep bin and layer
    input, drawn from a seeded ``fraction`` of the rows (0 tokens: no held-out rule). A layer whose Hessian
    saw fewer than ``min_tokens_factor`` x its input width tokens is warned about (its Hessian is singular
    or barely determined there)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_tokens: int = Field(256, ge=0, le=MAX_SAMPLE_TOKENS)
    fraction: float = Field(HELD_OUT_FRACTION, gt=0.0, lt=1.0)
    min_tokens_factor: float = Field(4.0, ge=0.0)


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
    held_out: HeldOut = HeldOut()
    sequential_experts: bool = False  # calibrate transformer_2 on inputs made with transformer quantized


@register_method("svdquant-gptq")
class SVDQuantGPTQ(Method):
    """Timestep-aware SVDQuant-GPTQ: low-rank branch, GPTQ residual, per-timestep-bin clip ratios."""

    Options = Options
    needs_layer_inputs = True
    deals_layers = True

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
    rank, world = dist.rank(), dist.world()
    if world > 1 and run.checkpoint is None:
        logger.warning("under torchrun without a checkpoint folder to exchange layers through, every rank "
                       "quantizes every layer")
        rank, world = 0, 1
    layers = _resume(run.checkpoint, run.header, edges, masks)
    mine_file = None if run.checkpoint is None else dist.rank_path(run.checkpoint, rank, world)
    own = set(_saved_layers(mine_file, run.header, edges, masks, log=False)) if world > 1 else set(layers)
    if world > 1:
        dist.barrier()  # every rank has read the checkpoints before any rank rewrites its own
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
        with progress_bar(run.progress and dist.is_main()) as bar:
            task = bar.add_task("svdquant-gptq layers", total=len(masks), completed=len(layers))
            prompt_task = bar.add_task("calibration pass", total=units)
            for pass_experts in passes:
                mine = _deal({e: todo[e] for e in pass_experts}, adapter, rank, world)
                for chunk in _chunks(mine, adapter, run.hessian_budget_bytes):
                    bar.reset(prompt_task)
                    records = collect_layer_inputs(run.model, run.data, run.settings, chunk, edges,
                                                   options.clip_search.max_tokens,
                                                   on_prompt=lambda: bar.advance(prompt_task),
                                                   held_out_tokens=options.held_out.max_tokens,
                                                   held_out_fraction=options.held_out.fraction)
                    for expert, recs in records.items():
                        linears = adapter.target_linears(expert)
                        for first in list(recs):
                            rec = recs.pop(first)  # freed once its layers are done
                            hessian, samples, held = rec.mean_hessian(), rec.bin_samples(), rec.held_out_samples()
                            for layer in rec.layers:
                                name = qualify(expert, layer)
                                layers[name] = quantize_layer(linears[layer], recipe, masks[name], hessian, samples,
                                                              name, held_out=held, tokens=rec.fitted_tokens)
                                own.add(name)
                                bar.advance(task)
                            del rec, hessian, samples, held
                    if run.checkpoint is not None:
                        saved = layers if world == 1 else {n: layers[n] for n in layers if n in own}
                        PTQState(saved, **run.header, timestep_bins=edges).save(mine_file)
                if world > 1:  # every rank takes the layers the others finished in this pass (and before)
                    dist.barrier()
                    layers.update(_resume(run.checkpoint, run.header, edges, masks, log=False))
                    bar.update(task, completed=len(layers))
                    dist.barrier()  # all have read before any rank rewrites its file (next pass) or rank 0 removes it
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
    missing = [name for name in masks if name not in layers]
    if missing:
        raise RuntimeError(f"svdquant-gptq: layers {missing[:3]} were quantized by no rank")
    ordered = {name: layers[name] for name in masks}
    return ordered, edges if options.clip_search.enabled else {}


def quantize_layer(
    linear: nn.Linear,
    recipe: Recipe,
    mask: Tensor | None,
    hessian: Tensor,
    samples: list[Tensor | None],
    name: str,
    *,
    held_out: list[Tensor | None] | None = None,
    tokens: int | None = None,
) -> LayerState:
    """One Linear: low-rank branch, GPTQ residual (packed), per-bin clip ratios; ``hessian`` of its raw inputs.

    ``held_out``: per timestep bin, raw input rows that are in neither ``hessian`` nor ``samples`` (None or
    all None: no held-out rule, every fit is taken as is); ``tokens``: the rows ``hessian`` was built from
    (for the few-tokens warning). What was chosen, and on what evidence, goes to the state's ``info``.
    """
    options = recipe.options
    weight = linear.weight.detach()
    fmt = formats.get(recipe.weights)
    k = weight.shape[1]
    info: dict[str, str | int | float] = {}
    held = [x for x in (held_out or []) if x is not None]
    held_x = torch.cat(held).to(weight.device, torch.float32) if held else None
    if held_x is not None and mask is not None:
        held_x = held_x * mask  # the smoothed inputs x·m, which W/m and the residual act on
    if tokens is not None:
        info["tokens"] = tokens
        if tokens < options.held_out.min_tokens_factor * k:
            info["warning"] = (f"few calibration tokens: {tokens} < {options.held_out.min_tokens_factor:g} x "
                               f"{k} inputs (the Hessian is singular or barely determined)")
            logger.warning("%s: %s; held-out rows decide what is kept", name, info["warning"])
    if held_x is not None:
        info["held_out_tokens"] = held_x.shape[0]
    h = hessian.to(weight.device)
    if mask is not None:  # the Hessian of the smoothed inputs x·m
        h = h * mask[:, None] * mask[None, :]
    rotation = layer_rotation(recipe, name, linear)  # {} without; else the fits see (W/m) R, R^T H R, (x·m) R
    folded, h, held_x = rotate_fit(rotation, residual_weight(weight, mask), h, held_x)
    lowrank = None
    rank = options.lowrank.rank_for(*weight.shape)
    if rank > 0:
        lr = options.lowrank
        branch = refine_lowrank(folded, rank, fmt.quantize_dequantize,
                                hessian=h if held_x is None else None, held_out=held_x, iters=lr.iters, tol=lr.tol,
                                dtype=weight.dtype)
        lowrank = (branch.down, branch.up)
        gain = 10 * math.log10(branch.errors[0] / branch.errors[branch.best]) if branch.errors[branch.best] > 0 else 0
        info["lowrank"] = (f"{len(branch.errors) - 1} iterations, kept {branch.best} ({gain:+.2f} dB over the plain "
                           f"SVD on {'held-out rows' if held_x is not None else 'the calibration Hessian'})")
        logger.debug("%s: rank-%d branch, %s; relative error by iteration %s", name, rank, info["lowrank"],
                     [f"{e:.3g}" for e in branch.errors])
    residual = residual_weight(folded, None, lowrank)
    g = options.gptq
    if g.enabled and held_x is not None:
        choice = gptq_held_out(residual, h, fmt, held_x, damps=g.damp, keep_rtn=g.keep_rtn, block_size=g.block_size,
                               act_order=g.act_order, dtype=weight.dtype, name=name)
        encoded = choice.encoded
        info["gptq"] = choice.info
    elif g.enabled:
        result = gptq(residual, h, fmt, block_size=g.block_size, damp=g.damp[0], act_order=g.act_order,
                      dtype=weight.dtype, name=name, evaluate=False)
        encoded = result.encoded
        info["gptq"] = f"damp={result.damp:g} (no held-out rows: not verified)"
    else:
        encoded = fmt.encode(residual)
    del h, residual, held_x, folded
    tensors = {"mask": mask, **rotation, "weight_packed": fmt.pack(encoded)}
    if lowrank is not None:
        tensors["lowrank_down"], tensors["lowrank_up"] = lowrank
    state = LayerState(recipe.weights, recipe.activations, tensor_sha256(weight),
                       {key: v for key, v in tensors.items() if v is not None})
    if options.clip_search.enabled:
        state.tensors["act_clip"], clip_info = _bin_clips(linear, state, samples, held_out, options.clip_search.grid,
                                                          name)
        if clip_info:
            info["clip"] = clip_info
    elif recipe.act_clip is not None:
        state.tensors["act_clip"] = torch.tensor(recipe.act_clip, dtype=torch.float32)
    state.info = info
    return state


def _bin_clips(linear: nn.Linear, state: LayerState, samples: list[Tensor | None],
               held_out: list[Tensor | None] | None, grid: list[float], name: str) -> tuple[Tensor, str]:
    """Per timestep bin, the clip ratio of ``grid`` with the least output MSE on that bin's inputs (1.0: none seen),
    kept only where it beats no clipping on the bin's held-out rows; and a line on what the held-out check did."""
    layer = quant_linear(linear, state, name=name)
    weight = linear.weight.detach()
    held_out = held_out or [None] * len(samples)

    def output(x: Tensor, ratio: float) -> Tensor:
        layer.act.act_clip = torch.tensor(ratio, dtype=torch.float32, device=weight.device)
        return layer(x)

    clips, gains, fell_back, checked = [], [], [], 0
    with torch.no_grad():
        for b, (x, xh) in enumerate(zip(samples, held_out, strict=True)):
            if x is None:
                clips.append(1.0)
                continue
            x = x.to(weight.device, weight.dtype)
            reference = F.linear(x, weight, linear.bias)
            held_reference = None
            if xh is not None:
                xh = xh.to(weight.device, weight.dtype)
                held_reference = F.linear(xh, weight, linear.bias)
            choice = choose_clip(x, reference, output, grid, xh, held_reference)
            clips.append(choice.ratio)
            if choice.held_out_gain_db is not None:
                checked += 1
                gains.append(0.0 if choice.fell_back else choice.held_out_gain_db)
            if choice.fell_back:
                fell_back.append(b)
    summary = ""
    if checked:
        summary = (f"{checked} bins checked on held-out rows, mean {sum(gains) / len(gains):+.2f} dB over no clipping "
                   "as kept"
                   + (f"; searched ratio worse on held-out, 1.0 kept in bins {fell_back}" if fell_back else ""))
    logger.debug("%s: clip ratios per timestep bin %s; %s", name, clips, summary or "no held-out check")
    return torch.tensor(clips, dtype=torch.float32), summary


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


def _deal(groups: Groups, adapter: ModelAdapter, rank: int, world: int) -> Groups:
    """This rank's share of a pass's input groups (all of them for one process), dealt by cost so the ranks
    finish together: per Linear of a group, GPTQ's ``N K^2`` plus the ``K^3`` of its Hessian's factorization."""
    if world == 1:
        return groups
    flat = [(expert, group) for expert, expert_groups in groups.items() for group in expert_groups]
    costs = []
    for expert, group in flat:
        linears = adapter.target_linears(expert)
        costs.append(sum(linears[n].out_features * linears[n].in_features ** 2 + linears[n].in_features ** 3
                         for n in group))
    mine: Groups = {}
    for expert, group in dist.deal(flat, rank, world, weights=costs):
        mine.setdefault(expert, []).append(group)
    return mine


def _resume(checkpoint: str | Path | None, header: dict, edges: dict[str, list[float]],
            masks: dict[str, Tensor | None], *, log: bool = True) -> dict[str, LayerState]:
    """Layers a previous run of the same recipe on the same model saved in ``checkpoint``, or in the per-rank
    checkpoints of a torchrun (`dist.rank_paths`: whatever the number of ranks that wrote them)."""
    if checkpoint is None:
        return {}
    check_output(checkpoint, STATE_FILES, "checkpoint of finished layers (a PTQ state)")  # before any work
    layers: dict[str, LayerState] = {}
    for path in dist.rank_paths(checkpoint):
        for name, layer in _saved_layers(path, header, edges, masks, log=log).items():
            layers.setdefault(name, layer)
    return layers


def _saved_layers(checkpoint: Path | None, header: dict, edges: dict[str, list[float]],
                  masks: dict[str, Tensor | None], *, log: bool = True) -> dict[str, LayerState]:
    """The layers of ``masks`` that one checkpoint folder holds for the same recipe and model ({}: none)."""
    if checkpoint is None:
        return {}
    check_output(checkpoint, STATE_FILES, "checkpoint of finished layers (a PTQ state)")
    if not (Path(checkpoint) / "manifest.json").is_file():
        return {}
    saved = load_state(checkpoint)
    found = {"recipe": saved.recipe, "base": saved.base, "plan": saved.plan, "timestep bins": saved.timestep_bins}
    wanted = {"recipe": header["recipe"], "base": header["base"], "plan": header["plan"], "timestep bins": edges}
    if differ := [key for key in found if found[key] != wanted[key]]:
        details = [f"{key} {k}" for key in differ if key == "base"
                   for k in wanted["base"] if found["base"].get(k) != wanted["base"][k]]
        if log:
            logger.warning("%s holds layers made from other inputs (%s): starting over", checkpoint,
                           ", ".join(details or differ))
        return {}
    layers = {name: s for name, s in saved.layers.items() if name in masks}
    if log:
        logger.info("resuming from %s: %d of %d layers done", checkpoint, len(layers), len(masks))
    return layers
