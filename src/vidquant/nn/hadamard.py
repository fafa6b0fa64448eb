"""The `HadamardRotation` part of a `QuantLinear`: an online randomized Hadamard transform of the input.

``x W^T = (x R) (W R)^T`` with ``R = D H_n / sqrt(n)`` (`methods.rotation`): `forward` rotates each token's
(already smoothed) input before the activation quantizer, `fold` rotates the weight's rows once, at
construction. In a chain after `ChannelMask` this is "smooth then rotate": ``(x·m) R`` and ``(W/m) R``.

The low-rank branch sees the rotated input: its factors approximate the folded weight ``(W/m) R`` (the SVD of a
rotated matrix is the rotated SVD, so the branch captures the same subspace), the residual is rounded in the
rotated basis where the weight format sees it, and at run time the branch reuses the rotated activation the
quantizer needs anyway. With no quantization the layer equals the original up to fp32 rounding.

State tensors: ``rotation_signs`` (K,) int8 +-1 (the diagonal D), ``rotation_block`` (int64 scalar: n),
``rotation_seed`` (int64 scalar: where the signs came from, for provenance; the signs are what is applied).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from vidquant.methods.rotation import full_block, is_power_of_two, random_signs, resolve_block, rotate, rotate_hessian
from vidquant.nn.parts import InputTransform, register_part

logger = logging.getLogger(__name__)

SIGNS, BLOCK, SEED = "rotation_signs", "rotation_block", "rotation_seed"


@register_part
class HadamardRotation(InputTransform):
    """``x -> x R`` and ``W -> W R``, ``R = D H_n / sqrt(n)`` block-diagonal (QuaRot / SpinQuant-style)."""

    tensor_names = (SIGNS, BLOCK, SEED)

    def __init__(self, signs: Tensor, block: int, seed: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.check({SIGNS: signs, BLOCK: torch.tensor(block), SEED: torch.tensor(seed)}, 0, signs.numel(), None)
        self.register_buffer(SIGNS, signs.detach().to(device, torch.int8))
        self.register_buffer(BLOCK, torch.tensor(int(block), dtype=torch.int64, device=device))
        self.register_buffer(SEED, torch.tensor(int(seed), dtype=torch.int64, device=device))
        self.block = int(block)  # a Python int: no device sync per call

    @classmethod
    def from_seed(cls, in_features: int, block: int | str, seed: int, device: torch.device | str | None = None,
                  where: str = "layer") -> HadamardRotation:
        """The rotation of a K-wide input: ``block`` "full" or a power of two dividing K, signs from ``seed``."""
        return cls(random_signs(in_features, seed), resolve_block(in_features, block, where), seed, device)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], device: torch.device | str | None = None
                     ) -> HadamardRotation | None:
        """The part a state's tensors hold (None when they hold no rotation); check them first (`check_tensors`)."""
        if SIGNS not in tensors:
            return None
        return cls(tensors[SIGNS], int(tensors[BLOCK]), int(tensors[SEED]), device)

    @classmethod
    def check(cls, tensors: dict[str, Tensor], out_features: int, in_features: int, weight_format: str | None) -> None:
        if missing := [n for n in cls.tensor_names if n not in tensors]:
            raise ValueError(f"{', '.join(cls.tensor_names)} come together: {', '.join(missing)} missing")
        signs, block, seed = (tensors[n] for n in cls.tensor_names)
        if not isinstance(signs, Tensor) or signs.dtype == torch.bool or signs.is_complex():
            got = signs.dtype if isinstance(signs, Tensor) else type(signs).__name__
            raise ValueError(f"{SIGNS} must be a real tensor of +-1, got {got}")
        if signs.shape != (in_features,):
            raise ValueError(f"{SIGNS} must have shape ({in_features},) (one sign per input channel), "
                             f"got {tuple(signs.shape)}")
        if bad := int(((signs != 1) & (signs != -1)).sum()):
            raise ValueError(f"{SIGNS} must hold only +1 and -1, found {bad} other values")
        for name, t in ((BLOCK, block), (SEED, seed)):
            if not isinstance(t, Tensor) or t.dim() != 0 or t.is_floating_point() or t.dtype == torch.bool:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be an integer scalar tensor, got {got}")
        n = int(block)
        if not is_power_of_two(n) or in_features % n:
            raise ValueError(f"{BLOCK} must be a power of two dividing in_features {in_features}, got {n}")
        if int(seed) < 0:
            raise ValueError(f"{SEED} must be >= 0, got {int(seed)}")

    def forward(self, v: Tensor) -> Tensor:
        return rotate(v, self.rotation_signs, self.block)

    def fold(self, w: Tensor) -> Tensor:
        return rotate(w, self.rotation_signs, self.block)

    def in_dtype(self, x: Tensor) -> Tensor:
        return rotate(x, self.rotation_signs, self.block)  # computed in fp32, rounded once to x's dtype

    def fold_hessian(self, h: Tensor) -> Tensor:
        """``R^T H R``: the Hessian of rotated inputs (what GPTQ and the low-rank refinement weigh errors by)."""
        return rotate_hessian(h, self.rotation_signs, self.block)

    def extra_repr(self) -> str:
        return f"block={self.block}, seed={int(self.rotation_seed)}"


def rotation_tensors(in_features: int, block: int | str, seed: int, where: str = "layer") -> dict[str, Tensor]:
    """A layer's rotation state tensors (CPU). A unit ``block`` that does not divide K falls back, with a warning,
    to the largest power of two dividing both (a tail of K would otherwise mix two units)."""
    if block != "full" and is_power_of_two(block) and in_features % block:
        fallback = min(block, full_block(in_features))
        logger.warning("%s: rotation block %d does not divide in_features %d; using %d", where, block, in_features,
                       fallback)
        block = fallback
    part = HadamardRotation.from_seed(in_features, block, seed, "cpu", where)
    return part.state_tensors()
