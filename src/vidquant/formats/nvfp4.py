"""NVFP4: 16 E2M1 values share a UE4M3 block scale, under one FP32 scale per tensor.

docs/formats.md § Baselines, in fp32 and in this operation order:
``g = amax_tensor / (6 * 448)`` over the whole tensor being encoded (all rows),
``b = E4M3_RNE(amax_block / 6 / g)`` saturating at 448, ``q = RNE_E2M1(x / (b * g))`` clamped to +-6,
and decoding gives ``q * (b * g)``. A block whose ``b`` rounds to 0 gets codes +-0 and decodes to
zeros; nothing is ever divided by zero. When ``g`` is 0 (an all-zero tensor, or one so small that
``amax / 2688`` underflows) ``g = 1.0`` is stored instead; every block scale then rounds to 0 and the
tensor decodes to zeros. ``nvfp4_sim`` is the ICME challenge simulator's variant with no per-tensor
scale (``g = 1``). Inf/NaN input raises ValueError. GPTQ's column quantizer (`NVFP4Columns`) fixes ``g``
once from the whole weight it is built with and the block scales from the columns it is given.

Packing (flat uint8, rows one after another, each row's blocks in order, the tail block zero-padded):
per 16-value block, 8 element bytes (two per byte, low nibble = even element, nibble = bit 3 sign +
3-bit E2M1 magnitude code) then the UE4M3 scale byte: 9 bytes per block. ``nvfp4`` appends the 4-byte
fp32 tensor scale (little-endian) at the very end. ``meta["tensor_scale"]`` repeats it on every row.

The torch ops here are the reference and serve every device; on the CPU, `quantize_dequantize` and `decode`
run fused numba kernels (`kernels.nvfp4_qdq`, `kernels.decode_blocks`) that tests hold equal to them bit for
bit (on Inf/NaN input the kernel hands over to the torch path, which raises).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .base import ColumnQuantizer, Format, check_finite_scale, pad_rows, use_cpu_kernels
from .elements import E2M1, E4M3, div_scalar
from .kernels import decode_blocks, every_byte, kernel_array
from .packing import bytes_float, float_bytes, pack_blocks, pack_elements, unpack_blocks, unpack_elements
from .registry import register

BLOCK = 16
ELEMENT_BYTES = BLOCK // 2
TENSOR_SCALE_BYTES = 4


@dataclass(frozen=True)
class NVFP4Format(Format):
    """NVFP4 with (``tensor_scale=True``) or without (the simulator's variant) the FP32 tensor scale."""

    tensor_scale: bool = True

    def _encode_rows(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        n = rows.shape[0]
        blocks = pad_rows(rows.float(), BLOCK).reshape(n, -1, BLOCK)
        amax = blocks.abs().amax(dim=-1)
        check_finite_scale(amax, self.name)
        g = self._global_scale(amax)
        b = block_scale(amax, g)
        meta = {"scale": E4M3.code(b).to(torch.uint8)}
        if self.tensor_scale:
            meta["tensor_scale"] = g.reshape(1, 1).repeat(n, 1)
        return element_codes(blocks, (b * g).unsqueeze(-1)).reshape(n, -1), meta

    def _global_scale(self, amax: Tensor) -> Tensor:
        """The fp32 tensor scale ``g`` (a 0-d tensor); 1.0 without a tensor scale or when it would be 0."""
        if not self.tensor_scale:
            return torch.ones((), dtype=torch.float32, device=amax.device)
        g = div_scalar(amax.amax(), 6.0 * 448.0)
        return torch.where(g > 0, g, 1.0)

    def column_quantizer(self, weight: Tensor) -> NVFP4Columns:
        return NVFP4Columns(self, weight)

    def _decode_rows(self, codes: Tensor, meta: dict[str, Tensor], k: int) -> Tensor:
        n = codes.shape[0]
        s = E4M3.value(meta["scale"])
        if self.tensor_scale:
            s = s * meta["tensor_scale"]
        elements = E2M1.value(codes).reshape(n, -1, BLOCK)
        return (elements * s.unsqueeze(-1)).reshape(n, -1)[:, :k]

    def _decode_rows_as(self, codes: Tensor, meta: dict[str, Tensor], k: int, dtype: torch.dtype) -> Tensor:
        if not use_cpu_kernels(codes):
            return super()._decode_rows_as(codes, meta, k, dtype)
        s = E4M3.value(every_byte())[meta["scale"].long()]
        if self.tensor_scale:
            s = s * meta["tensor_scale"]
        return decode_blocks(codes, E2M1.value(every_byte()), s, BLOCK, k, dtype)

    def _decode_packed_rows(self, data: Tensor, n_rows: int, k: int, dtype: torch.dtype) -> Tensor:
        g = b""
        if self.tensor_scale:
            data, g = data[:-TENSOR_SCALE_BYTES], bytes(data[-TENSOR_SCALE_BYTES:].tolist())
        out = torch.empty(n_rows, k, dtype=dtype)
        kernels.block_table_decode(data.numpy().reshape(n_rows, -1), BLOCK, True, _packed_table(self, dtype, g),
                                   kernels.bits_array(out))
        return out

    def _pack_rows(self, codes: Tensor, meta: dict[str, Tensor]) -> Tensor:
        elements = pack_elements(codes, 4).reshape(codes.shape[0], -1, ELEMENT_BYTES)
        data = pack_blocks(elements, meta["scale"].unsqueeze(-1))
        if not self.tensor_scale:
            return data
        g = meta["tensor_scale"].reshape(-1)
        if not bool((g == g[:1]).all()):
            raise ValueError(f"{self.name}: rows of one encoding must share one tensor scale")
        return torch.cat([data, float_bytes(g[:1]).reshape(-1)])

    def _unpack_rows(self, data: Tensor, n_rows: int, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        n_blocks = self.padded(k) // BLOCK
        if self.tensor_scale:
            data, g = data[:-TENSOR_SCALE_BYTES], data[-TENSOR_SCALE_BYTES:]
        elements, scale = unpack_blocks(data, n_rows, n_blocks, ELEMENT_BYTES, 1)
        meta = {"scale": scale.reshape(n_rows, n_blocks)}
        if self.tensor_scale:
            meta["tensor_scale"] = bytes_float(g, torch.float32).reshape(1, 1).repeat(n_rows, 1)
        return unpack_elements(elements, 4).reshape(n_rows, -1), meta

    def packed_nbytes(self, n_rows: int, k: int) -> int:
        blocks = n_rows * (self.padded(k) // BLOCK) * (ELEMENT_BYTES + 1)
        return blocks + (TENSOR_SCALE_BYTES if self.tensor_scale else 0)

    def _qdq_rows(self, rows: Tensor) -> Tensor:
        if use_cpu_kernels(rows):
            out = torch.empty_like(rows)
            if kernels.nvfp4_qdq(kernel_array(rows), kernel_array(out), BLOCK, self.tensor_scale, E2M1.kernel_grid,
                                 E4M3.kernel_grid):
                return out
        return super()._qdq_rows(rows)  # also where the kernel met Inf/NaN: the torch path raises the error


@functools.lru_cache(maxsize=256)
def _packed_table(fmt: NVFP4Format, dtype: torch.dtype, tensor_scale: bytes) -> np.ndarray:
    """Output bits of every (UE4M3 byte, E2M1 nibble) under the tensor scale whose 4 bytes are given (none for
    ``nvfp4_sim``), for `kernels.block_table_decode`, by the torch decode: row r is a block with scale byte r."""
    meta = {"scale": every_byte().reshape(256, 1)}
    if fmt.tensor_scale:
        g = bytes_float(torch.tensor(list(tensor_scale), dtype=torch.uint8), torch.float32)
        meta["tensor_scale"] = g.reshape(1, 1).repeat(256, 1)
    values = fmt._decode_rows(torch.arange(16, dtype=torch.uint8).repeat(256, 1), meta, BLOCK)
    return kernels.output_bits(values, dtype)


def block_scale(amax: Tensor, g: Tensor) -> Tensor:
    """The UE4M3 block scale ``b = E4M3_RNE(amax_block / 6 / g)`` (fp32, saturating at 448)."""
    return E4M3.round(div_scalar(amax, 6.0) / g)


def element_codes(values: Tensor, s: Tensor) -> Tensor:
    """E2M1 codes (uint8) of ``values / s`` for the scales ``s = b * g`` (broadcast); a zero scale gives +-0 codes."""
    nonzero = s > 0
    return E2M1.quantize(torch.where(nonzero, values / torch.where(nonzero, s, 1.0), values * 0.0))


class NVFP4Columns(ColumnQuantizer):
    """GPTQ's NVFP4 quantizer: ``g`` from the amax of the weight it is built with; block scales from `enter`."""

    def __init__(self, fmt: NVFP4Format, weight: Tensor) -> None:
        super().__init__(fmt, weight)
        self.g = fmt._global_scale(weight.abs().amax().float())
        self.meta = {"scale": torch.zeros(self.rows, self.n_blocks, dtype=torch.uint8, device=self.device)}
        if fmt.tensor_scale:
            self.meta["tensor_scale"] = self.g.reshape(1, 1).repeat(self.rows, 1)
        self._s = torch.zeros(self.rows, self.n_blocks, dtype=torch.float32, device=self.device)  # b * g

    def _enter(self, block: int, values: Tensor) -> None:
        b = block_scale(values.abs().amax(dim=-1), self.g)
        self.meta["scale"][:, block] = E4M3.code(b).to(torch.uint8)
        self._s[:, block] = b * self.g

    def _round(self, column: int, values: Tensor) -> Tensor:
        s = self._s[:, column // BLOCK]
        codes = element_codes(values, s)
        self.codes[:, column] = codes
        return E2M1.value(codes) * s  # decode's E4M3.value(scale) * g is b * g exactly


NVFP4 = register(
    NVFP4Format(
        name="nvfp4",
        description="NVIDIA NVFP4: 16 E2M1 values share a UE4M3 scale, plus one FP32 scale per tensor",
        bits_per_value=4.5,
        block_size=BLOCK,
        element="E2M1",
        scale="UE4M3 + FP32 per tensor",
        max_value=float(torch.finfo(torch.float32).max),
    )
)
NVFP4_SIM = register(
    NVFP4Format(
        name="nvfp4_sim",
        description="NVFP4 as the ICME challenge simulator runs it: UE4M3 block scales, no tensor scale",
        bits_per_value=4.5,
        block_size=BLOCK,
        element="E2M1",
        scale="UE4M3",
        max_value=E2M1.max_value * E4M3.max_value,
        tensor_scale=False,
    )
)
