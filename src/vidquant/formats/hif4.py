"""HiFloat4 (HiF4): 64-value units, an E6M2 scale and 1-bit sub-block exponents (docs/formats.md).

One unit = 64 values along K: an E6M2 scale ``s``, 8 one-bit ``Eb`` (per 8 values), 16 one-bit
``Ec`` (per 4 values) and 64 sign + 3-bit magnitude codes ``c``; value = ±(c/4)·2^(Eb+Ec)·s.
The conversion is the challenge simulator's "v14" algorithm, steps 1-8 of formats.md.

Two implementations of the one algorithm, which the tests hold equal bit for bit:
- torch ops (`unit_metadata`, `round_elements`, `element_values`): any device; encode, decode,
  and the GPTQ quantizer reuse them;
- numba kernels (`kernels.hif4_qdq`, `kernels.hif4_decode`): quantize_dequantize and decode on the CPU
  in one pass over memory.

Packing (the hardware order, fixed by formats.md): per unit 32 element bytes (low nibble = even
element; nibble = bit3 sign, bits2:0 code) then 4 metadata bytes ``[Ea, Eb, Ec_lo, Ec_hi]`` with the
Eb/Ec bits LSB first: 36 bytes per 64 values, 4.5 bits per value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .base import ColumnQuantizer, Format, pad_rows, use_cpu_kernels
from .kernels import every_byte, kernel_array
from .minifloat import floor_log2, pow2, round_half, round_to_minifloat
from .packing import pack_elements, unpack_elements
from .registry import register

UNIT = 64
INV7 = 0.142578125  # bf16(1/7), step 2
SCALE_MIN, SCALE_MAX = 2.0**-48, 49152.0  # E6M2 range
SCALE_BIAS = 48
SCALE_NAN = 0xFF  # reserved E6M2 code: the unit held a NaN
UNIT_BYTES = 36


# ---- torch ops: the algorithm as written ------------------------------------------------------------
def unit_metadata(a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-6 on magnitudes ``a`` of shape (..., 64), fp32, finite.

    Returns the scale ``s`` and its rounded reciprocal ``r`` (shape (..., 1)), ``eb`` (..., 8) and
    ``ec`` (..., 16) as fp32 0/1. The rounded ``r`` (not 1/s) is what makes it bit-exact (step 4).
    """
    m4 = a.unflatten(-1, (16, 4)).amax(-1)
    m8 = m4.unflatten(-1, (8, 2)).amax(-1)
    m64 = m8.amax(-1, keepdim=True)
    sf = torch.clamp(m64 * INV7, SCALE_MIN, SCALE_MAX).to(torch.bfloat16).float()
    s = round_to_minifloat(sf, man_bits=2, min_exp=-SCALE_BIAS, max_value=SCALE_MAX)
    r = (1.0 / s).to(torch.bfloat16).float()
    eb = (m8 * r >= 4).float()
    ec = (m4 * r * pow2(-eb.repeat_interleave(2, -1)) >= 2).float()
    return s, r, eb, ec


def element_exponents(eb: Tensor, ec: Tensor) -> Tensor:
    """Eb + Ec for each of the 64 elements of a unit, shape (..., 64)."""
    return eb.repeat_interleave(8, -1) + ec.repeat_interleave(4, -1)


def round_elements(a: Tensor, r: Tensor, eb: Tensor, ec: Tensor) -> Tensor:
    """Step 7: magnitude codes c in 0..7 (fp32) of magnitudes ``a`` under fixed unit metadata."""
    return round_magnitudes(a, r, element_exponents(eb, ec))


def element_values(c: Tensor, s: Tensor, eb: Tensor, ec: Tensor) -> Tensor:
    """Step 8: magnitudes (c/4)·2^(Eb+Ec)·s, fp32 (exact)."""
    return magnitudes(c, s, element_exponents(eb, ec))


def round_magnitudes(a: Tensor, r: Tensor, p: Tensor) -> Tensor:
    """Step 7 given each element's exponent ``p`` = Eb + Ec: codes c in 0..7 (fp32)."""
    t = a * pow2(-p) * r  # a / 2^(Eb+Ec) · r, exactly
    return torch.clamp(round_half(4 * t, "away"), max=7)


def magnitudes(c: Tensor, s: Tensor, p: Tensor) -> Tensor:
    """Step 8 given each element's exponent ``p`` = Eb + Ec: (c/4)·2^p·s, fp32 (exact)."""
    return c * 0.25 * pow2(p) * s


def signed_codes(x: Tensor, c: Tensor) -> Tensor:
    """uint8 element nibbles: bit 3 = the sign of ``x``, bits 2:0 = the magnitude code ``c``."""
    return (torch.signbit(x).to(torch.uint8) << 3) | c.to(torch.uint8)


def code_values(codes: Tensor, s: Tensor, p: Tensor) -> Tensor:
    """fp32 values of element nibbles under scale ``s`` and element exponents ``p`` (step 8, signed)."""
    codes = codes.to(torch.int32)
    mag = magnitudes((codes & 7).float(), s, p)
    return torch.where((codes & 8) > 0, -mag, mag)


def scale_code(s: Tensor) -> Tensor:
    """E6M2 byte of scales ``s`` (bits 7:2 exponent + 48, bits 1:0 mantissa; no zero, no subnormals)."""
    e = floor_log2(s)
    mant = (s * pow2(2 - e)).to(torch.int32) - 4
    return (((e + SCALE_BIAS) << 2) | mant).to(torch.uint8)


def scale_value(code: Tensor) -> Tensor:
    """fp32 value of E6M2 bytes; the reserved 0xFF is NaN."""
    code = code.to(torch.int32)
    s = ((code & 3) + 4).float() * pow2((code >> 2) - SCALE_BIAS - 2)
    return torch.where(code == SCALE_NAN, torch.nan, s)


def _bits_to_mask(bits: Tensor) -> Tensor:
    """(..., 8) 0/1 -> (...) uint8, bit i = entry i."""
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=bits.device)
    return (bits.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _mask_to_bits(mask: Tensor) -> Tensor:
    """(...) uint8 -> (..., 8) uint8 0/1."""
    shifts = torch.arange(8, dtype=torch.int32, device=mask.device)
    return ((mask.to(torch.int32).unsqueeze(-1) >> shifts) & 1).to(torch.uint8)


@dataclass(frozen=True)
class HiF4Format(Format):
    """HiF4 W4A4 format; ``encode`` meta: ``scale`` (R, U) E6M2 bytes, ``eb`` (R, U, 8), ``ec`` (R, U, 16)."""

    def _encode_rows(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = pad_rows(rows.float(), UNIT).unflatten(-1, (-1, UNIT))  # (R, U, 64)
        nan_unit = torch.isnan(x).any(-1, keepdim=True)
        a = torch.where(nan_unit, 0.0, x.abs())
        s, r, eb, ec = unit_metadata(a)
        codes = torch.where(nan_unit, 0, signed_codes(x, round_elements(a, r, eb, ec))).to(torch.uint8)
        scale = torch.where(nan_unit, SCALE_NAN, scale_code(s)).squeeze(-1)
        meta = {"scale": scale, "eb": eb.to(torch.uint8), "ec": ec.to(torch.uint8)}
        return codes.flatten(-2), meta

    def _decode_rows(self, codes: Tensor, meta: dict[str, Tensor], k: int) -> Tensor:
        s = scale_value(meta["scale"]).unsqueeze(-1)
        p = element_exponents(meta["eb"].float(), meta["ec"].float())
        return code_values(codes.unflatten(-1, (-1, UNIT)), s, p).flatten(-2)[:, :k]

    def _decode_rows_as(self, codes: Tensor, meta: dict[str, Tensor], k: int, dtype: torch.dtype) -> Tensor:
        if not use_cpu_kernels(codes):
            return super()._decode_rows_as(codes, meta, k, dtype)
        n, units = codes.shape[0], -(-k // UNIT)
        layout = {"scale": (n, units), "eb": (n, units, 8), "ec": (n, units, 16)}
        kernels.check_layout(codes, k, {key: (meta[key], shape) for key, shape in layout.items()})
        out = torch.empty(n, k, dtype=dtype)
        arrays = [t.contiguous().numpy() for t in (codes, meta["scale"], meta["eb"], meta["ec"])]
        kernels.hif4_decode(*arrays, scale_value(every_byte()).numpy(), kernel_array(out))
        return out

    def _decode_packed_rows(self, data: Tensor, n_rows: int, k: int, dtype: torch.dtype) -> Tensor:
        out = torch.empty(n_rows, k, dtype=dtype)
        table = _packed_table(self, dtype)
        kernels.hif4_decode_packed(data.numpy().reshape(n_rows, -1), table, kernels.bits_array(out))
        return out

    def _pack_rows(self, codes: Tensor, meta: dict[str, Tensor]) -> Tensor:
        elements = pack_elements(codes.unflatten(-1, (-1, UNIT)), bits=4)  # (R, U, 32)
        eb = _bits_to_mask(meta["eb"])
        ec = _bits_to_mask(meta["ec"].unflatten(-1, (2, 8)))
        header = torch.stack([meta["scale"], eb, ec[..., 0], ec[..., 1]], -1)  # (R, U, 4)
        return torch.cat([elements, header], -1)

    def _unpack_rows(self, data: Tensor, n_rows: int, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        units = data.reshape(n_rows, -1, UNIT_BYTES)
        elements, header = units[..., :32], units[..., 32:]
        codes = unpack_elements(elements, bits=4)  # (R, U, 64)
        meta = {
            "scale": header[..., 0].clone(),
            "eb": _mask_to_bits(header[..., 1]),
            "ec": _mask_to_bits(header[..., 2:4]).flatten(-2),
        }
        return codes.flatten(-2), meta

    def packed_nbytes(self, n_rows: int, k: int) -> int:
        return n_rows * self.padded(k) // UNIT * UNIT_BYTES

    def column_quantizer(self, weight: Tensor) -> HiF4Columns:
        return HiF4Columns(self, weight)

    def _qdq_rows(self, rows: Tensor) -> Tensor:
        if not use_cpu_kernels(rows):
            return super()._qdq_rows(rows)
        out = torch.empty_like(rows)
        kernels.hif4_qdq(kernel_array(rows), kernel_array(out), _RECIPROCALS, INV7, SCALE_MIN, SCALE_MAX)
        return out


class HiF4Columns(ColumnQuantizer):
    """GPTQ's HiF4 quantizer: `enter` runs steps 1-6 on a unit, `round` runs steps 7-8 on one column of it."""

    def __init__(self, fmt: HiF4Format, weight: Tensor) -> None:
        super().__init__(fmt, weight)
        n, units = self.rows, self.n_blocks
        zeros = torch.zeros
        self.meta = {
            "scale": zeros(n, units, dtype=torch.uint8, device=self.device),
            "eb": zeros(n, units, 8, dtype=torch.uint8, device=self.device),
            "ec": zeros(n, units, 16, dtype=torch.uint8, device=self.device),
        }
        self._s = zeros(n, units, dtype=torch.float32, device=self.device)  # the unit's scale s
        self._r = zeros(n, units, dtype=torch.float32, device=self.device)  # and its rounded reciprocal r

    def _enter(self, block: int, values: Tensor) -> None:
        s, r, eb, ec = unit_metadata(values.abs())
        self._s[:, block], self._r[:, block] = s[:, 0], r[:, 0]
        self.meta["scale"][:, block] = scale_code(s)[:, 0]
        self.meta["eb"][:, block] = eb.to(torch.uint8)
        self.meta["ec"][:, block] = ec.to(torch.uint8)

    def _round(self, column: int, values: Tensor) -> Tensor:
        unit, i = divmod(column, UNIT)
        p = (self.meta["eb"][:, unit, i // 8] + self.meta["ec"][:, unit, i // 4]).float()  # Eb + Ec of element i
        codes = signed_codes(values, round_magnitudes(values.abs(), self._r[:, unit], p))
        self.codes[:, column] = codes
        return code_values(codes, self._s[:, unit], p)


@functools.cache
def _packed_table(fmt: HiF4Format, dtype: torch.dtype) -> np.ndarray:
    """Output bits of every (E6M2 byte, Eb + Ec, nibble), flat, for `kernels.hif4_decode_packed`, by the torch decode.

    Row r is a unit with scale byte r three times over, with Eb + Ec = 0, 1, 2, each holding the nibbles 0..15
    four times; ``_decode_rows(...).to(dtype)`` is exactly what `decode` computes for any unit's element.
    """
    codes = torch.arange(16, dtype=torch.uint8).repeat(256, 3 * 4)  # (256, 3 units x 64)
    eb = torch.tensor([0, 0, 1], dtype=torch.uint8).reshape(1, 3, 1).expand(256, 3, 8)
    ec = torch.tensor([0, 1, 1], dtype=torch.uint8).reshape(1, 3, 1).expand(256, 3, 16)
    scale = every_byte().reshape(256, 1).expand(256, 3)
    values = fmt._decode_rows(codes, {"scale": scale, "eb": eb, "ec": ec}, 3 * UNIT)
    return kernels.output_bits(values.reshape(256, 3, 4, 16)[:, :, 0].reshape(-1), dtype)


# ---- the numba kernel (kernels.hif4_qdq) runs the same steps fused per unit ----------------------------------
# r = bf16(1/s) depends only on s's mantissa m: bf16(1/(1 + m/4)) · 2^-e (exact scaling by 2^-e).
_RECIPROCALS = (1.0 / (1.0 + torch.arange(4) / 4)).to(torch.bfloat16).float().numpy()


register(HiF4Format(
    name="hif4",
    description="HiFloat4: 64-value units, E6M2 scale + 1-bit Eb/Ec sub-block exponents, S1P2 elements",
    bits_per_value=4.5,
    block_size=UNIT,
    element="S1P2 (c/4, c=0..7)",
    scale="E6M2 + 8x Eb + 16x Ec",
    max_value=7 * SCALE_MAX,
))
