"""MX block formats (OCP Microscaling v1.0): MXFP4 (spec and challenge-simulator ties), MXFP8 E4M3/E5M2.

docs/formats.md § Baselines: 32 consecutive values along K share one E8M0 scale
``X = 2^(floor(log2 amax) - emax_elem)`` (emax_elem = 2 for E2M1, 8 for E4M3, 15 for E5M2); each element
is ``V / X`` rounded to the element grid and saturated to its largest magnitude. The shared exponent
is clamped to [-127, 127], so an all-zero block gets exponent -127 (E8M0 code 0). A block holding an
Inf or NaN gets the E8M0 NaN code 0xFF (its element codes are 0) and decodes to NaN throughout.
``mxfp4`` rounds ties to even (the spec), ``mxfp4_sim`` rounds them away from zero (the ICME challenge
simulator) with `minifloat.round_half`, i.e. ``floor(v + 0.5)`` in fp32; that is exact RHA for bf16 and
fp16 inputs, while an fp32 ``V / X`` one ulp below 0.25 also rounds up to 0.5. Dividing by the
power of two X rounds only where the quotient is an fp32 subnormal, far from any grid tie, so the
element rounding is the only one that decides a result.

Packing (flat uint8, rows one after another, each row's blocks in order, the tail block zero-padded):
per 32-value block, the element bytes then the E8M0 scale byte. MXFP4 elements go two per byte, low
nibble = even element, nibble = bit 3 sign + 3-bit E2M1 magnitude code (2 exponent bits, 1 mantissa
bit): 16 + 1 = 17 bytes per block. MXFP8 elements are their OCP FP8 bytes: 32 + 1 = 33 bytes per block.

The torch ops here are the reference and serve every device; on the CPU, `quantize_dequantize` and `decode`
run fused numba kernels (`kernels.mx_qdq`, `kernels.decode_blocks`) that tests hold equal to them bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .base import ColumnQuantizer, Format, pad_rows, use_cpu_kernels
from .elements import E2M1, E4M3, E5M2, ElementGrid
from .kernels import decode_blocks, every_byte, kernel_array
from .minifloat import Ties, floor_log2
from .packing import pack_blocks, pack_elements, unpack_blocks, unpack_elements
from .registry import register

BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 0xFF


def e8m0_value(code: Tensor) -> Tensor:
    """fp32 value 2^(code - 127) of E8M0 codes: code 0 is the fp32 subnormal 2^-127, 0xFF is NaN."""
    c = code.to(torch.int32)
    bits = torch.where(c == 0, 1 << 22, c << 23)
    return torch.where(c == E8M0_NAN, 0x7FC00000, bits).view(torch.float32)


@dataclass(frozen=True)
class MXFormat(Format):
    """An MX format: `grid` elements, rounded with `ties`, under one E8M0 scale per 32 values."""

    grid: ElementGrid = E2M1
    ties: Ties = "even"

    @property
    def element_bytes(self) -> int:
        return BLOCK * self.grid.bits // 8

    def _encode_rows(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        n = rows.shape[0]
        blocks = pad_rows(rows.float(), BLOCK).reshape(n, -1, BLOCK)
        finite = torch.isfinite(blocks).all(dim=-1)
        blocks = torch.where(finite.unsqueeze(-1), blocks, 0.0)
        biased = self.block_exponent(blocks.abs().amax(dim=-1))
        codes = self.grid.quantize(blocks / e8m0_value(biased).unsqueeze(-1), self.ties)
        scale = torch.where(finite, biased, E8M0_NAN).to(torch.uint8)
        return codes.reshape(n, -1), {"scale": scale}

    def block_exponent(self, amax: Tensor) -> Tensor:
        """The biased E8M0 exponent (int32) of blocks with finite maxima ``amax``: floor(log2 amax) - emax, clamped."""
        return (floor_log2(amax) - self.grid.emax).clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS

    def _decode_rows(self, codes: Tensor, meta: dict[str, Tensor], k: int) -> Tensor:
        n = codes.shape[0]
        elements = self.grid.value(codes).reshape(n, -1, BLOCK)
        return (elements * e8m0_value(meta["scale"]).unsqueeze(-1)).reshape(n, -1)[:, :k]

    def _decode_rows_as(self, codes: Tensor, meta: dict[str, Tensor], k: int, dtype: torch.dtype) -> Tensor:
        if not use_cpu_kernels(codes):
            return super()._decode_rows_as(codes, meta, k, dtype)
        scale = e8m0_value(every_byte())[meta["scale"].long()]
        return decode_blocks(codes, self.grid.value(every_byte()), scale, BLOCK, k, dtype)

    def _decode_packed_rows(self, data: Tensor, n_rows: int, k: int, dtype: torch.dtype) -> Tensor:
        out = torch.empty(n_rows, k, dtype=dtype)
        kernels.block_table_decode(data.numpy().reshape(n_rows, -1), BLOCK, self.grid.bits == 4,
                                   _packed_table(self, dtype), kernels.bits_array(out))
        return out

    def _pack_rows(self, codes: Tensor, meta: dict[str, Tensor]) -> Tensor:
        elements = pack_elements(codes, self.grid.bits).reshape(codes.shape[0], -1, self.element_bytes)
        return pack_blocks(elements, meta["scale"].unsqueeze(-1))

    def _unpack_rows(self, data: Tensor, n_rows: int, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        n_blocks = self.padded(k) // BLOCK
        elements, scale = unpack_blocks(data, n_rows, n_blocks, self.element_bytes, 1)
        codes = unpack_elements(elements, self.grid.bits).reshape(n_rows, -1)
        return codes, {"scale": scale.reshape(n_rows, n_blocks)}

    def packed_nbytes(self, n_rows: int, k: int) -> int:
        return n_rows * (self.padded(k) // BLOCK) * (self.element_bytes + 1)

    def column_quantizer(self, weight: Tensor) -> MXColumns:
        return MXColumns(self, weight)

    def _qdq_rows(self, rows: Tensor) -> Tensor:
        if not use_cpu_kernels(rows):
            return super()._qdq_rows(rows)
        out = torch.empty_like(rows)
        kernels.mx_qdq(kernel_array(rows), kernel_array(out), BLOCK, self.grid.kernel_grid, self.grid.emax,
                       self.ties == "away")
        return out


@functools.cache
def _packed_table(fmt: MXFormat, dtype: torch.dtype) -> np.ndarray:
    """Output bits of every (E8M0 byte, element code) for `kernels.block_table_decode`, by the torch decode: row r
    holds blocks with scale byte r and the codes 0..2^bits - 1."""
    n_codes = 1 << fmt.grid.bits
    blocks = n_codes // BLOCK if n_codes > BLOCK else 1
    codes = torch.arange(n_codes, dtype=torch.uint8).repeat(256, blocks * BLOCK // n_codes)
    scale = every_byte().reshape(256, 1).expand(256, blocks)
    values = fmt._decode_rows(codes, {"scale": scale}, blocks * BLOCK)[:, :n_codes]
    return kernels.output_bits(values, dtype)


class MXColumns(ColumnQuantizer):
    """GPTQ's MX quantizer: `enter` fixes a block's E8M0 scale X, `round` rounds a column's ``V / X``."""

    def __init__(self, fmt: MXFormat, weight: Tensor) -> None:
        super().__init__(fmt, weight)
        self.grid, self.ties = fmt.grid, fmt.ties
        self.meta = {"scale": torch.zeros(self.rows, self.n_blocks, dtype=torch.uint8, device=self.device)}
        self._x = torch.zeros(self.rows, self.n_blocks, dtype=torch.float32, device=self.device)  # X as fp32

    def _enter(self, block: int, values: Tensor) -> None:
        biased = self.fmt.block_exponent(values.abs().amax(dim=-1))
        self.meta["scale"][:, block] = biased.to(torch.uint8)
        self._x[:, block] = e8m0_value(biased)

    def _round(self, column: int, values: Tensor) -> Tensor:
        x = self._x[:, column // BLOCK]
        codes = self.grid.quantize(values / x, self.ties)
        self.codes[:, column] = codes
        return self.grid.value(codes) * x


def _mx(name: str, grid: ElementGrid, ties: Ties, description: str) -> MXFormat:
    return MXFormat(
        name=name,
        description=description,
        bits_per_value=grid.bits + 8 / BLOCK,
        block_size=BLOCK,
        element=grid.name,
        scale="E8M0",
        max_value=grid.max_value * 2.0**E8M0_BIAS,
        grid=grid,
        ties=ties,
    )


MXFP4 = register(_mx("mxfp4", E2M1, "even", "OCP MXFP4: 32 E2M1 values share an E8M0 scale, ties to even"))
MXFP4_SIM = register(
    _mx("mxfp4_sim", E2M1, "away", "MXFP4 as the ICME challenge simulator rounds it: ties away from zero")
)
MXFP8 = register(_mx("mxfp8", E4M3, "even", "OCP MXFP8 (E4M3): 32 E4M3 values share an E8M0 scale"))
MXFP8_E5M2 = register(_mx("mxfp8_e5m2", E5M2, "even", "OCP MXFP8 (E5M2): 32 E5M2 values share an E8M0 scale"))
