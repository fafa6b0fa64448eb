"""Triton kernel of the randomized fast Walsh-Hadamard transform (`methods.rotation.rotate`) for the GPU.

One program takes ``BR`` block-rows of ``B`` values (a token's K values are K / B consecutive block-rows),
multiplies by the signs, runs the log2(B) butterfly stages h = 1, 2, ..., B/2 in registers (each stage: view
the tile as (BR, B / 2h, 2, h), split the pairs, join ``(a + b, a - b)``), and multiplies by fp32(1/sqrt(B)):
the same fp32 operations in the same order as the CPU paths, so the result equals them bit for bit. O(B log B)
per block, no B x B matrix. Inputs of any float dtype are read as fp32 and the result is rounded once to the
input's dtype (as the CPU path does).

Dispatch as in `triton_quant`: the kernel runs for CUDA tensors or under ``TRITON_INTERPRET=1`` (the tests);
otherwise `hadamard_transform` is `methods.rotation.rotate`. Triton is imported and the kernel wrapped by
``triton.jit`` at first use (`_triton`), when the interpreter flag is read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..methods.rotation import is_power_of_two, rotate, rotate_torch, scale_of
from .triton_device import JitOnce, available, uses_kernel

__all__ = ["available", "hadamard_transform", "uses_kernel"]

tl: Any = None  # triton.language, bound by `_triton()`
MAX_TILE = 4096  # values per program (BR * B): 16 fp32 registers per thread at 8 warps
MAX_BLOCK = 1 << 15  # widest block one program holds (K = 2^15 at one row per program)


def _fwht_kernel(x_ptr, s_ptr, out_ptr, rows_total, nblk, scale, B: tl.constexpr, LOG: tl.constexpr,
                 BR: tl.constexpr):
    """``out = (x * s) H_B * scale`` for ``BR`` block-rows of ``B`` fp32 values (row r: signs of block r % nblk)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, B)
    live = (rows < rows_total)[:, None]
    offs = rows[:, None].to(tl.int64) * B + cols[None, :]
    x = tl.load(x_ptr + offs, mask=live, other=0.0)
    s = tl.load(s_ptr + (rows % nblk)[:, None] * B + cols[None, :], mask=live, other=0.0)
    x = x * s
    for stage in tl.static_range(LOG):
        h: tl.constexpr = 1 << stage
        x = tl.permute(tl.reshape(x, (BR, B // (2 * h), 2, h)), (0, 1, 3, 2))
        a, b = tl.split(x)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BR, B))
    tl.store(out_ptr + offs, x * scale, mask=live)


_triton = JitOnce(globals(), ("_fwht_kernel",), "hadamard kernel")


def hadamard_transform(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """``x R``, ``R = D H_B / sqrt(B)`` block-diagonal along the last dim: `methods.rotation.rotate`, on the GPU.

    ``signs`` (K,) +-1, ``block`` B a power of two dividing K. Same shape and dtype as ``x``.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0 or x.numel() == 0:
        raise ValueError("hadamard_transform: x must be a non-empty floating-point tensor with a last dim")
    k = x.shape[-1]
    if not isinstance(signs, Tensor) or signs.shape != (k,):
        raise ValueError(f"hadamard_transform: signs must have shape ({k},), got "
                         f"{tuple(signs.shape) if isinstance(signs, Tensor) else type(signs).__name__}")
    if not is_power_of_two(block) or k % block:
        raise ValueError(f"hadamard_transform: block {block} must be a power of two dividing the last dim {k}")
    if not uses_kernel(x) or x.dtype == torch.float64 or block > MAX_BLOCK:
        return rotate_torch(x, signs, block) if x.is_cuda else rotate(x, signs, block)
    _triton()
    rows = x.reshape(-1, block).to(torch.float32).contiguous()
    out = torch.empty_like(rows)
    s = signs.to(x.device, torch.float32).contiguous()
    br = max(1, MAX_TILE // block)
    grid = (-(-rows.shape[0] // br),)
    _fwht_kernel[grid](rows, s, out, rows.shape[0], k // block, scale_of(block), B=block,
                       LOG=block.bit_length() - 1, BR=br, num_warps=8 if block * br >= 2048 else 4,
                       enable_fp_fusion=False)
    return out.reshape(x.shape).to(x.dtype)

