"""Randomized Hadamard rotation of a Linear's input (QuaRot / SpinQuant-style), the tensor math only.

For a Linear ``y = x W^T`` and an orthogonal ``R`` (``R R^T = I``)::

    x W^T = (x R) (W R)^T

holds exactly before quantization (QuaRot, Ashkboos et al. 2024, Eq. 1-2: the "computational invariance";
SpinQuant, Liu et al. 2024, Sec. 3, with a learned R). Here ``R = D H_n / sqrt(n)``: ``D`` a diagonal of random
signs (from a seed), ``H_n`` the Sylvester Walsh-Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]``),
either over the full width K or block-diagonal: ``R = diag(R_1, ..., R_{K/n})`` with one n-wide block per
quantization unit (64: HiF4's unit, 32: MX, 16: NVFP4).

Why it helps tails: one rotated coordinate is ``(x R)_j = sum_i s_i x_i H_ij / sqrt(n)``, a signed mix of every
channel of its block. An outlier channel of size A lands on all n outputs with size A / sqrt(n), and the
random signs keep a structured input (a constant, a spike pattern aligned with H) from re-concentrating; the
block's values become close to Gaussian, whose max / RMS ratio (what a shared block scale pays for) is far
below a heavy-tailed block's. Smoothing (`smoothing`) first moves difficulty between x and W per channel,
then the rotation spreads what is left within each block ("smooth then rotate": ``x·m`` then ``R``).
A block rotation never mixes two quantization units, so one unit's outlier cannot coarsen its neighbour.

The transform is the fast Walsh-Hadamard transform (`fwht`): log2(n) butterfly stages on reshaped views,
O(K log n) per token instead of the dense O(K n) matmul; on CPU tensors a numba kernel does the same
butterflies per row in cache (bit for bit equal: the same fp32 additions in the same order, then one
multiplication by fp32(1/sqrt(n))); `vidquant.kernels.triton_hadamard` is the GPU kernel.
"""

from __future__ import annotations

import logging
import math
import os

import numba
import numpy as np
import torch
from numba import prange
from torch import Tensor

logger = logging.getLogger(__name__)

BLOCKS = ("full", 64, 32, 16)  # the recipe's choices: full width, or one quantization unit (HiF4, MX, NVFP4)


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def full_block(k: int) -> int:
    """The widest power-of-two block that tiles ``k``: k itself for a power of two, else ``k & -k``.

    K = 5120 gives 1024 (5 blocks), K = 13824 gives 512 (27 blocks): a Hadamard matrix of order K does not
    exist in Sylvester's family, so "full" is block-diagonal over the largest power-of-two blocks there.
    """
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"in_features must be a positive int, got {k!r}")
    return k & -k


def resolve_block(k: int, block: int | str, where: str = "layer") -> int:
    """The block size for a K-wide input: "full" (`full_block`) or a power of two dividing ``k``.

    The error names ``where`` (the layer) when ``block`` cannot tile ``k``.
    """
    if block == "full":
        return full_block(k)
    if not is_power_of_two(block):
        raise ValueError(f"{where}: rotation block must be 'full' or a power of two, got {block!r}")
    if k % block:
        raise ValueError(f"{where}: rotation block {block} does not divide in_features {k}")
    return block


def random_signs(n: int, seed: int) -> Tensor:
    """``n`` random signs (int8, +-1) from ``seed``: the diagonal D of ``R = D H / sqrt(n)``, reproducible.

    torch's CPU Mersenne Twister: the same seed gives the same signs on every machine (the state stores
    them anyway).
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"random_signs: n must be a positive int, got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The Sylvester Walsh-Hadamard matrix H_n (entries +-1, ``H H^T = n I``); dense, for tests and benchmarks."""
    if not is_power_of_two(n):
        raise ValueError(f"hadamard_matrix: n must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def dense_rotation(signs: Tensor, block: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The K x K matrix R = diag(D_1 H / sqrt(n), ...) that `rotate` applies (x -> x R); for tests and benchmarks."""
    k = signs.numel()
    block = resolve_block(k, block, "dense_rotation")
    h = hadamard_matrix(block, dtype) / math.sqrt(block)
    return signs.to(dtype)[:, None] * torch.block_diag(*([h] * (k // block)))


def scale_of(block: int) -> float:
    """fp32(1 / sqrt(n)): the one normalizing multiplication after the butterflies (the fp32 kernels' constant;
    torch.tensor(1 / sqrt(n), dtype=float32) rounds to the same value, fp64 keeps its own)."""
    return float(np.float32(1.0 / math.sqrt(block)))


# ---- the transform -------------------------------------------------------------------------------------------
def fwht(x: Tensor, block: int | None = None) -> Tensor:
    """Unnormalized Walsh-Hadamard transform of every ``block``-wide slice of the last dim (``x H_n`` per slice).

    Butterfly stages h = 1, 2, 4, ..., n/2 on reshaped views (``(a, b) -> (a + b, a - b)``), ping-ponging two
    buffers: log2(n) passes, no K x K matrix. Computes in ``x``'s dtype (pass fp32 or wider).
    """
    k = x.shape[-1]
    block = k if block is None else block
    if not is_power_of_two(block) or k % block:
        raise ValueError(f"fwht: block {block} must be a power of two dividing the last dim {k}")
    rows = x.reshape(-1, block)
    m = rows.shape[0]
    if rows.requires_grad:  # autograd takes no out= buffers: the same stages, each a fresh tensor
        h = 1
        while h < block:
            a = rows.view(m, block // (2 * h), 2, h)
            rows = torch.stack((a[:, :, 0] + a[:, :, 1], a[:, :, 0] - a[:, :, 1]), dim=2).reshape(m, block)
            h *= 2
        return rows.reshape(x.shape)
    src, dst = rows.clone(), torch.empty_like(rows)
    h = 1
    while h < block:
        a = src.view(m, block // (2 * h), 2, h)
        out = dst.view(m, block // (2 * h), 2, h)
        torch.add(a[:, :, 0], a[:, :, 1], out=out[:, :, 0])
        torch.sub(a[:, :, 0], a[:, :, 1], out=out[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src.reshape(x.shape)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check(x: Tensor, signs: Tensor, block: int, who: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"{who}: expected a floating-point tensor with a last dim, got "
                         f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    k = x.shape[-1]
    if signs.dim() != 1 or signs.numel() != k:
        raise ValueError(f"{who}: signs must have shape ({k},) for a last dim of {k}, got {tuple(signs.shape)}")
    if not is_power_of_two(block) or k % block:
        raise ValueError(f"{who}: block {block} must be a power of two dividing the last dim {k}")


def use_numba(x: Tensor) -> bool:
    """The numba kernel serves fp32 CPU tensors outside autograd (VIDQUANT_NO_KERNELS=1: torch ops, the reference);
    a tensor that needs gradients (fine-tuning through the layer) takes the differentiable torch ops."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0 and not x.requires_grad
            and os.environ.get("VIDQUANT_NO_KERNELS", "") in ("", "0"))


def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """``x R`` with ``R = D H_n / sqrt(n)`` block-diagonal along the last dim; in ``x``'s dtype, computed in fp32.

    ``signs`` (K,) +-1 is D; ``block`` n a power of two dividing K (`resolve_block`). Rows of a weight rotate the
    same way (``W R``: each output row times R), which is how the inverse folds into the weight.
    """
    _check(x, signs, block, "rotate")
    if x.is_cuda and x.dtype != torch.float64 and not x.requires_grad:
        from ..kernels import triton_hadamard  # the GPU kernel (imports triton at first use)

        if triton_hadamard.available():
            return triton_hadamard.hadamard_transform(x, signs, block)
    wide = _wide(x.dtype)
    v = x.to(wide)
    if use_numba(v):
        out = (v * signs.to(wide)).contiguous()  # a fresh buffer: the kernel works in place
        _fwht_rows(out.view(-1, block).numpy(), np.float32(scale_of(block)))
        return out.to(x.dtype)
    return rotate_torch(x, signs, block)


def rotate_torch(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """`rotate` by torch ops on any device (the reference the kernels are held equal to, bit for bit)."""
    wide = _wide(x.dtype)
    v = fwht(x.to(wide) * signs.to(x.device, wide), block)
    return (v * torch.tensor(1.0 / math.sqrt(block), dtype=wide, device=v.device)).to(x.dtype)


def unrotate(y: Tensor, signs: Tensor, block: int) -> Tensor:
    """``y R^T = (y H_n / sqrt(n)) D``: the inverse of `rotate` (R is orthogonal, H symmetric)."""
    _check(y, signs, block, "unrotate")
    wide = _wide(y.dtype)
    v = fwht(y.to(wide), block) * torch.tensor(1.0 / math.sqrt(block), dtype=wide, device=y.device)
    return (v * signs.to(y.device, wide)).to(y.dtype)


def rotate_hessian(h: Tensor, signs: Tensor, block: int) -> Tensor:
    """``R^T H R``: the Hessian ``E[(xR)^T (xR)]`` of rotated inputs from that of the inputs (symmetrized)."""
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"rotate_hessian: expected a square matrix, got shape {tuple(h.shape)}")
    hr = rotate(h, signs, block)  # rows: H R
    out = rotate(hr.mT.contiguous(), signs, block)  # rows of (H R)^T = R^T H: R^T H R
    return 0.5 * (out + out.mT)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _fwht_rows(rows: np.ndarray, scale: np.float32) -> None:  # pragma: no cover - compiled
    """In place: every row (one block, signs applied) -> its butterflies, stages h = 1, 2, ..., then * scale.

    The same fp32 additions in the same order as `fwht`, so the two agree bit for bit; rows are independent
    (no sum across tasks), so results do not depend on the thread count.
    """
    m, n = rows.shape
    for i in prange(m):
        r = rows[i]
        h = 1
        while h < n:
            for s in range(0, n, 2 * h):
                for t in range(s, s + h):
                    a = r[t]
                    b = r[t + h]
                    r[t] = a + b
                    r[t + h] = a - b
            h *= 2
        for t in range(n):
            r[t] = r[t] * scale
