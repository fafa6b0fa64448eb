"""Straight-through estimators through a format's quantize-dequantize, for quantization-aware fine-tuning.

The forward of every function here is the format's own ``quantize_dequantize`` (the numba / Triton / torch
kernels, bit for bit what inference computes); only the backward is new.

- `ste_quantize` (Bengio et al. 2013's straight-through estimator with the clipped-STE rule of PACT, Choi et
  al. 2018, Eq. 3, and LSQ, Esser et al. 2020, Eq. 5 "inside the range")::

      dQ(x)/dx = 1  if |x| <= max_value (the format's largest finite magnitude)    else 0

  Block-scaled formats (HiF4, MX, NVFP4, INT-g64, per-row FP8/INT) scale every unit to its own max, so nothing
  is outside their range and the gradient is the identity; HiF8 saturates at 32768, beyond which it is zero.
- `ste_quantize_input` (the activation half of the tail-aware paper's Eq. 9 with a per-token clip ratio r of
  ``max|v|``, `smoothing.quantize_input`): values inside the clip pass the gradient straight through, values at
  or beyond it give it to the ratio, PACT's Eq. 3 with the clip bound ``alpha = r · max|v|`` per token::

      dL/dv = dL/dQ · 1[|v| <= r·m]          dL/dr = sum over |v| >= r·m of dL/dQ · sign(v) · m

  (``m`` = the token's max |v|, held constant as PACT holds its input range; at r = 1 the token's max itself is
  "at the clip", so a ratio of 1 still learns whether shrinking the peak helps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..formats import Format
from .smoothing import FormatLike, as_format


class _QuantizeSTE(torch.autograd.Function):
    """Forward: ``fmt.quantize_dequantize(x, dim)``; backward: identity inside the format's range, 0 outside."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt: Format, dim: int) -> Tensor:  # type: ignore[override]
        limit = fmt.max_value
        if math.isfinite(limit):
            ctx.save_for_backward(x.abs() <= limit)
        else:
            ctx.save_for_backward(None)
        return fmt.quantize_dequantize(x.detach(), dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return (grad if inside is None else grad * inside), None, None


def ste_quantize(x: Tensor, fmt: FormatLike, dim: int = -1) -> Tensor:
    """``fmt.quantize_dequantize(x, dim)`` with the clipped straight-through gradient (module docstring)."""
    fmt = as_format(fmt)
    if fmt is None:
        return x
    return _QuantizeSTE.apply(x, fmt, dim)


class _ClipQuantizeSTE(torch.autograd.Function):
    """Forward: `smoothing.quantize_input`'s clip and quantize (no mask); backward: PACT's Eq. 3 (docstring)."""

    @staticmethod
    def forward(ctx, v: Tensor, ratio: Tensor, fmt: Format | None) -> Tensor:  # type: ignore[override]
        peak = v.detach().abs().amax(dim=-1, keepdim=True)
        bound = peak * ratio.detach()  # the same expression, in the same order, as quantize_input
        clipped = torch.clamp(v.detach(), -bound, bound)
        ctx.save_for_backward(v.detach(), bound, peak)
        ctx.ratio_shape = ratio.shape
        return clipped if fmt is None else fmt.quantize_dequantize(clipped, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        v, bound, peak = ctx.saved_tensors
        size = v.abs()
        grad_v = grad * (size <= bound) if ctx.needs_input_grad[0] else None
        grad_r = None
        if ctx.needs_input_grad[1]:
            at_clip = size >= bound
            grad_r = (grad * at_clip * torch.sign(v) * peak).sum().reshape(ctx.ratio_shape).to(grad.dtype)
        return grad_v, grad_r, None


def ste_quantize_input(v: Tensor, fmt: FormatLike, ratio: Tensor | float | None = None) -> Tensor:
    """Clip each token of ``v`` to ±ratio·max|v| and quantize it along the last dim, with PACT's gradient.

    Bit for bit `smoothing.quantize_input(v, None, fmt, ratio)` in the forward (``v`` already in fp32 or wider);
    ``ratio`` may be a trainable scalar tensor (it receives dL/dr), None: no clipping (plain `ste_quantize`).
    """
    fmt = as_format(fmt)
    if ratio is None:
        return ste_quantize(v, fmt)
    ratio_t = ratio if isinstance(ratio, Tensor) else torch.tensor(float(ratio), dtype=v.dtype, device=v.device)
    if ratio_t.numel() != 1:
        raise ValueError(f"ste_quantize_input: one clip ratio per call, got shape {tuple(ratio_t.shape)}")
    return _ClipQuantizeSTE.apply(v, ratio_t, fmt)
