"""`QuantLinear`: a Linear whose weight and input go through a numeric format (fake quantization).

The paper's quantized linear (§III-B, §IV-B, Eq. 3/9): ``x W^T = (x diag(m)) (W diag(m)^-1)^T``. The mask
is folded into the weight once, at construction, and the folded weight is quantized once too; a call
only scales, clips and quantizes the activation. The arithmetic is `methods.smoothing.fold_weight` and
`quantize_input`, the same functions every error measurement uses. Weights are quantized along
in_features (the reduction dim, per output channel), activations along the features of each token.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidquant import formats
from vidquant.formats import Format
from vidquant.methods.smoothing import fold_weight, quantize_input

logger = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """Fake-quantized replacement for an `nn.Linear`, optionally with a SmoothQuant mask and a low-rank branch.

    ``forward(x) = F.linear(Q_a(clip(x·m)), Q_w(W/m - up·down), b) + ((x·m) down^T) up^T``: with formats
    ``None`` it computes the original Linear for any mask and low-rank factors (up to rounding), so the
    factors of SVDQuant's ``W/m = up·down + R`` are given as such and only the residual R is quantized.
    ``act_clip`` is a ratio of each token's max |x·m| (a 1-D tensor: one ratio per timestep bin, picked
    by `timestep_bin`, which the pipeline adapter sets before each call). ``quantized_weight`` is a residual
    already on the weight format's grid (GPTQ's rounding, restored from a state): it is used as is, since
    quantizing it again would move it (HiF4's rounding is not idempotent).
    """

    def __init__(
        self,
        linear: nn.Linear,
        weight_format: str | None,
        act_format: str | None,
        *,
        mask: Tensor | None = None,
        act_clip: Tensor | float | None = None,
        lowrank: tuple[Tensor, Tensor] | None = None,
        quantized_weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantLinear replaces an nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_format = weight_format
        self.act_format = act_format
        self._act_fmt = _format(act_format, "act_format")
        self.timestep_bin = 0
        weight = linear.weight.detach()
        device = weight.device
        self.register_buffer("mask", None if mask is None else _check_mask(mask, self.in_features, device))
        self.register_buffer("act_clip", None if act_clip is None else _check_clip(act_clip, device))
        down, up = (None, None) if lowrank is None else _check_lowrank(lowrank, self.in_features, self.out_features)
        # contiguous: a transposed view would take other BLAS kernels than the saved-and-loaded state's copy
        self.register_buffer("lowrank_down", None if down is None else down.to(device, weight.dtype).contiguous())
        self.register_buffer("lowrank_up", None if up is None else up.to(device, weight.dtype).contiguous())
        if quantized_weight is not None:
            weight = _check_quantized(quantized_weight, weight, weight_format)
        elif self.mask is not None or down is not None or weight_format is not None:
            lowrank_factors = None if down is None else (self.lowrank_down, self.lowrank_up)
            weight = fold_weight(weight, self.mask, _format(weight_format, "weight_format"), lowrank_factors)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        clip = self.act_clip
        if clip is not None and clip.dim() == 1:
            if not 0 <= self.timestep_bin < clip.numel():
                raise ValueError(f"timestep_bin {self.timestep_bin} is out of range for {clip.numel()} act_clip bins")
            clip = clip[self.timestep_bin]
        y = F.linear(quantize_input(x, self.mask, self._act_fmt, clip), self.weight, self.bias)
        if self.lowrank_down is not None:  # the branch sees the smoothed, unclipped, unquantized input
            xm = x if self.mask is None else x * self.mask.to(x.dtype)
            y = y + (xm @ self.lowrank_down.to(x.dtype).T) @ self.lowrank_up.to(x.dtype).T
        return y

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"weight_format={self.weight_format}",
            f"act_format={self.act_format}",
            f"mask={'none' if self.mask is None else 'yes'}",
        ]
        if self.act_clip is not None:
            values = [round(v, 4) for v in self.act_clip.reshape(-1).tolist()]
            parts.append(f"act_clip={values[0] if self.act_clip.dim() == 0 else values}")
        if self.lowrank_down is not None:
            parts.append(f"rank={self.lowrank_down.shape[0]}")
        return ", ".join(parts)


def swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule called ``name`` (qualified, e.g. "blocks.0.attn1.to_q") by ``new``; return the old."""
    if not name:
        raise ValueError("swap: the name of the submodule to replace is empty")
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        old = parent.get_submodule(leaf)
    except AttributeError:
        raise ValueError(f"swap: {type(model).__name__} has no submodule '{name}'") from None
    setattr(parent, leaf, new)
    logger.debug("swapped %s: %s -> %s", name, type(old).__name__, type(new).__name__)
    return old


def _format(name: str | None, what: str) -> Format | None:
    if name is None:
        return None
    try:
        return formats.get(name)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def _check_mask(mask: Tensor, in_features: int, device: torch.device) -> Tensor:
    if not isinstance(mask, Tensor) or not mask.is_floating_point():
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a floating-point tensor, got {got}")
    if mask.shape != (in_features,):
        raise ValueError(
            f"mask must have shape ({in_features},) (one value per input channel), got {tuple(mask.shape)}"
        )
    mask = mask.detach().to(device, torch.float32)
    if not torch.isfinite(mask).all():
        raise ValueError("mask has non-finite values (NaN or Inf)")
    if not (mask > 0).all():
        raise ValueError(f"mask values must be positive, found {int((mask <= 0).sum())} that are not")
    return mask


def _check_clip(act_clip: Tensor | float, device: torch.device) -> Tensor:
    clip = torch.as_tensor(act_clip).detach()
    if clip.dtype == torch.bool or clip.is_complex():
        raise ValueError(f"act_clip must be a float or a 1-D float tensor of per-bin ratios, got {clip.dtype}")
    if clip.dim() > 1 or clip.numel() == 0:
        raise ValueError(
            f"act_clip must be a float or a non-empty 1-D tensor of per-bin ratios, got shape {tuple(clip.shape)}"
        )
    clip = clip.to(device, torch.float32)
    if not ((clip > 0) & (clip <= 1)).all():  # also rejects NaN
        raise ValueError(f"act_clip ratios must be in (0, 1], got {clip.tolist()}")
    return clip


def _check_quantized(quantized: Tensor, weight: Tensor, weight_format: str | None) -> Tensor:
    if weight_format is None:
        raise ValueError("quantized_weight needs the weight_format it was rounded to")
    if not isinstance(quantized, Tensor) or quantized.shape != weight.shape:
        got = tuple(quantized.shape) if isinstance(quantized, Tensor) else type(quantized).__name__
        raise ValueError(f"quantized_weight must have the weight's shape {tuple(weight.shape)}, got {got}")
    return quantized.detach().to(weight.device, weight.dtype)


def _check_lowrank(lowrank: tuple[Tensor, Tensor], in_features: int, out_features: int) -> tuple[Tensor, Tensor]:
    if not (isinstance(lowrank, tuple | list) and len(lowrank) == 2 and all(isinstance(t, Tensor) for t in lowrank)):
        raise ValueError("lowrank must be a pair of tensors (down (rank, in_features), up (out_features, rank))")
    down, up = (t.detach() for t in lowrank)
    if not (down.is_floating_point() and up.is_floating_point()):
        raise ValueError(f"lowrank factors must be floating point, got {down.dtype} and {up.dtype}")
    rank = down.shape[0] if down.dim() == 2 else -1
    if down.dim() != 2 or down.shape[1] != in_features or rank < 1:
        raise ValueError(f"lowrank down must have shape (rank, {in_features}), got {tuple(down.shape)}")
    if up.shape != (out_features, rank):
        raise ValueError(f"lowrank up must have shape ({out_features}, {rank}) to match down, got {tuple(up.shape)}")
    return down, up
