"""HiFloat4 (HiF4): 64-value units, an E6M2 scale and 1-bit sub-block exponents (docs/formats.md).

One unit = 64 values along K: an E6M2 scale ``s``, 8 one-bit ``Eb`` (per 8 values), 16 one-bit
``Ec`` (per 4 values) and 64 sign + 3-bit magnitude codes ``c``; value = ±(c/4)·2^(Eb+Ec)·s.
The conversion is the challenge simulator's "v14" algorithm, steps 1-8 of formats.md.

Two implementations of the one algorithm, which the tests hold equal bit for bit:
- torch ops (`unit_metadata`, `round_elements`, `element_values`): any device; encode, decode,
  and the GPTQ quantizer reuse them;
- a numba kernel (`_qdq_kernel`): quantize_dequantize on the CPU in one pass over memory.

Packing (the hardware order, fixed by formats.md): per unit 32 element bytes (low nibble = even
element; nibble = bit3 sign, bits2:0 code) then 4 metadata bytes ``[Ea, Eb, Ec_lo, Ec_hi]`` with the
Eb/Ec bits LSB first: 36 bytes per 64 values, 4.5 bits per value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import prange
from numba.core import types
from numba.extending import overload
from torch import Tensor

from .base import ColumnQuantizer, Format, pad_rows, use_cpu_kernels
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
        rows = rows.detach()
        if rows.dtype == torch.bfloat16:
            src = rows.view(torch.int16).numpy().view(np.uint16)
            out = np.empty_like(src)
            _qdq_kernel(src, out, _RECIPROCALS)
            return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
        x32 = rows.float()
        out32 = torch.empty_like(x32)
        _qdq_kernel(x32.numpy(), out32.numpy(), _RECIPROCALS)
        return out32.to(rows.dtype)


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


# ---- numba kernel: the same steps, fused per unit ---------------------------------------------------
# r = bf16(1/s) depends only on s's mantissa m: bf16(1/(1 + m/4)) · 2^-e (exact scaling by 2^-e).
_RECIPROCALS = (1.0 / (1.0 + torch.arange(4) / 4)).to(torch.bfloat16).float().numpy()
_CHUNK = 64  # units per parallel task (amortizes the scratch buffers)


def _load(arr, i):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


def _store(arr, i, v):  # pragma: no cover
    raise NotImplementedError


@overload(_load)
def _load_impl(arr, i):
    if arr.dtype == types.uint16:  # bf16 bits
        return lambda arr, i: np.uint32(np.uint32(arr[i]) << 16).view(np.float32)
    return lambda arr, i: arr[i]


@overload(_store)
def _store_impl(arr, i, v):
    if arr.dtype == types.uint16:  # every HiF4 value is exact in bf16: keep the top half
        def store_bits(arr, i, v):
            arr[i] = np.uint16(np.float32(v).view(np.uint32) >> np.uint32(16))

        return store_bits

    def store(arr, i, v):
        arr[i] = v

    return store


@numba.njit(inline="always")
def _pow2f(e):
    return np.uint32((e + 127) << 23).view(np.float32)


@numba.njit(inline="always")
def _bf16_rne(v):
    """Round a positive finite fp32 to bf16 (round to nearest, ties to even)."""
    bits = np.float32(v).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.uint32(bits).view(np.float32)


@numba.njit(parallel=True, cache=True)
def _qdq_kernel(src, dst, reciprocals):
    """quantize_dequantize of rows ``src`` (R, K) into ``dst``: steps 1-8 per unit, fused."""
    n_rows, k = src.shape
    units = (k + UNIT - 1) // UNIT
    total = n_rows * units
    f0, half, four, two = np.float32(0), np.float32(0.5), np.float32(4), np.float32(2)
    for chunk in prange((total + _CHUNK - 1) // _CHUNK):
        m4 = np.empty(16, np.float32)
        g = np.empty(16, np.float32)  # per 4-element sub-block: 2^-(Eb+Ec) · r (step 7)
        h = np.empty(16, np.float32)  # per 4-element sub-block: 2^(Eb+Ec) · s / 4 (step 8)
        for job in range(chunk * _CHUNK, min(total, (chunk + 1) * _CHUNK)):
            row, start = job // units, (job % units) * UNIT
            n = min(UNIT, k - start)
            x, y = src[row, start:start + n], dst[row, start:start + n]
            has_nan = False
            for j in range(16):  # step 1
                m = f0
                for i in range(4 * j, min(4 * j + 4, n)):
                    a = abs(_load(x, i))
                    has_nan |= a != a
                    if a > m:
                        m = a
                m4[j] = m
            if has_nan:
                for i in range(n):
                    _store(y, i, np.float32(np.nan))
                continue
            m64 = f0
            for j in range(16):
                m64 = max(m64, m4[j])
            sf = _bf16_rne(min(max(np.float32(m64 * np.float32(INV7)), np.float32(SCALE_MIN)),
                               np.float32(SCALE_MAX)))  # step 2
            e = np.int32((np.float32(sf).view(np.uint32) >> np.uint32(23)) & np.uint32(0xFF)) - 127
            q = np.int32(np.rint(sf * _pow2f(2 - e)))  # step 3: 4..8
            if q == 8:
                q, e = 4, e + 1
            r = np.float32(reciprocals[q - 4]) * _pow2f(-e)  # step 4
            for b in range(8):  # steps 5-6
                eb = 1 if max(m4[2 * b], m4[2 * b + 1]) * r >= four else 0
                for j in (2 * b, 2 * b + 1):
                    v = m4[j] * r
                    if eb:
                        v = v * half
                    p = eb + (1 if v >= two else 0)
                    g[j] = _pow2f(-p) * r
                    h[j] = np.float32(q) * _pow2f(e - 4 + p)
            for i in range(n):  # steps 7-8
                xv = _load(x, i)
                c = np.int32(min(four * (abs(xv) * g[i >> 2]) + half, np.float32(7.5)))
                _store(y, i, np.float32(np.copysign(np.float32(c) * h[i >> 2], xv)))


register(HiF4Format(
    name="hif4",
    description="HiFloat4: 64-value units, E6M2 scale + 1-bit Eb/Ec sub-block exponents, S1P2 elements",
    bits_per_value=4.5,
    block_size=UNIT,
    element="S1P2 (c/4, c=0..7)",
    scale="E6M2 + 8x Eb + 16x Ec",
    max_value=7 * SCALE_MAX,
))
