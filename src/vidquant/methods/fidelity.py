"""Per-layer fidelity of smoothed W4A4 Linears on captured activations, and the (alpha, p) search.

Every target Linear is run on held-out inputs (`calib.capture.capture_inputs`) in fp32, unquantized
(the reference) and fake-quantized with `smoothing.smoothed_quant_output`, and scored by its output
SQNR in dB. Three variants per layer: no mask (RTN), masks from the calibration max (Eq. 5 into Eq. 8)
and masks from the p-th percentile (Eq. 6 into Eq. 8).

The search scores a setting by the mean over layers of the output SQNR in dB. Per-layer SQNR is
scale-free, so a layer counts the same whatever its output magnitude (a summed output MSE would be
decided by the few layers with planted / massive channels, whose outputs are orders of magnitude
larger), and the mean of dB is the log of the geometric mean of the per-layer normalized errors, so no
single layer decides it either. The worst layer and the SQNR of the mean normalized error
(``nmse_db``, which the worst layers dominate) are reported beside it.

Two things make single numbers misleading, and both are measured rather than hoped away:

- Mask scale. ``c · m`` folds to the same layer as ``m`` (Eq. 9), and for a power of two c the
  scaled formats quantize it identically too, but for other c the HiF4 / MX scales round elsewhere
  (NVFP4's fp32 tensor scale absorbs any c): on narrow layers a constant factor moves a layer's SQNR
  by about a dB either way.
  ``mask_scales`` (e.g. ``2^(k/4)``, k = 0..3, one octave) averages every score over such factors,
  so that a difference between two settings is not the luck of where their scales happen to round.
- Rare tokens. Token averages hide them, and they are what a percentile mask gives up on: a channel
  silent in more than (100 - p) % of tokens gets ``a_i^p ≈ 0`` and a huge mask, so its spike tokens
  lose the rest of their activation unit and the weight column is flushed to zero. So the *tail
  tokens* are scored on their own: held-out rows with some channel beyond ``TAIL_FACTOR`` times the
  ``a_i`` the mask was built from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calib.stats import CalibStats
from ..formats import Format
from ..models import wan
from .smoothing import (
    DEFAULT_EPS,
    FormatLike,
    activation_range,
    as_format,
    channel_mask,
    energy,
    ratio_db,
    smoothed_quant_output,
    weight_channel_max,
)

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_PERCENTILES = (99.0, 99.9, 99.99, 100.0)
TAIL_FACTOR = 2.0


@dataclass(frozen=True)
class _Quant:
    """How the layers are fake-quantized and scored."""

    weight_format: Format | None
    act_format: Format | None
    act_clip: float | None
    mask_scales: tuple[float, ...]

    @classmethod
    def of(cls, weight_format: FormatLike, act_format: FormatLike, act_clip: float | None,
           mask_scales: Sequence[float]) -> _Quant:
        scales = tuple(float(c) for c in mask_scales)
        if not scales or not all(math.isfinite(c) and c > 0 for c in scales):
            raise ValueError(f"mask_scales must be finite positive numbers, got {mask_scales}")
        return cls(as_format(weight_format), as_format(act_format), act_clip, scales)


@dataclass
class _Case:
    """One target Linear with its captured inputs and unquantized output, all fp32 on the weight's device."""

    expert: str
    layer: str
    x: Tensor
    weight: Tensor
    bias: Tensor | None
    reference: Tensor
    w: Tensor  # Eq. 7

    def __post_init__(self) -> None:
        self.signal = energy(self.reference)  # `sqnr_db`'s numerator, computed once per layer

    def score(self, q: _Quant, mask: Tensor | None, tail: Tensor | None = None) -> tuple[float, float]:
        """Output SQNR (dB) over all rows and over the ``tail`` rows (NaN if none), averaged over mask scales.

        The same quantity as `sqnr_db`, with the reference energy computed once rather than per call.
        """
        total, on_tail = [], []
        tail_signal = energy(self.reference[tail]) if tail is not None and tail.any() else None
        for c in q.mask_scales if mask is not None else (1.0,):
            out = smoothed_quant_output(
                self.x, self.weight, self.bias, q.weight_format, q.act_format,
                None if mask is None else mask * c, q.act_clip,
            )  # fmt: skip
            noise = out.sub_(self.reference)
            total.append(ratio_db(self.signal, energy(noise)))
            if tail_signal is not None:
                on_tail.append(ratio_db(tail_signal, energy(noise[tail])))
        return sum(total) / len(total), sum(on_tail) / len(on_tail) if on_tail else math.nan


def binned_sqnr(linear: nn.Linear, layer: nn.Module, bins: Sequence[Tensor | None]) -> float:
    """Output SQNR (dB) of a quantized ``layer`` against the unquantized ``linear`` over every bin's input rows.

    Rows of bin b run with ``layer.timestep_bin = b`` (per-bin clip ratios); signal and noise energies
    are pooled over the bins (None: a bin no input fell into). The reference is computed in fp32.
    """
    weight = linear.weight.detach().float()
    bias = None if linear.bias is None else linear.bias.detach().float()
    signal = noise = 0.0
    with torch.no_grad():
        for b, x in enumerate(bins):
            if x is None:
                continue
            layer.timestep_bin = b
            x = x.to(linear.weight.device)
            reference = F.linear(x.float(), weight, bias)
            signal += energy(reference)
            noise += energy(reference - layer(x.to(linear.weight.dtype)).float())
    return ratio_db(signal, noise)


def tail_rows(x: Tensor, a: Tensor, factor: float = TAIL_FACTOR) -> Tensor:
    """Rows of ``x`` with some channel beyond ``factor · a_i``: the tokens a mask built from ``a`` is not sized for."""
    return (x.abs() > factor * a).any(dim=-1)


def _cases(pipe, inputs: dict[str, dict[str, Tensor]]) -> Iterator[_Case]:
    """The captured target Linears, one at a time (a 14B expert's inputs never sit in fp32 all at once)."""
    experts = wan.experts(pipe)
    for expert, layers in inputs.items():
        if expert not in experts:
            raise ValueError(f"inputs for unknown expert '{expert}'; the pipeline has {', '.join(experts)}")
        linears = wan.target_linears(experts[expert])
        if unknown := sorted(set(layers) - set(linears)):
            raise ValueError(f"{expert}: captured inputs for {', '.join(unknown)}, which are not target Linears")
        for layer in (name for name in linears if name in layers):
            lin = linears[layer]
            weight = lin.weight.detach().float()
            x = layers[layer].to(weight.device, torch.float32)
            bias = None if lin.bias is None else lin.bias.detach().float()
            with torch.no_grad():
                reference = F.linear(x, weight, bias)
            yield _Case(expert, layer, x, weight, bias, reference, weight_channel_max(weight))


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
    ``mask_scales``; ``max_ratio`` guards the percentile (`activation_range`). nvfp4's per-tensor
    activation scale is taken over all captured rows of a layer at once.
    """
    q = _Quant.of(weight_format, act_format, act_clip, mask_scales)
    rows = []
    for case in _cases(pipe, inputs):
        device = case.weight.device
        a_max = activation_range(stats, case.expert, case.layer, 100.0).to(device)
        a_pct = activation_range(stats, case.expert, case.layer, percentile, max_ratio).to(device)
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
    the percentile (`activation_range`). The best setting is the row with the highest ``mean_db``.
    """
    q = _Quant.of(weight_format, act_format, act_clip, mask_scales)
    grid = [(alpha, p) for p in percentiles for alpha in alphas]
    scores: dict[tuple[float, float], list[float]] = {key: [] for key in grid}
    tails: dict[tuple[float, float], list[float]] = {key: [] for key in grid}
    for case in _cases(pipe, inputs):
        for p in percentiles:
            a = activation_range(stats, case.expert, case.layer, p, max_ratio).to(case.weight.device)
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
