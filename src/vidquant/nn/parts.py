"""The parts a `QuantLinear` is composed of, each owning named state tensors it validates.

A method's per-layer result is a dict of named tensors (`state.LayerState`); each name belongs to one part
registered here (`register_part`), which checks the tensor against the layer's shape and builds the part.
Parts of today: an input transform (`ChannelMask`: ``mask``), a `LowRankBranch` (``lowrank_down``,
``lowrank_up``), the `ActQuantizer` (``act_clip``, optionally one ratio per timestep bin), the weight
(``weight_packed``: the residual already rounded to the weight format, e.g. GPTQ's) and a QAT delta (`LoRADelta`:
``lora_down``, ``lora_up``). A new method adds a
part (a rotation, a packed-runtime weight) in a file of its own.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from vidquant import formats
from vidquant.formats import Format
from vidquant.methods.smoothing import quantize_input
from vidquant.methods.ste import ste_quantize_input


class StepContext:
    """The timestep bin of the expert call in progress, shared by that expert's quantized layers.

    The model adapter sets it before every expert call (`ModelAdapter.publish_bins`).
    """

    __slots__ = ("timestep_bin",)

    def __init__(self, timestep_bin: int = 0) -> None:
        self.timestep_bin = timestep_bin


class Part(nn.Module):
    """A piece of a `QuantLinear` that owns the state tensors named in ``tensor_names``."""

    tensor_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check(cls, tensors: dict[str, Tensor], out_features: int, in_features: int, weight_format: str | None) -> None:
        """Raise a ValueError when ``tensors`` (this part's names only) cannot belong to such a layer."""

    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors a state stores for this part, by name."""
        return {name: getattr(self, name) for name in self.tensor_names if getattr(self, name) is not None}

    def deployed_nbytes(self) -> int:
        """Bytes this part adds to a deployed layer (fp32 masks and clips, BF16 low-rank factors)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())


PARTS: dict[str, type[Part]] = {}  # state tensor name -> the part that owns it


def register_part(cls: type[Part]) -> type[Part]:
    """Class decorator: ``cls`` owns its ``tensor_names`` in every `LayerState`."""
    for name in cls.tensor_names:
        if PARTS.get(name, cls) is not cls:
            raise ValueError(f"state tensor '{name}' already belongs to {PARTS[name].__name__}")
        PARTS[name] = cls
    return cls


def check_tensors(tensors: dict[str, Tensor], out_features: int, in_features: int, weight_format: str | None,
                  where: str) -> None:
    """Validate a layer's named tensors by their owning parts; the error names the layer and the tensor."""
    if unknown := sorted(set(tensors) - set(PARTS)):
        raise ValueError(f"{where}: unknown state tensors {unknown} (known: {', '.join(sorted(PARTS))})")
    for part in dict.fromkeys(PARTS[name] for name in tensors):
        mine = {name: tensors[name] for name in part.tensor_names if name in tensors}
        try:
            part.check(mine, out_features, in_features, weight_format)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


class InputTransform(Part):
    """An exact reparametrization of the input: ``x W^T = T(x) fold(W)^T`` before quantization."""

    def forward(self, v: Tensor) -> Tensor:
        """The transformed input, computed in fp32 (or wider) as the quantizer sees it."""
        raise NotImplementedError

    def fold(self, w: Tensor) -> Tensor:
        """The weight the transformed input multiplies (fp32 or wider)."""
        raise NotImplementedError

    def in_dtype(self, x: Tensor) -> Tensor:
        """The transform in the input's own dtype (what the low-rank branch reads)."""
        raise NotImplementedError


@register_part
class ChannelMask(InputTransform):
    """SmoothQuant's per-channel mask m > 0: ``x · m`` and ``W / m`` (tail-aware paper Eq. 3 / 9)."""

    tensor_names = ("mask",)

    def __init__(self, mask: Tensor, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(device, torch.float32))

    @classmethod
    def check(cls, tensors: dict[str, Tensor], out_features: int, in_features: int, weight_format: str | None) -> None:
        mask = tensors["mask"]
        if not isinstance(mask, Tensor) or not mask.is_floating_point():
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a floating-point tensor, got {got}")
        if mask.shape != (in_features,):
            raise ValueError(f"mask must have shape ({in_features},) (one value per input channel), "
                             f"got {tuple(mask.shape)}")
        if not torch.isfinite(mask).all():
            raise ValueError("mask has non-finite values (NaN or Inf)")
        if not (mask > 0).all():
            raise ValueError(f"mask values must be positive, found {int((mask <= 0).sum())} that are not")

    def forward(self, v: Tensor) -> Tensor:
        return v * self.mask

    def fold(self, w: Tensor) -> Tensor:
        return w / self.mask

    def in_dtype(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x.dtype)


@register_part
class LowRankBranch(Part):
    """SVDQuant's branch ``up · down`` of the folded weight, kept in the layer's dtype: only the residual is
    quantized, and the branch reads the transformed, unclipped, unquantized input."""

    tensor_names = ("lowrank_down", "lowrank_up")

    def __init__(self, down: Tensor, up: Tensor, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        # contiguous: a transposed view would take other BLAS kernels than the saved-and-loaded state's copy
        self.register_buffer("lowrank_down", down.detach().to(device, dtype).contiguous())
        self.register_buffer("lowrank_up", up.detach().to(device, dtype).contiguous())

    @classmethod
    def check(cls, tensors: dict[str, Tensor], out_features: int, in_features: int, weight_format: str | None) -> None:
        if set(tensors) != set(cls.tensor_names):
            raise ValueError("lowrank_down and lowrank_up come together")
        down, up = tensors["lowrank_down"], tensors["lowrank_up"]
        if not (down.is_floating_point() and up.is_floating_point()):
            raise ValueError(f"lowrank factors must be floating point, got {down.dtype} and {up.dtype}")
        rank = down.shape[0] if down.dim() == 2 else -1
        if down.dim() != 2 or down.shape[1] != in_features or rank < 1:
            raise ValueError(f"lowrank down must have shape (rank, {in_features}), got {tuple(down.shape)}")
        if up.shape != (out_features, rank):
            raise ValueError(f"lowrank up must have shape ({out_features}, {rank}) to match down, "
                             f"got {tuple(up.shape)}")

    @property
    def rank(self) -> int:
        return self.lowrank_down.shape[0]

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lowrank_down, self.lowrank_up

    def forward(self, xm: Tensor) -> Tensor:
        return (xm @ self.lowrank_down.to(xm.dtype).T) @ self.lowrank_up.to(xm.dtype).T

    def deployed_nbytes(self) -> int:
        return 2 * (self.lowrank_down.numel() + self.lowrank_up.numel())  # deployed in BF16


@register_part
class ActQuantizer(Part):
    """Per-token activation quantization with an optional clip ratio (one per timestep bin, or a scalar).

    ``clip(v) = clamp(v, ±ratio · max|v| per token)``, then the format's quantize-dequantize; the bin comes
    from the shared `StepContext` of the layer's expert.
    """

    tensor_names = ("act_clip",)

    def __init__(self, act_format: str | None, act_clip: Tensor | float | None, device: torch.device,
                 context: StepContext | None = None) -> None:
        super().__init__()
        self.format_name = act_format
        self.format = format_of(act_format, "act_format")
        clip = None if act_clip is None else torch.as_tensor(act_clip).detach()
        if clip is not None:
            self.check({"act_clip": clip}, 0, 0, None)
            clip = clip.to(device, torch.float32)
        self.register_buffer("act_clip", clip)
        self.context = context or StepContext()

    @classmethod
    def check(cls, tensors: dict[str, Tensor], out_features: int, in_features: int, weight_format: str | None) -> None:
        clip = torch.as_tensor(tensors["act_clip"])
        if clip.dtype == torch.bool or clip.is_complex():
            raise ValueError(f"act_clip must be a float or a 1-D float tensor of per-bin ratios, got {clip.dtype}")
        if clip.dim() > 1 or clip.numel() == 0:
            raise ValueError(f"act_clip must be a float or a non-empty 1-D tensor of per-bin ratios, "
                             f"got shape {tuple(clip.shape)}")
        if not ((clip > 0) & (clip <= 1)).all():  # also rejects NaN
            raise ValueError(f"act_clip ratios must be in (0, 1], got {clip.tolist()}")

    def ratio(self) -> Tensor | None:
        clip = self.act_clip
        if clip is None or clip.dim() == 0:
            return clip
        b = self.context.timestep_bin
        if not 0 <= b < clip.numel():
            raise ValueError(f"timestep_bin {b} is out of range for {clip.numel()} act_clip bins")
        return clip[b]

    def forward(self, v: Tensor) -> Tensor:
        """Clip and quantize the transformed fp32 input ``v`` (`smoothing.quantize_input`, no mask); while
        training (a gradient wanted for ``v`` or a trainable ratio) the same values through the STE (`methods.ste`)."""
        ratio = self.ratio()
        if torch.is_grad_enabled() and (v.requires_grad or (ratio is not None and ratio.requires_grad)):
            return ste_quantize_input(v, self.format, ratio)
        return quantize_input(v, None, self.format, ratio)


@register_part
class LoRADelta(Part):
    """A trained low-rank correction ``(x down^T) up^T`` added to the layer's output (QAT, `ptq.finetune`).

    It reads the layer's raw input ``x`` (not the masked or rotated one), so it corrects the layer's function
    whatever transforms precede the quantizer, and is independent of a mask trained alongside it. Factors are
    kept in fp32 (the trained values) and computed in the input's dtype; the quantized weight stays frozen
    (packed or dense), so the fake and the packed runtime add the very same delta.
    """

    tensor_names = ("lora_down", "lora_up")

    def __init__(self, down: Tensor, up: Tensor, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("lora_down", down.detach().to(device, torch.float32).contiguous())
        self.register_buffer("lora_up", up.detach().to(device, torch.float32).contiguous())

    @classmethod
    def check(cls, tensors: dict[str, Tensor], out_features: int, in_features: int, weight_format: str | None) -> None:
        if set(tensors) != set(cls.tensor_names):
            raise ValueError("lora_down and lora_up come together")
        down, up = tensors["lora_down"], tensors["lora_up"]
        if not (down.is_floating_point() and up.is_floating_point()):
            raise ValueError(f"lora factors must be floating point, got {down.dtype} and {up.dtype}")
        rank = down.shape[0] if down.dim() == 2 else -1
        if down.dim() != 2 or down.shape[1] != in_features or rank < 1:
            raise ValueError(f"lora_down must have shape (rank, {in_features}), got {tuple(down.shape)}")
        if up.shape != (out_features, rank):
            raise ValueError(f"lora_up must have shape ({out_features}, {rank}) to match lora_down, "
                             f"got {tuple(up.shape)}")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise ValueError("lora factors have non-finite values (NaN or Inf)")

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.lora_down.to(x.dtype).T) @ self.lora_up.to(x.dtype).T

    def deployed_nbytes(self) -> int:
        return 2 * (self.lora_down.numel() + self.lora_up.numel())  # deployable in BF16


@register_part
class PackedWeight(Part):
    """The residual weight already on the weight format's grid (GPTQ's rounding), as the format's bytes.

    Used as is (quantizing it again would move it: HiF4's rounding is not idempotent): decoded once into the
    dense weight under the fake runtime, kept as bytes under the packed one (`nn.packed`).
    """

    tensor_names = ("weight_packed",)

    @classmethod
    def check(cls, tensors: dict[str, Tensor], out_features: int, in_features: int, weight_format: str | None) -> None:
        packed = tensors["weight_packed"]
        if weight_format is None:
            raise ValueError("weight_packed needs the weight_format it was rounded to")
        expected = formats.get(weight_format).packed_nbytes(out_features, in_features)
        if packed.dtype != torch.uint8 or packed.numel() != expected:
            raise ValueError(f"weight_packed must hold {expected} uint8 bytes of {weight_format} for a "
                             f"{out_features}x{in_features} weight, got {packed.numel()} {packed.dtype}")


def format_of(name: str | None, what: str) -> Format | None:
    if name is None:
        return None
    try:
        return formats.get(name)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
