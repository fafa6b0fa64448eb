"""Kernels for the formats beyond the CPU numba paths: Triton (GPU, or its CPU interpreter) and HiF4 on integers.

Importing this package does not import triton; the Triton kernels are built at first use (see `triton_device`).

    >>> from vidquant.kernels import quantize_dequantize, dequant_linear, hif4_w4a4_gemm
"""

from __future__ import annotations

from .hif4_int import hif4_int_operands, hif4_int_values, hif4_unit_dots, hif4_w4a4_gemm, hif4_w4a4_gemm_triton
from .triton_quant import available, dequant_linear, hif4_int_linear, qdq_linear, quantize_dequantize, uses_kernel

__all__ = [
    "available",
    "dequant_linear",
    "hif4_int_linear",
    "hif4_int_operands",
    "hif4_int_values",
    "hif4_unit_dots",
    "hif4_w4a4_gemm",
    "hif4_w4a4_gemm_triton",
    "qdq_linear",
    "quantize_dequantize",
    "uses_kernel",
]
