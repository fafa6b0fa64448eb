"""Channel balancing (SmoothQuant-style masks, tail-aware paper § III-B, § IV-D): the tensor math only.

For a Linear ``y = x W^T + b`` and a per-input-channel mask ``m > 0`` (Eq. 3 / Eq. 9)::

    x W^T = (x diag(m)) (W diag(m)^-1)^T

holds exactly before quantization; afterwards ``Q_a(x · m)`` and ``Q_w(W / m)`` see rebalanced ranges.
The mask is Eq. 8, ``m_i = w_i^alpha / (a_i + eps)^(1 - alpha)``, with ``w_i`` the column max of |W|
(Eq. 7) and ``a_i`` an activation range per channel: the max (Eq. 5) or a p-th percentile (Eq. 6).
After folding, channel i of the activations peaks at ``(a_i w_i)^alpha`` and column i of the weights
at ``(a_i w_i)^(1 - alpha)``: ``alpha`` is the share of the difficulty moved onto the activations
(alpha = 1: m = w, flat weight columns; alpha = 0: m = 1 / a, flat activation channels).

`fold_weight` and `quantize_input` are the two halves of a fake-quantized Linear and
`smoothed_quant_output` composes them: every quantized layer and every error measurement uses these,
so there is one definition of the arithmetic. Both quantize along the reduction dim K (dim=-1):
weights per output row, activations per token.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import formats
from ..formats import Format

logger = logging.getLogger(__name__)

DEFAULT_EPS = 1e-6  # Eq. 8's stabilizer; only matters for channels whose range is below it
_FP32 = torch.finfo(torch.float32)

FormatLike = Format | str | None


def as_format(fmt: FormatLike) -> Format | None:
    """A `Format` from a registry name (None: no quantization on that path)."""
    return formats.get(fmt) if isinstance(fmt, str) else fmt


def weight_channel_max(weight: Tensor) -> Tensor:
    """Eq. 7: ``w_i = max_o |W_oi|`` of a ``(out, in)`` weight, as an fp32 ``(in,)`` vector."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    return weight.detach().abs().amax(dim=0).float()


def channel_mask(w: Tensor, a: Tensor, alpha: float, eps: float = DEFAULT_EPS) -> Tensor:
    """Eq. 8: ``m_i = w_i^alpha / (a_i + eps)^(1 - alpha)``, fp32, always finite and > 0.

    A channel with ``w_i == 0`` (a dead weight column) or ``a_i == 0`` (an input never seen non-zero in
    calibration) gets ``m_i = 1``: there is nothing to balance, and 1 keeps both ``W / m`` and
    ``x · m`` finite. Evaluated in float64 and rounded once to fp32, then kept inside fp32's normal range.
    """
    if w.shape != a.shape or w.dim() != 1:
        raise ValueError(f"w and a must be 1-D vectors of one length, got {tuple(w.shape)} and {tuple(a.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    w64, a64 = w.detach().double(), a.detach().to(w.device, torch.float64)
    for name, v in (("w", w64), ("a", a64)):
        if not torch.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"channel_mask: {name} must be finite and >= 0 (a range per channel)")
    m = w64.pow(alpha) / (a64 + eps).pow(1.0 - alpha)
    m = torch.where((w64 == 0) | (a64 == 0), 1.0, m)
    return m.clamp(_FP32.tiny, _FP32.max).float()


def guarded_range(a_max: Tensor, a_p: Tensor | None = None, max_ratio: float | None = None) -> Tensor:
    """``a_i`` per input channel: the calibration max (Eq. 5), or the p-th percentile ``a_p`` (Eq. 6) guarded.

    ``max_ratio`` guards the percentile against channels that are silent in more than (100 - p) % of
    tokens: ``a_i = max(a_i^p, a_i^max / max_ratio)``, so no channel's range shrinks more than that factor
    below its calibration max (None: the plain percentile).
    """
    if max_ratio is not None and not max_ratio >= 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    if a_p is None:
        return a_max
    a_p = a_p.to(a_max.device)
    return a_p if max_ratio is None else torch.maximum(a_p, a_max / max_ratio)


def fold_weight(
    weight: Tensor, mask: Tensor | None = None, fmt: FormatLike = None, lowrank: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Weight half of Eq. 9: ``Q_w(W diag(m)^-1 - up · down)``, quantized per output row along K, in ``weight``'s dtype.

    ``lowrank = (down (r, K), up (N, r))`` is SVDQuant's branch, kept apart in 16 bits: only the residual is
    quantized. The division and the quantization run in fp32 (exact for a bf16 weight), then the result is
    cast back: HiF4 / HiF8 / MX values are exact in bf16, the float-scaled formats round once there.
    """
    fmt = as_format(fmt)
    w = residual_weight(weight, mask, lowrank)
    if fmt is not None:
        w = fmt.quantize_dequantize(w, dim=-1)
    return w.to(weight.dtype)


def residual_weight(
    weight: Tensor, mask: Tensor | None = None, lowrank: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """``W diag(m)^-1 - up · down`` in fp32 (or wider): what the weight format quantizes (SVDQuant's residual R)."""
    w = weight.detach().to(_wide(weight.dtype))
    if mask is not None:
        w = w / mask
    if lowrank is not None:
        down, up = lowrank
        w = w - up.to(w.dtype) @ down.to(w.dtype)
    return w


def quantize_input(
    x: Tensor, mask: Tensor | None = None, fmt: FormatLike = None, clip: float | Tensor | None = None
) -> Tensor:
    """Activation half of Eq. 9: ``Q_a(clip(x diag(m)))``, groups along the features of each token.

    ``clip`` (in (0, 1]) clamps every token to ±clip · its own max |x · m| before quantization (None:
    no clipping). Runs in fp32 (or wider) and returns ``x``'s dtype; with nothing to do it returns ``x``.
    """
    fmt = as_format(fmt)
    if mask is None and fmt is None and clip is None:
        return x
    v = x.to(_wide(x.dtype))
    if mask is not None:
        v = v * mask
    if clip is not None:
        if not isinstance(clip, Tensor) and not 0.0 < clip <= 1.0:  # tensors are checked by their owner
            raise ValueError(f"activation clip must be in (0, 1], got {clip}")
        bound = v.abs().amax(dim=-1, keepdim=True) * clip
        v = torch.clamp(v, -bound, bound)
    if fmt is not None:
        v = fmt.quantize_dequantize(v, dim=-1)
    return v.to(x.dtype)


def smoothed_quant_output(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    weight_format: FormatLike,
    act_format: FormatLike,
    mask: Tensor | None = None,
    act_clip: float | None = None,
) -> Tensor:
    """The fake-quantized Linear: ``F.linear(Q_a(clip(x · m)), Q_w(W / m), b)`` (Eq. 2 with Eq. 9).

    With both formats None and no clip this equals ``F.linear(x, W, b)`` up to fp rounding of ``m``.
    """
    return F.linear(quantize_input(x, mask, act_format, act_clip), fold_weight(weight, mask, weight_format), bias)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32, or the input's dtype when it is wider (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - approx||^2)``, accumulated in float64.

    The difference is taken in fp32 or wider (exact upcasts of bf16 / fp16), the squares summed in
    float64. inf when the two are equal (zero noise), -inf for a zero reference with non-zero noise,
    NaN when either holds NaN.
    """
    if reference.shape != approx.shape:
        raise ValueError(f"sqnr_db: shapes differ, {tuple(reference.shape)} vs {tuple(approx.shape)}")
    dtype = torch.promote_types(torch.promote_types(reference.dtype, approx.dtype), torch.float32)
    ref = reference.detach().to(dtype)
    return ratio_db(energy(ref), energy(ref - approx.detach().to(ref.device, dtype)))


def energy(t: Tensor) -> float:
    """``||t||^2``, accumulated in float64."""
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2


def ratio_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` of two energies: inf for zero noise, -inf for zero signal, NaN for NaN."""
    if noise == 0:
        return math.inf
    ratio = signal / noise
    if ratio == 0:
        return -math.inf
    return 10.0 * math.log10(ratio) if ratio == ratio else math.nan
