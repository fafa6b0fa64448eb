"""Exact rounding onto small floating-point grids (E2M1, E4M3, E5M2, E6M2, E8M0), in torch ops.

Every step is exact in fp32 (powers of two are built from their bits, scaling by them never rounds),
so the only rounding is the one the format asks for.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Ties = Literal["even", "away"]


def pow2(e: Tensor) -> Tensor:
    """2**e as fp32, exactly, for integer ``e`` in [-126, 127] (built from the exponent bits)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def floor_log2(a: Tensor) -> Tensor:
    """floor(log2 a) as int32, read exactly off the fp32 exponent (a >= 0, finite; 0 gives -127)."""
    bits = a.to(torch.float32).view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    # fp32 subnormals: the exponent field is 0; the mantissa, as an exact fp32 integer, has the answer.
    mant = bits & 0x7FFFFF
    e_sub = ((mant.to(torch.float32).view(torch.int32) >> 23) & 0xFF) - 127 - 149
    return torch.where((e == -127) & (mant != 0), e_sub, e)


def round_half(v: Tensor, ties: Ties) -> Tensor:
    """Round to an integer: ties to even (RNE) or away from zero (RHA) on magnitudes v >= 0.

    RHA is ``floor(v + 0.5)`` in fp32, as formats.md and the challenge simulator write it: exact for
    every v >= 1 and for bf16/fp16-derived v, while the one fp32 value just below 0.5 rounds up.
    """
    return torch.round(v) if ties == "even" else torch.floor(v + 0.5)


def round_to_minifloat(a: Tensor, man_bits: int, min_exp: int, max_value: float, ties: Ties = "even") -> Tensor:
    """Round magnitudes ``a`` (fp32, >= 0, finite) to a minifloat grid, saturating at ``max_value``.

    The grid has ``man_bits`` mantissa bits, normal exponents from ``min_exp`` up and subnormals below
    2**min_exp with step 2**(min_exp - man_bits), i.e. OCP FP8/FP4 without their Inf/NaN codes.
    """
    e = torch.clamp(floor_log2(a), min=min_exp)
    scaled = a * pow2(man_bits - e)
    return torch.clamp(round_half(scaled, ties) * pow2(e - man_bits), max=max_value)


def minifloat_code(q: Tensor, man_bits: int, bias: int) -> Tensor:
    """Unsigned bit code (exponent | mantissa) of grid magnitudes ``q`` from `round_to_minifloat`."""
    e = torch.clamp(floor_log2(q), min=1 - bias)
    mant = (q * pow2(man_bits - e)).to(torch.int32)  # exact: q is on the grid
    normal = mant >= (1 << man_bits)
    field = torch.where(normal, e + bias, torch.zeros_like(e))
    mant = torch.where(normal, mant - (1 << man_bits), mant)
    return (field << man_bits) | mant


def minifloat_value(code: Tensor, man_bits: int, bias: int) -> Tensor:
    """Inverse of `minifloat_code`: fp32 magnitudes of unsigned codes."""
    code = code.to(torch.int32)
    field = code >> man_bits
    mant = (code & ((1 << man_bits) - 1)).to(torch.float32)
    normal = field > 0
    e = torch.where(normal, field - bias, torch.full_like(field, 1 - bias))
    frac = torch.where(normal, mant + (1 << man_bits), mant)
    return frac * pow2(e - man_bits)
