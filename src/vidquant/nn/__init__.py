"""Quantized modules and module swapping: `QuantLinear` (fake quantization, made of `parts`) replaces an `nn.Linear`."""

from vidquant.nn.parts import PARTS, Part, StepContext, check_tensors, register_part
from vidquant.nn.quant_linear import QuantLinear, swap

__all__ = ["PARTS", "Part", "QuantLinear", "StepContext", "check_tensors", "register_part", "swap"]
