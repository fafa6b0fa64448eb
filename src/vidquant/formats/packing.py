"""Byte-layout helpers shared by the scaled formats' `pack`/`unpack`.

Layout rules (docs/formats.md packing order, also used by MX, NVFP4, FP8 and INT): 4-bit codes go two
per byte with the even element in the low nibble; 8-bit codes are their own bytes; every block is
written as its element bytes followed by its scale bytes; float scales are little-endian.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16}


def pack_elements(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``(..., n)`` -> bytes ``(..., ceil(n * bits / 8))`` (an odd last nibble pairs with 0)."""
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_elements(data: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_elements`: bytes ``(..., m)`` -> codes ``(..., m * 8 / bits)``."""
    if bits == 8:
        return data.contiguous()
    return torch.stack([data & 0x0F, data >> 4], dim=-1).reshape(*data.shape[:-1], -1)


def float_bytes(x: Tensor) -> Tensor:
    """fp32/fp16 values ``(...)`` -> their little-endian bytes ``(..., itemsize)``."""
    n = x.element_size()
    bits = x.contiguous().view(_INT_VIEW[x.dtype]).to(torch.int64).unsqueeze(-1)
    shifts = torch.arange(0, 8 * n, 8, device=x.device)
    return ((bits >> shifts) & 0xFF).to(torch.uint8)


def bytes_float(data: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of `float_bytes`: little-endian bytes ``(..., itemsize)`` -> ``dtype`` values ``(...)``."""
    n = data.shape[-1]
    shifts = torch.arange(0, 8 * n, 8, device=data.device)
    bits = (data.to(torch.int64) << shifts).sum(dim=-1)
    bits = torch.where(bits >= 1 << (8 * n - 1), bits - (1 << (8 * n)), bits)  # two's complement
    return bits.to(_INT_VIEW[dtype]).view(dtype)


def pack_blocks(elements: Tensor, scales: Tensor) -> Tensor:
    """Element bytes ``(R, B, e)`` and scale bytes ``(R, B, s)`` -> flat bytes, block by block."""
    return torch.cat([elements, scales], dim=-1).reshape(-1)


def unpack_blocks(
    data: Tensor, n_rows: int, n_blocks: int, element_bytes: int, scale_bytes: int
) -> tuple[Tensor, Tensor]:
    """Inverse of `pack_blocks`: element bytes ``(R, B, e)`` and scale bytes ``(R, B, s)``."""
    blocks = data.reshape(n_rows, n_blocks, element_bytes + scale_bytes)
    return blocks[..., :element_bytes].contiguous(), blocks[..., element_bytes:].contiguous()
