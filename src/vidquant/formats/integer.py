"""Symmetric integer grids (INT8 / INT4), per channel or per group of 64, for reference runs.

docs/formats.md § Baselines: ``scale = amax / qmax`` (qmax 127 or 7) in fp32 and
``q = RNE(x / scale)`` clamped to [-qmax, qmax]; decoding gives exactly ``q * scale``. Per-channel
scales (one per row: an output channel of ``W[N, K]`` along K, or a token) stay fp32. Group scales are
stored as fp16 and that rounded fp16 scale is the one quantization divides by, so decoding stays
exact. A scale of 0 (an all-zero group, or one whose scale underflows) is stored as 0 and its codes are
0. Inf/NaN input, or a group amax past the fp16 scale's range, raises ValueError.

Packing (flat uint8, rows one after another, each row's groups in order, the tail group zero-padded):
per group, the element bytes (INT8: one two's-complement byte each; INT4: a 4-bit two's-complement
nibble each, two per byte, low nibble = even element, an odd last one paired with 0), then the scale
(per channel: the row's K elements then 4 bytes of fp32; per 64: 64 or 32 element bytes then 2 bytes of
fp16; little-endian).

The torch ops here are the reference and serve every device; on the CPU, `quantize_dequantize` and `decode`
run fused numba kernels (`kernels.int_qdq`, `kernels.decode_blocks`) that tests hold equal to them bit for
bit (where the torch path raises, the kernel hands over to it).

``int4_g64_full`` is the INT4 grid of the GPTQ reference code and llm-compressor (``sym=True``): the full
two's-complement range -8..7 with ``scale = amax / 7.5`` (their ``2 amax / 15``), so a group's largest
negative value is hit exactly and its largest positive one clamps to 7. One more level than ``int4_g64``'s
+-7 for the same 4.25 bits (about 0.45 dB less error on Gaussian weights): the like-for-like baseline when
comparing with those tools. Codes, packing and decoding are ``int4_g64``'s (code 0b1000 is -8); its
quantize-dequantize runs `kernels.int_qdq` with ``full_range``, held equal to the torch ops bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import kernels
from .base import ColumnQuantizer, Format, check_finite_scale, pad_rows, use_cpu_kernels
from .elements import div_scalar
from .kernels import decode_blocks, every_byte, kernel_array
from .packing import bytes_float, float_bytes, pack_blocks, pack_elements, unpack_blocks, unpack_elements
from .registry import register

GROUP = 64


@dataclass(frozen=True)
class IntFormat(Format):
    """Symmetric ``bits``-bit integers; one fp32 scale per row (block_size None) or fp16 per group."""

    bits: int = 8
    full_range: bool = False  # codes -2^(b-1)..2^(b-1)-1 with scale amax / (qmax + 1/2) (the GPTQ reference's grid)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def qmin(self) -> int:
        """The most negative code value: -qmax (symmetric) or -(qmax + 1) (full range)."""
        return -self.qmax - 1 if self.full_range else -self.qmax

    @property
    def divisor(self) -> float:
        """``scale = amax / divisor``: qmax, or qmax + 1/2 on the full range (amax rounds to +-(qmax + 1))."""
        return self.qmax + 0.5 if self.full_range else float(self.qmax)

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.block_size is None else torch.float16

    def _groups(self, rows: Tensor) -> Tensor:
        """fp32 ``(R, groups, group_len)``: the whole row is one group when there is no block size."""
        if self.block_size is None:
            return rows.float().unsqueeze(1)
        return pad_rows(rows.float(), self.block_size).reshape(rows.shape[0], -1, self.block_size)

    def _scale(self, amax: Tensor) -> Tensor:
        """``amax / qmax`` in fp32, stored as fp16 for groups: the stored value is the one divided by."""
        check_finite_scale(amax, self.name)
        scale = div_scalar(amax, self.divisor).to(self.scale_dtype)
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"{self.name}: a group amax of {amax.max().item():g} overflows the fp16 scale "
                             f"(largest encodable magnitude {self.max_value:g})")
        return scale

    def _encode_rows(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        groups = self._groups(rows)
        scale = self._scale(groups.abs().amax(dim=-1))
        codes = self.element_codes(groups, scale.float().unsqueeze(-1))
        return codes.reshape(rows.shape[0], -1), {"scale": scale}

    def element_codes(self, values: Tensor, s: Tensor) -> Tensor:
        """uint8 two's-complement codes of ``RNE(values / s)`` in [qmin, qmax] (``s`` fp32, broadcast; 0 -> 0)."""
        nonzero = s > 0
        q = torch.round(values / torch.where(nonzero, s, 1.0)).clamp(self.qmin, self.qmax)
        q = torch.where(nonzero, q, 0.0).to(torch.int32)
        return (q & ((1 << self.bits) - 1)).to(torch.uint8)

    def code_values(self, codes: Tensor) -> Tensor:
        """The integers (as fp32) that two's-complement codes stand for."""
        half = 1 << (self.bits - 1)
        return ((codes.to(torch.int32) ^ half) - half).float()

    def _decode_rows(self, codes: Tensor, meta: dict[str, Tensor], k: int) -> Tensor:
        scale = meta["scale"]
        q = self.code_values(codes).reshape(*scale.shape, -1)
        return (q * scale.float().unsqueeze(-1)).reshape(codes.shape[0], -1)[:, :k]

    def _decode_rows_as(self, codes: Tensor, meta: dict[str, Tensor], k: int, dtype: torch.dtype) -> Tensor:
        if not use_cpu_kernels(codes):
            return super()._decode_rows_as(codes, meta, k, dtype)
        table = self.code_values(every_byte())
        return decode_blocks(codes, table, meta["scale"].float(), self.block_size or k, k, dtype)

    def _decode_packed_rows(self, data: Tensor, n_rows: int, k: int, dtype: torch.dtype) -> Tensor | None:
        out = torch.empty(n_rows, k, dtype=dtype)
        _, group_len = self._layout(k)
        if kernels.scaled_decode(data.numpy().reshape(n_rows, -1), group_len, self.bits == 4,
                                 torch.finfo(self.scale_dtype).bits // 8, self.code_values(every_byte()).numpy(),
                                 kernel_array(out)):
            return out
        return None  # a NaN product (a corrupt weight): the torch decode writes its bits

    def column_quantizer(self, weight: Tensor) -> IntColumns:
        return IntColumns(self, weight)

    def _pack_rows(self, codes: Tensor, meta: dict[str, Tensor]) -> Tensor:
        scale = meta["scale"]
        elements = pack_elements(codes.reshape(*scale.shape, -1), self.bits)
        return pack_blocks(elements, float_bytes(scale))

    def _unpack_rows(self, data: Tensor, n_rows: int, k: int) -> tuple[Tensor, dict[str, Tensor]]:
        n_groups, group_len = self._layout(k)
        scale_bytes = torch.finfo(self.scale_dtype).bits // 8
        elements, scale = unpack_blocks(data, n_rows, n_groups, self._element_bytes(group_len), scale_bytes)
        codes = unpack_elements(elements, self.bits)[..., :group_len].reshape(n_rows, -1)
        return codes, {"scale": bytes_float(scale, self.scale_dtype)}

    def packed_nbytes(self, n_rows: int, k: int) -> int:
        n_groups, group_len = self._layout(k)
        scale_bytes = torch.finfo(self.scale_dtype).bits // 8
        return n_rows * n_groups * (self._element_bytes(group_len) + scale_bytes)

    def _layout(self, k: int) -> tuple[int, int]:
        """(groups per row, values per group)."""
        if self.block_size is None:
            return 1, k
        return self.padded(k) // self.block_size, self.block_size

    def _element_bytes(self, group_len: int) -> int:
        return -(-group_len * self.bits // 8)

    def _qdq_rows(self, rows: Tensor) -> Tensor:
        if use_cpu_kernels(rows):
            out = torch.empty_like(rows)
            group = self.block_size or rows.shape[1]
            if kernels.int_qdq(kernel_array(rows), kernel_array(out), group, self.qmax, self.block_size is not None,
                               self.full_range):
                return out
        return super()._qdq_rows(rows)  # also where the kernel met Inf/NaN or an fp16 scale overflow: it raises


class IntColumns(ColumnQuantizer):
    """GPTQ's INT quantizer: `enter` fixes a group's scale (per channel: one block = the whole row)."""

    def __init__(self, fmt: IntFormat, weight: Tensor) -> None:
        super().__init__(fmt, weight)
        scale = torch.zeros(self.rows, self.n_blocks, dtype=fmt.scale_dtype, device=self.device)
        self.meta = {"scale": scale}

    def _enter(self, block: int, values: Tensor) -> None:
        self.meta["scale"][:, block] = self.fmt._scale(values.abs().amax(dim=-1))

    def _round(self, column: int, values: Tensor) -> Tensor:
        s = self.meta["scale"][:, column // self.block_size].float()
        codes = self.fmt.element_codes(values, s)
        self.codes[:, column] = codes
        return self.fmt.code_values(codes) * s


def _int(bits: int, group: int | None, full_range: bool = False) -> IntFormat:
    top = (1 << (bits - 1)) if full_range else (1 << (bits - 1)) - 1  # the largest code magnitude
    divisor = top - 0.5 if full_range else top  # scale = amax / divisor: its fp16 range bounds the input
    if group is None:
        name, scale, bits_per_value = f"int{bits}", "FP32 per channel", float(bits)
        max_value = float(torch.finfo(torch.float32).max)
        scope = "channel (per token for activations)"
    else:
        name, scale, bits_per_value = f"int{bits}_g{group}", f"FP16 per {group}", bits + 16 / group
        max_value = divisor * torch.finfo(torch.float16).max
        scope = f"group of {group}"
    kind = "symmetric"
    if full_range:
        name += "_full"
        kind = f"full-range ({-top}..{top - 1}, scale amax/{top - 0.5:g}: GPTQ reference / llm-compressor)"
    return IntFormat(
        name=name,
        description=f"{kind} INT{bits}, RNE, one {scale.split()[0]} scale per {scope}",
        bits_per_value=bits_per_value,
        block_size=group,
        element=f"INT{bits}",
        scale=scale,
        max_value=max_value,
        bits=bits,
        full_range=full_range,
    )


INT8 = register(_int(8, None))
INT4 = register(_int(4, None))
INT8_G64 = register(_int(8, GROUP))
INT4_G64 = register(_int(4, GROUP))
INT4_G64_FULL = register(_int(4, GROUP, full_range=True))
