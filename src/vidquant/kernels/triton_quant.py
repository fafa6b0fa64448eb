"""Triton kernels: fused per-token activation quantize-dequantize and dequantize-in-GEMM for packed weights.

Why: on a GPU the torch-ops path of `vidquant.formats` runs one kernel per step with fp32 temporaries; these
kernels do a whole block (or a GEMM tile) in registers, and read weights in the project's packed byte layout
(`Format.pack`, docs/formats.md) so that a W4 weight stays 4.5 bits per value in memory.

Public functions (all take a format name or a `Format`):

- `quantize_dequantize(x, fmt)`: per-token (last dim) qdq for ``hif4``, ``mxfp4``/``mxfp4_sim``,
  ``nvfp4``/``nvfp4_sim``, ``hif8``/``hif8_inf``; bit for bit the torch-ops path (``VIDQUANT_NO_KERNELS=1``).
- `dequant_linear(x, packed, weight_shape, fmt)`: ``x @ decode(unpack(packed))^T`` (W4A16 / W8A16), the
  weight dequantized tile by tile inside the kernel; `qdq_linear` also quantize-dequantizes ``x`` per token in
  the kernel (W4A4 / W8A8 simulated in floating point).
- `hif4_int_linear(x, packed, weight_shape)`: HiF4 W4A4 on integer hardware (see `vidquant.kernels.hif4_int`):
  ``x`` encoded in the kernel to int8, the weight unpacked to int8, an exact int32 ``tl.dot`` per 64-wide unit,
  rescaled by the two units' fp32 scales and summed over units in fp32.

Dispatch: a kernel runs when the tensors are on CUDA, or anywhere when ``TRITON_INTERPRET=1`` (Triton's CPU
interpreter, what the tests use). Otherwise (CPU, no interpreter) the functions compute the same thing with
torch ops, so that callers work anywhere. Triton is imported at first use, not at import (`triton_device`: the
kernels, the exactness rules they follow, and the lazy build).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import formats
from ..formats import Format
from ..formats.elements import E2M1, E4M3
from ..formats.packing import bytes_float
from . import triton_device as dev
from .triton_device import FLOAT_KINDS, HIF4_UNIT, SPECS, KernelSpec, available, interpreting, uses_kernel


# ---- wrappers ---------------------------------------------------------------------------------------------------
def _spec(fmt: str | Format, arg: str) -> tuple[Format, KernelSpec]:
    name = fmt.name if isinstance(fmt, Format) else fmt
    if not isinstance(name, str) or name not in SPECS:
        raise ValueError(f"{arg}: format must be one of {', '.join(SPECS)}, got {name!r}")
    return formats.get(name), SPECS[name]


def _check_float(x: Tensor, arg: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{arg}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_KINDS:
        raise ValueError(f"{arg}: dtype must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{arg}: expected a non-empty tensor with a last dim, got shape {tuple(x.shape)}")


def _kernel_view(t: Tensor) -> Tensor:
    """What a kernel's pointer takes: bf16 as its int16 bits (see `_load`), other dtypes as they are."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _tensor_scale(x: Tensor, fmt: Format, spec: KernelSpec) -> Tensor:
    """NVFP4's fp32 g = amax / (6 * 448) over the whole tensor (1 where 0, or without a tensor scale), 1 element."""
    one = torch.ones(1, dtype=torch.float32, device=x.device)
    if spec.fmt != 2:
        return one
    amax = x.abs().amax().float().reshape(1)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(f"{fmt.name}: input contains Inf or NaN, so its scale is not finite")
    if not spec.tensor_scale:
        return one
    g = amax / torch.full((1,), 6.0 * 448.0, device=x.device)  # a true division, as nvfp4.py (div_scalar)
    return torch.where(g > 0, g, one)


def quantize_dequantize(x: Tensor, fmt: str | Format) -> Tensor:
    """Per-token quantize-dequantize of ``x`` along its last dim; same shape and dtype, bit for bit the torch path."""
    fmt_obj, spec = _spec(fmt, "fmt")
    _check_float(x, "x")
    if not uses_kernel(x):
        return fmt_obj.quantize_dequantize(x, dim=-1)
    dev._triton()
    k = x.shape[-1]
    rows = x.reshape(-1, k).contiguous()
    g = _tensor_scale(rows, fmt_obj, spec)
    out = torch.empty_like(rows)
    br, bk = 16, 256
    grid = (-(-rows.shape[0] // br), -(-k // bk))
    dev._qdq_kernel[grid](_kernel_view(rows), _kernel_view(out), g, rows.shape[0], k, FMT=spec.fmt, BLOCK=spec.block,
                      EMAX=spec.emax, AWAY=spec.away, SAT=spec.saturate, KIND=FLOAT_KINDS[x.dtype], BR=br, BK=bk,
                      enable_fp_fusion=False)
    return out.reshape(x.shape)


@functools.cache
def _tables(name: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """fp32 decode tables the weight kernel gathers from: element codes (and NVFP4's UE4M3 scale bytes)."""
    every = torch.arange(256, dtype=torch.uint8)
    dummy = torch.zeros(1, dtype=torch.float32)
    if name.startswith("hif8"):
        return formats.get(name).decode_table.to(device), dummy.to(device)
    if name.startswith("nvfp4"):
        return E2M1.value(every[:16]).to(device), E4M3.value(every).to(device)
    return E2M1.value(every[:16]).to(device), dummy.to(device)


def _check_weight(packed: Tensor, weight_shape: tuple[int, int], fmt: Format, x: Tensor) -> tuple[int, int]:
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise ValueError(f"packed: expected the flat uint8 tensor Format.pack returns, got {got}")
    if len(weight_shape) != 2 or any(int(s) <= 0 for s in weight_shape):
        raise ValueError(f"weight_shape: expected (N, K) with N, K > 0, got {tuple(weight_shape)}")
    n, k = (int(s) for s in weight_shape)
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim {x.shape[-1]} does not match the weight's K = {k}")
    expected = fmt.packed_nbytes(n, k)
    if packed.numel() != expected:
        raise ValueError(f"packed: {packed.numel()} bytes, but a {fmt.name} weight {(n, k)} packs to {expected}")
    if packed.device != x.device:
        raise ValueError(f"packed: on {packed.device}, x on {x.device}")
    return n, k


def _reference_linear(x: Tensor, packed: Tensor, shape: tuple[int, int], fmt: Format, act: Format | None,
                      out_dtype: torch.dtype) -> Tensor:
    """The torch-ops computation the kernels implement (the CPU fallback)."""
    w = fmt.decode(fmt.unpack(packed, shape, dim=-1, dtype=torch.float32))
    xq = act.quantize_dequantize(x, dim=-1) if act is not None else x
    return (xq.float() @ w.T).to(out_dtype)


def _linear(x: Tensor, packed: Tensor, weight_shape: tuple[int, int], fmt: str | Format, act: str | Format | None,
            out_dtype: torch.dtype | None) -> Tensor:
    w_fmt, w_spec = _spec(fmt, "fmt")
    a_fmt, a_spec = _spec(act, "act") if act is not None else (None, None)
    _check_float(x, "x")
    n, k = _check_weight(packed, weight_shape, w_fmt, x)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_KINDS:
        raise ValueError(f"out_dtype: must be bfloat16, float16 or float32, got {out_dtype}")
    if not uses_kernel(x):
        return _reference_linear(x, packed, (n, k), w_fmt, a_fmt, out_dtype)
    dev._triton()
    lead = x.shape[:-1]
    rows = x.reshape(-1, k).contiguous()
    m = rows.shape[0]
    gx = _tensor_scale(rows, a_fmt, a_spec) if a_spec is not None else torch.ones(1, device=x.device)
    if w_spec.tensor_scale:
        gw = bytes_float(packed[-4:].reshape(1, 4), torch.float32).reshape(1)
    else:
        gw = torch.ones(1, dtype=torch.float32, device=x.device)
    lut, lut2 = _tables(w_fmt.name, x.device)
    exact_x = x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and a_spec is not None and a_spec.bf16_exact)
    dot_bf16 = not interpreting() and w_spec.bf16_exact and exact_x  # the interpreter's bf16 tl.dot is not usable
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64
    grid = (-(-m // bm), -(-n // bn))
    dev._linear_kernel[grid](
        _kernel_view(rows), packed, lut, lut2, gw, gx, _kernel_view(out), m, n, k, w_fmt.padded(k),
        WFMT=w_spec.fmt, AFMT=a_spec.fmt if a_spec is not None else -1, A_BLOCK=a_spec.block if a_spec else 1,
        A_EMAX=a_spec.emax if a_spec else 0, A_AWAY=a_spec.away if a_spec else False,
        A_SAT=a_spec.saturate if a_spec else True, KIND=FLOAT_KINDS[x.dtype], OUT_KIND=FLOAT_KINDS[out_dtype],
        DOT_BF16=dot_bf16, BM=bm, BN=bn, enable_fp_fusion=False,
    )
    return out.reshape(*lead, n)


def dequant_linear(x: Tensor, packed: Tensor, weight_shape: tuple[int, int], fmt: str | Format,
                   out_dtype: torch.dtype | None = None) -> Tensor:
    """``x @ W^T`` for ``x`` (..., K) and a weight W (N, K) packed by ``fmt.pack(fmt.encode(W))`` (W4A16 / W8A16).

    W is dequantized tile by tile in the kernel to the fp32 values ``fmt.decode`` gives; the dot accumulates in
    fp32 (bf16 tensor-core operands on CUDA when x is bf16 and the format's values are bf16 values, which
    keeps every product exact). Output dtype: ``out_dtype`` or x's.
    """
    return _linear(x, packed, weight_shape, fmt, None, out_dtype)


def qdq_linear(x: Tensor, packed: Tensor, weight_shape: tuple[int, int], fmt: str | Format,
               act: str | Format | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """`dequant_linear` of ``act.quantize_dequantize(x)`` (per token, in the kernel; ``act`` defaults to ``fmt``).

    The simulated W4A4 / W8A8 GEMM: ``qdq(x) @ decode(W)^T``, qdq(x) as the torch path returns it in x's dtype.
    """
    return _linear(x, packed, weight_shape, fmt, fmt if act is None else act, out_dtype)


def hif4_int_linear(x: Tensor, packed: Tensor, weight_shape: tuple[int, int], out_dtype: torch.dtype = torch.float32,
                    return_unit_dots: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """HiF4 W4A4 with integer dots: ``x`` (..., K) float, W (N, K) packed HiF4; see `vidquant.kernels.hif4_int`.

    Equals ``hif4_int.hif4_w4a4_gemm(encode(x), encode(W))`` bit for bit (same exact unit terms, summed in the same
    order). With ``return_unit_dots`` also returns the int32 per-unit dots (U, M, N) (for tests).
    """
    from . import hif4_int  # the CPU reference, also the fallback

    fmt = formats.get("hif4")
    _check_float(x, "x")
    n, k = _check_weight(packed, weight_shape, fmt, x)
    if out_dtype not in FLOAT_KINDS:
        raise ValueError(f"out_dtype: must be bfloat16, float16 or float32, got {out_dtype}")
    units = -(-k // HIF4_UNIT)
    lead = x.shape[:-1]
    if not uses_kernel(x):
        w_enc = fmt.unpack(packed, (n, k), dim=-1, dtype=torch.float32)
        out, dots = hif4_int.hif4_w4a4_gemm(fmt.encode(x), w_enc, return_unit_dots=True)
        out = out.to(out_dtype)
        return (out, dots) if return_unit_dots else out
    dev._triton()
    rows = x.reshape(-1, k).contiguous()
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    dots = torch.empty((units, m, n) if return_unit_dots else (1,), dtype=torch.int32, device=x.device)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64
    grid = (-(-m // bm), -(-n // bn))
    dev._hif4_int_kernel[grid](_kernel_view(rows), packed, _kernel_view(out), dots, m, n, k, units,
                           KIND=FLOAT_KINDS[x.dtype], OUT_KIND=FLOAT_KINDS[out_dtype], STORE_DOTS=return_unit_dots,
                           BM=bm, BN=bn, enable_fp_fusion=False)
    out = out.reshape(*lead, n)
    return (out, dots) if return_unit_dots else out


__all__ = ["SPECS", "available", "dequant_linear", "hif4_int_linear", "interpreting", "qdq_linear",
           "quantize_dequantize", "uses_kernel"]
