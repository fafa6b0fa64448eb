"""Signed minifloat element grids shared by the scaled formats (MX, NVFP4, FP8), and exact division.

An element code is a sign bit on top of the unsigned ``exponent | mantissa`` code that
`minifloat.minifloat_code` builds: E2M1 in a nibble (bit 3 = sign), OCP E4M3 / E5M2 in a byte
(bit 7 = sign), as docs/formats.md § Baselines defines them. Encoding rounds the magnitude and
saturates, so it never produces an Inf/NaN code; decoding honours the OCP special codes anyway, so
that bytes written elsewhere read back as the OFP8 spec says. The sign of zero is kept (-0 has a code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .minifloat import Ties, minifloat_code, minifloat_value, round_to_minifloat

Specials = Literal["none", "fn", "ieee"]  # no Inf/NaN codes; S.1111.111 is NaN (E4M3FN); IEEE-style


@dataclass(frozen=True)
class ElementGrid:
    """One minifloat element type: ``bits`` in all, ``man_bits`` mantissa bits, exponent ``bias``."""

    name: str
    bits: int
    man_bits: int
    bias: int
    max_value: float
    specials: Specials = "none"

    @property
    def emax(self) -> int:
        """Exponent of the largest binade (E2M1 2, E4M3 8, E5M2 15): MX subtracts it from the amax's."""
        return math.floor(math.log2(self.max_value))

    @property
    def kernel_grid(self) -> tuple[int, int, float]:
        """``(man_bits, min_exp, max_value)``: the grid as the numba kernels take it (`kernels.round_grid`)."""
        return self.man_bits, 1 - self.bias, self.max_value

    @property
    def sign_bit(self) -> int:
        return 1 << (self.bits - 1)

    def round(self, a: Tensor, ties: Ties = "even") -> Tensor:
        """Magnitudes ``a`` (fp32, >= 0, finite) rounded onto the grid and saturated at `max_value`."""
        return round_to_minifloat(a, self.man_bits, 1 - self.bias, self.max_value, ties)

    def code(self, q: Tensor) -> Tensor:
        """Unsigned codes (int32) of grid magnitudes ``q``."""
        return minifloat_code(q, self.man_bits, self.bias)

    def quantize(self, v: Tensor, ties: Ties = "even") -> Tensor:
        """uint8 codes of fp32 values ``v`` (finite): sign bit | code of the rounded magnitude."""
        sign = torch.signbit(v).to(torch.int32) * self.sign_bit
        return (self.code(self.round(v.abs(), ties)) | sign).to(torch.uint8)

    def value(self, codes: Tensor) -> Tensor:
        """fp32 values of element codes (inverse of `quantize` on its codes)."""
        c = codes.to(torch.int32)
        magnitude_code = c & (self.sign_bit - 1)
        magnitude = self._specials(magnitude_code, minifloat_value(magnitude_code, self.man_bits, self.bias))
        return torch.where(c >= self.sign_bit, -magnitude, magnitude)

    def _specials(self, magnitude_code: Tensor, magnitude: Tensor) -> Tensor:
        top = self.sign_bit - 1
        if self.specials == "fn":
            return torch.where(magnitude_code == top, math.nan, magnitude)
        if self.specials == "ieee":
            inf_code = top & ~((1 << self.man_bits) - 1)
            special = torch.where(magnitude_code == inf_code, math.inf, math.nan)
            return torch.where(magnitude_code >= inf_code, special, magnitude)
        return magnitude


E2M1 = ElementGrid("E2M1", bits=4, man_bits=1, bias=1, max_value=6.0)
E4M3 = ElementGrid("E4M3", bits=8, man_bits=3, bias=7, max_value=448.0, specials="fn")
E5M2 = ElementGrid("E5M2", bits=8, man_bits=2, bias=15, max_value=57344.0, specials="ieee")


def div_scalar(a: Tensor, c: float) -> Tensor:
    """``a / c`` rounded once, on every device.

    CUDA evaluates ``tensor / python_scalar`` as a multiplication by the rounded reciprocal of the
    scalar, which is not the fp32 division docs/formats.md writes; dividing by a tensor is.
    """
    return a / torch.full((), c, dtype=a.dtype, device=a.device)
