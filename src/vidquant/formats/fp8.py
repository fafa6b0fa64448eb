"""FP8 (OCP OFP8 E4M3 / E5M2) elements under one FP32 scale per row, or per tensor.

docs/formats.md § Baselines: the elements are OCP FP8, rounded to nearest even and saturated (448 for
E4M3, 57344 for E5M2). A row is one output channel of a weight ``W[N, K]`` quantized along K (dim=-1),
or one token of an activation; its scale is ``amax_row / max_elem`` in fp32 and decoding gives
``code_value * scale``. A row whose scale is 0 (all zeros, or an amax so small that the division
underflows) gets scale 1.0, which leaves its values to round to +-0. Inf/NaN input raises ValueError.

Packing (flat uint8, rows one after another): the row's K element bytes (the standard OCP FP8 bytes,
bit 7 = sign), then its fp32 scale as 4 little-endian bytes.

``fp8_e4m3_tensor`` is the per-tensor variant that NVIDIA ModelOpt, TensorRT and torchao's
``Float8DynamicActivationFloat8Weight(granularity=PerTensor())`` use by default: one scale
``amax_tensor / 448`` for the whole tensor encoded (every row of a weight; every token of an activation
call: a dynamic per-tensor scale, where ModelOpt's static one is fixed from calibration), so one outlier
token coarsens every other token. Packed as the rows' element bytes, then the one fp32 scale at the very
end; ``meta["scale"]`` repeats it on every row, so decoding is the per-row path's.

The torch ops here are the reference and serve every device; on the CPU, `quantize_dequantize` and `decode`
run fused numba kernels (`kernels.fp8_qdq`, `kernels.decode_blocks`) that tests hold equal to them bit for
bit (on Inf/NaN input the kernel hands over to the torch path, which raises).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import kernels
from .base import Format, check_finite_scale, use_cpu_kernels
from .elements import E4M3, E5M2, ElementGrid, div_scalar
from .kernels import decode_blocks, every_byte, kernel_array
from .packing import bytes_float, float_bytes, pack_blocks, unpack_blocks
from .registry import register

SCALE_BYTES = 4


@dataclass(frozen=True)
class FP8Format(Format):
    """OCP FP8 `grid` elements with a per-row fp32 scale."""

    grid: ElementGrid = E4M3
    per_tensor: bool = False  # one scale for all rows (stored once, after the elements)

    def _encode_rows(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        v = rows.float()
        amax = v.abs().amax(dim=-1, keepdim=True)
        check_finite_scale(amax, self.name)
        if self.per_tensor:
            amax = amax.amax().expand_as(amax)
        scale = div_scalar(amax, self.grid.max_value)
        scale = torch.where(scale > 0, scale, 1.0)
        return self.grid.quantize(v / scale), {"scale": scale}

    def _decode_rows(self, codes: Tensor, meta: dict[str, Tensor], k: int) -> Tensor:
        return self.grid.value(codes) * meta["scale"]

    def _decode_rows_as(self, codes: Tensor, meta: dict[str, Tensor], k: int, dtype: torch.dtype) -> Tensor:
        if not use_cpu_kernels(codes):
            return super()._decode_rows_as(codes, meta, k, dtype)
        return decode_blocks(codes, self.grid.value(every_byte()), meta["scale"], k, k, dtype)

    def _decode_packed_rows(self, data: Tensor, n_rows: int, k: int, dtype: torch.dtype) -> Tensor | None:
        if self.per_tensor:  # the one scale spread over the rows, then the block decode (scale bytes are not per row)
            codes, meta = self._unpack_rows(data, n_rows, k)
            out = decode_blocks(codes, self.grid.value(every_byte()), meta["scale"], k, k, dtype)
            return None if bool(out.isnan().any()) else out  # NaN bits are the torch path's to write, as below
        out = torch.empty(n_rows, k, dtype=dtype)
        if kernels.scaled_decode(data.numpy().reshape(n_rows, -1), k, False, SCALE_BYTES,
                                 self.grid.value(every_byte()).numpy(), kernel_array(out)):
            return out
        return None  # a NaN product (a corrupt weight): the torch decode writes its bits

    def _pack_rows(self, codes: Tensor, meta: dict[str, Tensor]) -> Tensor:
        if not self.per_tensor:
            return pack_blocks(codes.unsqueeze(1), float_bytes(meta["scale"]))
        scale = meta["scale"].reshape(-1)
        if not bool((scale == scale[:1]).all()):
            raise ValueError(f"{self.name}: rows of one encoding must share one tensor scale")
        return torch.cat([codes.reshape(-1), float_bytes(scale[:1]).reshape(-1)])

    def _unpack_rows(self, data: Tensor, n_rows: int, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        if self.per_tensor:
            scale = bytes_float(data[-SCALE_BYTES:], torch.float32).reshape(1, 1).repeat(n_rows, 1)
            return data[:-SCALE_BYTES].reshape(n_rows, k), {"scale": scale}
        codes, scale = unpack_blocks(data, n_rows, 1, k, SCALE_BYTES)
        return codes.reshape(n_rows, k), {"scale": bytes_float(scale, torch.float32).reshape(n_rows, 1)}

    def packed_nbytes(self, n_rows: int, k: int) -> int:
        return n_rows * k + SCALE_BYTES if self.per_tensor else n_rows * (k + SCALE_BYTES)

    def _qdq_rows(self, rows: Tensor) -> Tensor:
        if use_cpu_kernels(rows) and not self.per_tensor:  # the kernel scales per row
            out = torch.empty_like(rows)
            if kernels.fp8_qdq(kernel_array(rows), kernel_array(out), self.grid.kernel_grid):
                return out
        return super()._qdq_rows(rows)  # also where the kernel met Inf/NaN: the torch path raises the error


def _fp8(name: str, grid: ElementGrid, per_tensor: bool = False) -> FP8Format:
    where = "per tensor (per activation call)" if per_tensor else "per channel (per token for activations)"
    return FP8Format(
        name=name,
        description=f"OCP FP8 {grid.name} with one FP32 scale {where}",
        bits_per_value=8.0,
        block_size=None,
        element=grid.name,
        scale="FP32 per tensor" if per_tensor else "FP32 per channel",
        max_value=float(torch.finfo(torch.float32).max),
        grid=grid,
        per_tensor=per_tensor,
    )


FP8_E4M3 = register(_fp8("fp8_e4m3", E4M3))
FP8_E5M2 = register(_fp8("fp8_e5m2", E5M2))
FP8_E4M3_TENSOR = register(_fp8("fp8_e4m3_tensor", E4M3, per_tensor=True))
