"""The math of per-layer fidelity: output SQNR of a fake-quantized Linear against its reference, on tensors.

A layer's case (`LayerCase`: inputs, weight, reference output) is scored by its output SQNR in dB under a
quantization spec (`QuantSpec`); `eval.fidelity` runs it over a model's Linears and searches (alpha, p).

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import Format
from .smoothing import (
    FormatLike,
    as_format,
    energy,
    ratio_db,
    smoothed_quant_output,
)

logger = logging.getLogger(__name__)

TAIL_FACTOR = 2.0
_CHUNK = 1 << 22  # output values per product when summing an output energy: 16 MB of fp32 temporaries


def output_energy(x: Tensor, weight: Tensor) -> float:
    """``||x weight^T||_F^2``: the energy of a Linear's output (or, for a weight difference, of its output error).

    ``x`` (M, K) held-out rows, ``weight`` (N, K). Products in fp32 over chunks of output channels, sums in
    fp64: M x N x K multiply-adds and an (M, chunk) temporary, never an (M, N) one (at M = 1024 rows and a
    13824 x 5120 weight, 72 GFLOP and 16 MB, against the 362 GFLOP of one ``tr(dW H dW^T)`` at K = 5120).
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"output_energy: x (M, K) and weight (N, K) must agree in K, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    x = x.float()
    rows = max(1, _CHUNK // max(x.shape[0], 1))
    total = 0.0
    for part in weight.split(rows):
        total += float((x @ part.float().T).square().sum(dtype=torch.float64))
    return total


def row_output_energy(x: Tensor, weight: Tensor) -> Tensor:
    """Per row of ``x`` (M, K), ``||x_m weight^T||^2`` as fp64 (M,): `output_energy` row by row, same chunking."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"row_output_energy: x (M, K) and weight (N, K) must agree in K, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    x = x.float()
    rows = max(1, _CHUNK // max(x.shape[0], 1))
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for part in weight.split(rows):
        total += (x @ part.float().T).square().sum(dim=1, dtype=torch.float64)
    return total


def relative_output_error(x: Tensor, weight: Tensor, quantized: Tensor) -> float:
    """``||x (quantized - weight)^T||^2 / ||x weight^T||^2`` on the rows ``x``: inf for a zero output with error."""
    reference = output_energy(x, weight)
    error = output_energy(x, quantized.float() - weight.float())
    if reference > 0:
        return error / reference
    return 0.0 if error == 0 else math.inf


@dataclass(frozen=True)
class QuantSpec:
    """How the layers are fake-quantized and scored."""

    weight_format: Format | None
    act_format: Format | None
    act_clip: float | None
    mask_scales: tuple[float, ...]

    @classmethod
    def of(cls, weight_format: FormatLike, act_format: FormatLike, act_clip: float | None,
           mask_scales: Sequence[float]) -> QuantSpec:
        scales = tuple(float(c) for c in mask_scales)
        if not scales or not all(math.isfinite(c) and c > 0 for c in scales):
            raise ValueError(f"mask_scales must be finite positive numbers, got {mask_scales}")
        return cls(as_format(weight_format), as_format(act_format), act_clip, scales)


@dataclass
class LayerCase:
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

    def score(self, q: QuantSpec, mask: Tensor | None, tail: Tensor | None = None) -> tuple[float, float]:
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
