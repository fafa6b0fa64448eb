"""Quantized modules and module swapping: `QuantLinear` (fake quantization) replaces an `nn.Linear`."""

from vidquant.nn.quant_linear import QuantLinear, swap

__all__ = ["QuantLinear", "swap"]
