"""HiFloat8 (HiF8): elementwise 8-bit tapered-precision floats, no scale (docs/formats.md, HiFloat8).

Two paths that agree bit for bit:

- torch ops (any device): the Conversion steps 1-4 of formats.md in fp32, then codes from the rounded
  values and a table lookup to decode;
- on CPU, `quantize_dequantize` runs a numba kernel that looks every 16-bit input pattern up in a
  65536-entry table built from the torch path. fp32 inputs are reduced to a bf16 index by truncation
  with a sticky bit. That is exact: the rounding (ties away from zero on the magnitude) only asks whether
  a magnitude is >= each midpoint / threshold (2^-23, 40960), and these have at most 5 significant bits,
  so they are bf16 values and truncating the magnitude to bf16 keeps every such comparison. The sticky
  bit keeps NaNs whose payload sits in the low 16 bits NaN (plain truncation would make them Inf).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .base import Format, use_cpu_kernels
from .minifloat import floor_log2, pow2
from .registry import register

MAX_FINITE = 32768.0  # 0x6E
INF_THRESHOLD = 40960.0  # 1.25 * 2^15, the midpoint between 0x6E and the Inf slot (step 2)
ZERO_THRESHOLD = 2.0**-23  # half of the smallest value 2^-22 (step 1)
NAN_CODE = 0x80
INF_CODE = 0x6F
# |x| where HiF8 keeps its full 3 mantissa bits (|E| <= 3); 2 bits up to 2^8, 1 up to 2^15, powers of two below 2^-15
FULL_PRECISION_BAND = (2.0**-3, 2.0**4)

# The bit layout after the sign bit, row by row: dot prefix, exponent field width D (None: denormal),
# mantissa width.
_LAYOUT = (("11", 4, 1), ("10", 3, 2), ("01", 2, 3), ("001", 1, 3), ("0001", 0, 3), ("0000", None, 3))


def _code_value(code: int) -> float:
    """Value of one code, read off the formats.md bit layout (sign | dot | exponent | mantissa)."""
    if code == NAN_CODE:
        return math.nan
    sign = -1.0 if code & 0x80 else 1.0
    if code & 0x7F == INF_CODE:
        return sign * math.inf
    bits = format(code & 0x7F, "07b")
    dot, d, mw = next(row for row in _LAYOUT if bits.startswith(row[0]))
    rest = bits[len(dot):]
    mant = int(rest[len(rest) - mw:], 2)
    if d is None:  # denormal: 2^(M-23), M = 0 is the zero
        return sign * 2.0 ** (mant - 23) if mant else 0.0
    exp = 0
    if d > 0:  # exponent sign bit, then |E| - 2^(D-1) with the leading 1 implicit
        magnitude = (1 << (d - 1)) + int(rest[1:d] or "0", 2)
        exp = -magnitude if rest[0] == "1" else magnitude
    return sign * 2.0**exp * (1 + mant / (1 << mw))


@functools.cache
def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Decode table (256 fp32) plus the positive codes 0x00..0x7F sorted by value, on ``device``."""
    table = torch.tensor([_code_value(c) for c in range(256)], dtype=torch.float32)
    values, codes = torch.sort(table[:128])  # 0, 2^-22 ... 32768, +Inf: all distinct
    return table.to(device), values.to(device), codes.to(device)


def _quantize(x: Tensor, saturate: bool) -> Tensor:
    """Signed HiF8 values of ``x`` as fp32 (Conversion steps 1-4); every NaN becomes the table's NaN."""
    x = x.to(torch.float32)
    a = x.abs()
    # Step 3. Clamping first keeps zeros/subnormals (step 1 zeroes them) off floor_log2's slow branch;
    # E = -23 is treated as -22, and E > 15 only occurs where step 2 overrides the result.
    e = floor_log2(a.clamp(min=ZERO_THRESHOLD)).clamp(-22, 15)
    ae = e.abs()
    mw = (ae <= 3).to(torch.int32) + (ae <= 7).to(torch.int32) + (ae <= 15).to(torch.int32)
    q = torch.floor(a * pow2(mw - e) + 0.5) * pow2(e - mw)
    q = torch.where(a >= INF_THRESHOLD, MAX_FINITE if saturate else math.inf, q)  # step 2, Inf input
    q = torch.where(a < ZERO_THRESHOLD, 0.0, q)  # step 1
    q = torch.where((x < 0) & (q > 0), -q, q)  # no -0
    return torch.where(torch.isnan(x), math.nan, q)  # step 4


def _codes(v: Tensor) -> Tensor:
    """uint8 codes of HiF8 values ``v`` (output of `_quantize`): exact look-up of |v| among the codes."""
    _, values, codes = _tables(v.device)
    nan = torch.isnan(v)
    mag = codes[torch.searchsorted(values, torch.where(nan, 0.0, v.abs()))]
    code = torch.where(v < 0, mag | 0x80, mag)
    return torch.where(nan, NAN_CODE, code).to(torch.uint8)


@functools.cache
def _luts(saturate: bool) -> dict[torch.dtype, np.ndarray]:
    """Output bits of the torch path for each of the 65536 bf16 / fp16 input patterns.

    The fp32 entry is indexed by a bf16 pattern and holds the high half of the fp32 output (the low half
    is 0: every HiF8 value and the fp32 NaN fit in bf16). It is taken from the fp32 torch path, not from
    the bf16 entry, because torch writes NaN as a different pattern when it converts fp32 to bf16.
    """
    patterns = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16))
    luts = {
        dtype: _quantize(patterns.view(dtype), saturate).to(dtype).view(torch.int16).numpy().view(np.uint16)
        for dtype in (torch.bfloat16, torch.float16)
    }
    wide = _quantize(patterns.view(torch.bfloat16), saturate).view(torch.int32).numpy().view(np.uint32)
    luts[torch.float32] = (wide >> 16).astype(np.uint16)
    return luts


@functools.cache
def _kernels() -> tuple[Callable[..., None], Callable[..., None]]:
    """The numba kernels, compiled on first use so that importing vidquant does not import numba."""
    import numba

    @numba.njit(parallel=True, cache=True)
    def lut16(src: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
        for i in numba.prange(src.size):
            out[i] = lut[src[i]]

    @numba.njit(parallel=True, cache=True)
    def lut32(src: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
        for i in numba.prange(src.size):
            b = src[i]
            idx = (b >> np.uint32(16)) | np.uint32((b & np.uint32(0xFFFF)) != 0)  # bf16 index, sticky
            out[i] = np.uint32(lut[idx]) << np.uint32(16)

    return lut16, lut32


def _as_bits(t: Tensor) -> np.ndarray:
    """Flat unsigned view of a contiguous CPU tensor's bits (no copy)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32).numpy().view(np.uint32).reshape(-1)
    return t.view(torch.int16).numpy().view(np.uint16).reshape(-1)


def _qdq_kernel(rows: Tensor, saturate: bool) -> Tensor:
    """Fast CPU `quantize_dequantize`: one table look-up per value."""
    lut16, lut32 = _kernels()
    luts = _luts(saturate)
    out = torch.empty_like(rows)
    kernel = lut32 if rows.dtype == torch.float32 else lut16
    kernel(_as_bits(rows), luts[rows.dtype], _as_bits(out))
    return out


@dataclass(frozen=True)
class HiF8Format(Format):
    """HiFloat8; ``saturate`` picks overflow to ±32768 (PTQ default) or to ±Inf (bit-exact interop)."""

    saturate: bool = True

    @property
    def decode_table(self) -> Tensor:
        """The 256 code values as fp32 (0x00 zero, 0x80 NaN, 0x6F/0xEF ±Inf)."""
        return _tables(torch.device("cpu"))[0].clone()

    def _encode_rows(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return _codes(_quantize(rows, self.saturate)), {}

    def _decode_rows(self, codes: Tensor, meta: dict[str, Tensor], k: int) -> Tensor:
        return _tables(codes.device)[0][codes.to(torch.int64)]

    def _decode_rows_as(self, codes: Tensor, meta: dict[str, Tensor], k: int, dtype: torch.dtype) -> Tensor:
        if not use_cpu_kernels(codes):
            return super()._decode_rows_as(codes, meta, k, dtype)
        if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != k:
            raise ValueError(f"{self.name}: codes must be uint8 (R, {k}), got {codes.dtype} {tuple(codes.shape)}")
        out = torch.empty(codes.shape[0], k, dtype=dtype)
        kernels.gather_decode(codes.contiguous().numpy(), _decoded_bits(self, dtype), kernels.bits_array(out))
        return out

    def _decode_packed_rows(self, data: Tensor, n_rows: int, k: int, dtype: torch.dtype) -> Tensor:
        return self._decode_rows_as(data.reshape(n_rows, k), {}, k, dtype)

    def _pack_rows(self, codes: Tensor, meta: dict[str, Tensor]) -> Tensor:
        return codes.contiguous()

    def _unpack_rows(self, data: Tensor, n_rows: int, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        return data.reshape(n_rows, k), {}

    def packed_nbytes(self, n_rows: int, k: int) -> int:
        return n_rows * k

    def _qdq_rows(self, rows: Tensor) -> Tensor:
        if use_cpu_kernels(rows):
            return _qdq_kernel(rows, self.saturate)
        return _quantize(rows, self.saturate).to(rows.dtype)


@functools.cache
def _decoded_bits(fmt: HiF8Format, dtype: torch.dtype) -> np.ndarray:
    """Output bits of each of the 256 codes as the torch decode writes them in ``dtype`` (`kernels.gather_decode`)."""
    codes = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    return kernels.output_bits(fmt._decode_rows(codes, {}, 256).reshape(-1), dtype)


def _hif8(name: str, saturate: bool, overflow: str) -> HiF8Format:
    return HiF8Format(
        name=name,
        description=f"HiFloat8 elementwise tapered float, no scale; overflow to {overflow}",
        bits_per_value=8,
        block_size=1,
        element="HiF8",
        scale="none",
        max_value=MAX_FINITE,
        saturate=saturate,
    )


HIF8 = register(_hif8("hif8", saturate=True, overflow="±32768"))
HIF8_INF = register(_hif8("hif8_inf", saturate=False, overflow="±Inf"))
