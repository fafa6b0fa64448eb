"""Per-layer fidelity of smoothed W4A4 Linears of a model on captured activations, and the (alpha, p) search.

The wiring around `methods.fidelity` (the math: why mean-of-dB scores, mask scales and tail tokens): every
target Linear of the model's adapter is run on held-out inputs (`calib.capture.capture_inputs`) in fp32,
unquantized (the reference) and fake-quantized, and scored by its output SQNR in dB. Three variants per
layer: no mask (RTN), masks from the calibration max (Eq. 5 into Eq. 8) and masks from the p-th percentile
(Eq. 6 into Eq. 8).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..calib.calibrate import CalibSettings
from ..calib.layer_inputs import collect_layer_inputs
from ..calib.stats import CalibStats
from ..methods.fidelity import LayerCase, QuantSpec, binned_sqnr, tail_rows
from ..methods.smoothing import DEFAULT_EPS, FormatLike, channel_mask, weight_channel_max
from ..models import adapter_for, qualify
from ..state import PTQState, quant_linear

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_PERCENTILES = (99.0, 99.9, 99.99, 100.0)
HELD_OUT_SEED_OFFSET = 10_000  # held-out inputs: seeds clear of the calibration prompts' seed + i


def _cases(pipe, inputs: dict[str, dict[str, Tensor]]) -> Iterator[LayerCase]:
    """The captured target Linears, one at a time (a 14B expert's inputs never sit in fp32 all at once)."""
    adapter = adapter_for(pipe)
    experts = adapter.experts()
    for expert, layers in inputs.items():
        if expert not in experts:
            raise ValueError(f"inputs for unknown expert '{expert}'; the pipeline has {', '.join(experts)}")
        linears = adapter.target_linears(expert)
        if unknown := sorted(set(layers) - set(linears)):
            raise ValueError(f"{expert}: captured inputs for {', '.join(unknown)}, which are not target Linears")
        for layer in (name for name in linears if name in layers):
            lin = linears[layer]
            weight = lin.weight.detach().float()
            x = layers[layer].to(weight.device, torch.float32)
            bias = None if lin.bias is None else lin.bias.detach().float()
            with torch.no_grad():
                reference = F.linear(x, weight, bias)
            yield LayerCase(expert, layer, x, weight, bias, reference, weight_channel_max(weight))


def layer_fidelity(
    pipe,
    stats: CalibStats,
    inputs: dict[str, dict[str, Tensor]],
    weight_format: FormatLike,
    act_format: FormatLike,
    alpha: float,
    percentile: float,
    eps: float = DEFAULT_EPS,
    act_clip: float | None = None,
    mask_scales: Sequence[float] = (1.0,),
    max_ratio: float | None = None,
) -> list[dict]:
    """One row per captured target Linear (model order): output SQNR (dB) of RTN, max masks, percentile masks.

    Row keys: ``expert``, ``layer``, ``tokens`` (captured rows), ``rtn_db``, ``max_db``, ``pct_db``;
    ``range_ratio`` (largest a_i^max / a_i^p over channels: how long the layer's calibration tails are);
    ``tail_tokens`` (rows beyond ``TAIL_FACTOR · a_i^p`` somewhere) and ``max_tail_db`` / ``pct_tail_db``
    (SQNR of both masks on those rows; NaN when there are none). Mask scores are averaged over
    ``mask_scales``; ``max_ratio`` guards the percentile (`CalibStats.activation_range`). nvfp4's per-tensor
    activation scale is taken over all captured rows of a layer at once.
    """
    q = QuantSpec.of(weight_format, act_format, act_clip, mask_scales)
    rows = []
    for case in _cases(pipe, inputs):
        device = case.weight.device
        a_max = stats.activation_range(case.expert, case.layer, 100.0).to(device)
        a_pct = stats.activation_range(case.expert, case.layer, percentile, max_ratio).to(device)
        tail = tail_rows(case.x, a_pct)
        max_db, max_tail_db = case.score(q, channel_mask(case.w, a_max, alpha, eps), tail)
        pct_db, pct_tail_db = case.score(q, channel_mask(case.w, a_pct, alpha, eps), tail)
        ratio = torch.where(a_pct > 0, a_max / a_pct, torch.where(a_max > 0, math.inf, 1.0))
        rows.append({
            "expert": case.expert,
            "layer": case.layer,
            "tokens": case.x.shape[0],
            "rtn_db": case.score(q, None)[0],
            "max_db": max_db,
            "pct_db": pct_db,
            "range_ratio": float(ratio.max()),
            "tail_tokens": int(tail.sum()),
            "max_tail_db": max_tail_db,
            "pct_tail_db": pct_tail_db,
        })
    return rows


def search(
    pipe,
    stats: CalibStats,
    inputs: dict[str, dict[str, Tensor]],
    weight_format: FormatLike,
    act_format: FormatLike,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    eps: float = DEFAULT_EPS,
    act_clip: float | None = None,
    mask_scales: Sequence[float] = (1.0,),
    max_ratio: float | None = None,
) -> list[dict]:
    """Score every (alpha, p) of the grid over all captured Linears; rows in grid order (p outer).

    Row keys: ``alpha``, ``percentile``, ``mean_db`` (the score: mean per-layer output SQNR),
    ``worst_db`` (lowest layer), ``nmse_db`` (-10 log10 of the mean per-layer normalized MSE),
    ``tail_worst_db`` (lowest tail-token SQNR over the layers that have tail tokens; NaN if none does),
    ``layers``. p = 100 is the max mask. Scores are averaged over ``mask_scales``; ``max_ratio`` guards
    the percentile (`CalibStats.activation_range`). The best setting is the row with the highest ``mean_db``.
    """
    q = QuantSpec.of(weight_format, act_format, act_clip, mask_scales)
    grid = [(alpha, p) for p in percentiles for alpha in alphas]
    scores: dict[tuple[float, float], list[float]] = {key: [] for key in grid}
    tails: dict[tuple[float, float], list[float]] = {key: [] for key in grid}
    for case in _cases(pipe, inputs):
        for p in percentiles:
            a = stats.activation_range(case.expert, case.layer, p, max_ratio).to(case.weight.device)
            tail = tail_rows(case.x, a)
            for alpha in alphas:
                total, on_tail = case.score(q, channel_mask(case.w, a, alpha, eps), tail)
                scores[alpha, p].append(total)
                if not math.isnan(on_tail):
                    tails[alpha, p].append(on_tail)
        logger.debug("searched %s %s", case.expert, case.layer)
    table = []
    for (alpha, p), values in scores.items():
        nmse = sum(10.0 ** (-v / 10.0) for v in values) / len(values)
        table.append({
            "alpha": alpha,
            "percentile": p,
            "mean_db": sum(values) / len(values),
            "worst_db": min(values),
            "nmse_db": math.inf if nmse == 0 else -10.0 * math.log10(nmse),
            "tail_worst_db": min(tails[alpha, p], default=math.nan),
            "layers": len(values),
        })
    return table


def state_fidelity(model: Any, state: PTQState, prompts: list[str], settings: CalibSettings,
                   seed_offset: int = HELD_OUT_SEED_OFFSET, max_tokens: int = 256) -> list[dict]:
    """Per-layer output SQNR of the state's quantized Linears on held-out inputs (before the state is applied).

    The inputs come from ``prompts`` (one BF16 generation each, seeds ``seed_for(seed_offset + i)``, clear of
    calibration's), sampled per timestep bin so that per-bin clip ratios are scored where they apply.
    Rows ``{"expert", "layer", "sqnr_db"}`` in model order.
    """
    adapter = adapter_for(model)
    held_out = settings.model_copy(update={"num_prompts": len(prompts), "seed": settings.seed_for(seed_offset)})
    edges = state.timestep_bins or adapter.bin_edges(1)
    groups = {expert: [g for group in adapter.input_groups(expert)
                       if (g := [x for x in group if qualify(expert, x) in state.layers])]
              for expert in adapter.experts()}
    inputs = collect_layer_inputs(model, prompts, held_out, groups, edges, max_tokens=max_tokens, hessians=False)
    rows = []
    for expert, records in inputs.items():
        for record in records.values():
            samples = record.bin_samples()
            for layer in record.layers:
                name = qualify(expert, layer)
                linear = adapter.linear(name)
                quantized = quant_linear(linear, state.layers[name], name=name)
                rows.append({"expert": expert, "layer": layer, "sqnr_db": binned_sqnr(linear, quantized, samples)})
    order = {qualify(e, n): i for i, e in enumerate(adapter.experts()) for n in adapter.target_linears(e)}
    return sorted(rows, key=lambda r: order[qualify(r["expert"], r["layer"])])
