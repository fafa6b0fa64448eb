"""HiF4 on integer hardware: each element is a small integer, each 64-value unit one fp32 scale.

Why: a W4A4 HiF4 GEMM can run on int8 dot-product units (exact int32 accumulation per unit) with one fp32
rescale per pair of units, instead of dequantizing to floats. This module is the CPU reference (torch ops,
any device); `vidquant.kernels.triton_quant.hif4_int_linear` is the Triton kernel, equal to it bit for bit.

The integer form (docs/formats.md HiF4, hif4.py). An element of a unit decodes to

    v = (-1)^sign * (c / 4) * 2^(Eb + Ec) * s,    c in 0..7, Eb, Ec in {0, 1} (one bit each),

with the E6M2 scale byte ``(e << 2) | m`` (e in 0..63, m in 0..3) standing for ``s = (1 + m/4) * 2^(e - 48)
= (4 + m) * 2^(e - 50)``. Write it as

    v = n * q,    n = (-1)^sign * c * 2^(Eb + Ec) = (-1)^sign * (c << (Eb + Ec)),    q = s / 4 = (4 + m) * 2^(e - 52).

The shift Eb + Ec is 0, 1 or 2, so |n| <= 7 * 4 = 28: n is an integer in [-28, 28] (its magnitude set is
{0..7} u {8, 10, 12, 14} u {16, 20, 24, 28}); it fits int8 (even a signed 6-bit int). The unit's mantissa
(4 + m) cannot join the integer (|n| * 7 <= 196 > 127), so it stays in the fp32 unit scale q.

Proof that ``float32(n) * q == decode`` exactly: decode computes ``((c * 0.25) * 2^p) * s`` in fp32. c has 3
significant bits, multiplying by powers of two is exact, and ``(c * 2^(p-2)) * s`` has at most 3 + 3 = 6
significant bits with a binary exponent in [-50, 19], inside fp32's normal range, so every step is exact and
decode returns the real number c * 2^p * s / 4. Likewise n (|n| <= 28) and q (3 significant bits, exponent
>= -52) are exact fp32 values and their product has <= 6 significant bits in the normal range: exact, the same
real number, hence the same fp32 value. Two exceptions, both in the tests: the integer has no -0, so an element
that decodes to -0.0 gives +0.0 (equal as numbers, not as bits), and a NaN unit (E6M2 byte 0xFF) gets q = NaN,
so all its values are NaN, as decode gives. The same values are bf16 values (<= 6 significant bits, exponent
>= -50), so ``decode`` in bf16 agrees too; fp16 does not hold them all (range), so compare in fp32/bf16.

W4A4 GEMM. For activations x (M, K) and weights W (N, K), both HiF4-encoded along K, unit u contributes
``T_u = D_u * qx_u * qw_u`` with ``D_u = sum_{i<64} nx_i * nw_i`` exact in int32: |D_u| <= 64 * 28^2 = 50176
< 2^16. In fp32, ``float32(D_u)`` is exact, and ``(D_u * qx) * qw`` has <= 16 + 3 + 3 = 22 significant bits with
2^-100 <= |T_u| < 2^43 when nonzero (|D_u| >= 1, q >= 4 * 2^-52): every unit term is exact. The output
``sum_u T_u`` is accumulated in fp32 in unit order, so the only rounding is that of the U - 1 additions: by the
standard recursive-summation bound ``|out - sum_u T_u| <= gamma_{U-1} * sum_u |T_u|``, gamma_n = n u / (1 - n u),
u = 2^-24, and ``sum_u |T_u| <= sum_k |qdq(x)_k| |qdq(W)_k|``. A single unit (K <= 64) is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats import Encoded

UNIT = 64
E6M2_NAN = 0xFF


def _check(enc: Encoded, arg: str) -> None:
    if not isinstance(enc, Encoded) or enc.format != "hif4":
        got = enc.format if isinstance(enc, Encoded) else type(enc).__name__
        raise ValueError(f"{arg}: expected an Encoded from formats.get('hif4').encode, got {got!r}")
    codes, meta = enc.codes, enc.meta
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] % UNIT:
        raise ValueError(f"{arg}: codes must be uint8 (R, 64 * U), got {codes.dtype} {tuple(codes.shape)}")
    rows, units = codes.shape[0], codes.shape[1] // UNIT
    shapes = {"scale": (rows, units), "eb": (rows, units, 8), "ec": (rows, units, 16)}
    for key, shape in shapes.items():
        if key not in meta or tuple(meta[key].shape) != shape:
            got = tuple(meta[key].shape) if key in meta else None
            raise ValueError(f"{arg}: meta['{key}'] must have shape {shape}, got {got}")
    if bool((meta["eb"] > 1).any()) or bool((meta["ec"] > 1).any()):
        raise ValueError(f"{arg}: Eb/Ec must be single bits (0 or 1)")


def unit_scales(scale_codes: Tensor) -> Tensor:
    """fp32 q = s / 4 = (4 + m) * 2^(e - 52) of E6M2 bytes ``(e << 2) | m``; NaN for the reserved 0xFF."""
    code = scale_codes.to(torch.int32)
    pow2 = (((code >> 2) - 52 + 127) << 23).view(torch.float32)  # 2^(e - 52) from its bits, >= 2^-52: normal
    q = ((code & 3) + 4).float() * pow2
    return torch.where(code == E6M2_NAN, torch.nan, q)


def hif4_int_operands(enc: Encoded) -> tuple[Tensor, Tensor]:
    """Integer elements and unit scales of a HiF4 encoding: int8 ``n`` (R, 64 * U) and fp32 ``q`` (R, U).

    ``n * q`` (unit by unit) equals ``formats.get('hif4').decode(enc)`` in fp32 exactly (module docstring).
    Rows are the encoding's rows (the quantized dim moved last, the others flattened); K is zero-padded to
    whole units as `encode` pads it (padding elements are 0).
    """
    _check(enc, "enc")
    rows, units = enc.codes.shape[0], enc.codes.shape[1] // UNIT
    codes = enc.codes.to(torch.int32).reshape(rows, units, UNIT)
    shift = (enc.meta["eb"].to(torch.int32).repeat_interleave(8, -1)
             + enc.meta["ec"].to(torch.int32).repeat_interleave(4, -1))
    mag = (codes & 7) << shift
    n = torch.where((codes & 8) > 0, -mag, mag)
    return n.reshape(rows, units * UNIT).to(torch.int8), unit_scales(enc.meta["scale"])


def hif4_int_values(n: Tensor, q: Tensor, k: int | None = None) -> Tensor:
    """fp32 values ``n * q`` (R, k) of `hif4_int_operands` (unit by unit; padding dropped when ``k`` is given)."""
    rows, units = q.shape
    out = (n.reshape(rows, units, UNIT).float() * q.unsqueeze(-1)).reshape(rows, units * UNIT)
    return out if k is None else out[:, :k]


def hif4_unit_dots(nx: Tensor, nw: Tensor) -> Tensor:
    """Per-unit integer dot products D[u, m, n] = sum_{i<64} nx[m, 64u + i] * nw[n, 64u + i], int32 (U, M, N).

    Exact: |D| <= 64 * 28^2 = 50176, far inside int32.
    """
    if nx.dtype != torch.int8 or nw.dtype != torch.int8 or nx.dim() != 2 or nw.dim() != 2:
        raise ValueError(f"nx, nw: expected 2-D int8 tensors, got {nx.dtype} {tuple(nx.shape)} and {nw.dtype} "
                         f"{tuple(nw.shape)}")
    if nx.shape[1] != nw.shape[1] or nx.shape[1] % UNIT:
        raise ValueError(f"nw: K {nw.shape[1]} must equal nx's K {nx.shape[1]}, a multiple of {UNIT}")
    units = nx.shape[1] // UNIT
    xu = nx.to(torch.int32).reshape(-1, units, UNIT).transpose(0, 1)  # (U, M, 64)
    wu = nw.to(torch.int32).reshape(-1, units, UNIT).permute(1, 2, 0)  # (U, 64, N)
    return torch.bmm(xu, wu)


def hif4_w4a4_gemm(x_enc: Encoded, w_enc: Encoded, return_unit_dots: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``qdq(x) @ qdq(W)^T`` on integers: x (..., K) and W (N, K) HiF4-encoded along K; fp32 (..., N).

    Per unit the exact int32 dot of the int8 operands, times the x unit's scale, times the W unit's scale
    (exact in fp32), summed over units in order in fp32 (the only rounding; module docstring).
    ``return_unit_dots`` also returns the int32 dots (U, M, N).
    """
    _check(x_enc, "x_enc")
    _check(w_enc, "w_enc")
    if len(w_enc.shape) != 2:
        raise ValueError(f"w_enc: expected a 2-D weight (N, K), got shape {w_enc.shape}")
    k = x_enc.shape[x_enc.dim]
    if w_enc.shape[w_enc.dim] != k:
        raise ValueError(f"w_enc: K = {w_enc.shape[w_enc.dim]} does not match x_enc's K = {k}")
    if w_enc.codes.device != x_enc.codes.device:
        raise ValueError(f"w_enc: on {w_enc.codes.device}, x_enc on {x_enc.codes.device}")
    nx, qx = hif4_int_operands(x_enc)
    nw, qw = hif4_int_operands(w_enc)
    dots = hif4_unit_dots(nx, nw)
    out = torch.zeros(nx.shape[0], nw.shape[0], dtype=torch.float32, device=nx.device)
    for u in range(dots.shape[0]):
        out = out + (dots[u].float() * qx[:, u, None]) * qw[None, :, u]
    lead = [s for i, s in enumerate(x_enc.shape) if i != x_enc.dim]
    out = out.reshape(*lead, nw.shape[0])
    return (out, dots) if return_unit_dots else out


def hif4_w4a4_gemm_triton(x: Tensor, w_packed: Tensor, weight_shape: tuple[int, int],
                          return_unit_dots: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The Triton kernel of `hif4_w4a4_gemm`: ``x`` (..., K) float is encoded in the kernel, W packed by
    ``fmt.pack(fmt.encode(W))``; equals ``hif4_w4a4_gemm(fmt.encode(x), fmt.encode(W))`` bit for bit."""
    from .triton_quant import hif4_int_linear

    return hif4_int_linear(x, w_packed, weight_shape, return_unit_dots=return_unit_dots)
