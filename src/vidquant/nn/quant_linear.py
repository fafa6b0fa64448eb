"""`QuantLinear`: a Linear whose weight and input go through a numeric format (fake quantization), made of parts.

The paper's quantized linear (§III-B, §IV-B, Eq. 3/9): ``x W^T = (x diag(m)) (W diag(m)^-1)^T``, generalized
to a chain of exact input transforms (`parts.InputTransform`). The transforms are folded into the weight
once, at construction, and the folded weight is quantized once too; a call only transforms, clips and
quantizes the activation (`parts.ActQuantizer`). The arithmetic is `methods.smoothing.fold_weight` and
`quantize_input`, the same functions every error measurement uses. Weights are quantized along in_features
(the reduction dim, per output channel), activations along the features of each token.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidquant import formats
from vidquant.formats import Encoded
from vidquant.methods.smoothing import residual_weight
from vidquant.methods.ste import ste_quantize
from vidquant.nn.hadamard import HadamardRotation
from vidquant.nn.packed import PackedLinearWeight
from vidquant.nn.parts import (
    ActQuantizer,
    ChannelMask,
    InputTransform,
    LoRADelta,
    LowRankBranch,
    StepContext,
    check_tensors,
    format_of,
)

logger = logging.getLogger(__name__)

RUNTIMES = ("fake", "packed")  # the dense fake-quantized weight, or the format's bytes decoded per call


class QuantLinear(nn.Module):
    """Fake-quantized replacement for an `nn.Linear`: input transforms, a weight, a low-rank branch, an activation
    quantizer.

    ``forward(x) = F.linear(Q_a(clip(T(x))), Q_w(fold(W) - up·down), b) + (T(x) down^T) up^T``: with formats
    ``None`` it computes the original Linear for any mask and low-rank factors (up to rounding), so the
    factors of SVDQuant's ``W/m = up·down + R`` are given as such and only the residual R is quantized.
    ``act_clip`` is a ratio of each token's max |T(x)| (a 1-D tensor: one ratio per timestep bin, picked by
    `timestep_bin`, which the model adapter publishes before each expert call). ``quantized_weight`` is a
    residual already on the weight format's grid (GPTQ's rounding, restored from a state): used as is.
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
        transforms: list[InputTransform] | None = None,
        context: StepContext | None = None,
        runtime: str = "fake",
        encoded_weight: Encoded | None = None,
        tile_rows: int | None = None,
        device: torch.device | str | None = None,
        lora: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantLinear replaces an nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_format = weight_format
        weight = linear.weight.detach()
        device = weight.device if device is None else torch.device(device)  # given: a meta base (load_quantized)
        chain = [] if mask is None else [ChannelMask(_as_tensor(mask, "mask"), device)]
        for t in chain:
            t.check(t.state_tensors(), self.out_features, self.in_features, weight_format)
        self.transforms = nn.ModuleList([*chain, *(transforms or [])])
        self.act = ActQuantizer(act_format, act_clip, device, context)
        self.lowrank = None
        if lowrank is not None:
            down, up = _pair(lowrank)
            LowRankBranch.check({"lowrank_down": down, "lowrank_up": up}, self.out_features, self.in_features, None)
            self.lowrank = LowRankBranch(down, up, device, weight.dtype)
        self.lora = None  # a QAT delta on the output (`parts.LoRADelta`), reading the raw input
        if lora is not None:
            down, up = _pair(lora)
            LoRADelta.check({"lora_down": down, "lora_up": up}, self.out_features, self.in_features, None)
            self.lora = LoRADelta(down, up, device)
        self.requant_base: Tensor | None = None  # QAT of the transforms: see `train_transforms`
        wfmt = format_of(weight_format, "weight_format")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.packed = None
        if runtime == "packed":
            if wfmt is None:
                raise ValueError("the packed runtime needs a weight format (a BF16 weight has nothing to pack)")
            if encoded_weight is None:
                if quantized_weight is not None:
                    raise ValueError("the packed runtime takes the weight's encoding (encoded_weight), not its "
                                     "dequantized values: re-encoding them would move some (HiF4 is not idempotent)")
                encoded_weight = wfmt.encode(self._folded_residual(weight))
            encoded_weight = replace(encoded_weight, dtype=weight.dtype)  # decoded straight into the layer's dtype
            self.packed = PackedLinearWeight(encoded_weight, tile_rows)
            self.register_parameter("weight", None)  # the dense weight is never kept (see `dense_weight`)
        elif quantized_weight is not None:
            self.weight = nn.Parameter(_check_quantized(quantized_weight, weight, weight_format), requires_grad=False)
        elif len(self.transforms) or self.lowrank is not None or wfmt is not None:
            folded = self._folded_residual(weight)
            self.weight = nn.Parameter((folded if wfmt is None else wfmt.quantize_dequantize(folded)).to(weight.dtype),
                                       requires_grad=False)
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias

    def _folded_residual(self, weight: Tensor) -> Tensor:
        """``fold(W) - up · down`` in fp32 or wider: what the weight format rounds (`smoothing.residual_weight`)."""
        folded = weight.to(torch.promote_types(weight.dtype, torch.float32))
        for t in self.transforms:
            folded = t.fold(folded)
        return residual_weight(folded, None, None if self.lowrank is None else self.lowrank.factors())

    @classmethod
    def from_state(cls, linear: nn.Linear, weight_format: str | None, act_format: str | None,
                   tensors: dict[str, Tensor], *, context: StepContext | None = None, name: str = "layer",
                   runtime: str = "fake", tile_rows: int | None = None,
                   device: torch.device | str | None = None) -> QuantLinear:
        """The layer a state's named tensors make of the base Linear (each validated by its owning part).

        ``device``: where the layer lives when the base Linear is only a shape (on the meta device): then the
        state must carry the packed weight and the runtime be packed.
        """
        check_tensors(tensors, linear.out_features, linear.in_features, weight_format, name)
        device = linear.weight.device if device is None else torch.device(device)
        to = {k: v.to(device) for k, v in tensors.items()}
        quantized = encoded = None
        if "weight_packed" in to:
            fmt, shape, dtype = formats.get(weight_format), tuple(linear.weight.shape), linear.weight.dtype
            encoded = fmt.unpack(to["weight_packed"], shape, -1, dtype)
            if runtime == "fake":
                quantized, encoded = fmt.decode(encoded), None
        lowrank = (to["lowrank_down"], to["lowrank_up"]) if "lowrank_down" in to else None
        lora = (to["lora_down"], to["lora_up"]) if "lora_down" in to else None
        rotation = HadamardRotation.from_tensors(to, device)  # after the mask: smooth, then rotate
        return cls(linear, weight_format, act_format, mask=to.get("mask"), act_clip=to.get("act_clip"),
                   lowrank=lowrank, quantized_weight=quantized, context=context, runtime=runtime,
                   transforms=None if rotation is None else [rotation],
                   encoded_weight=encoded, tile_rows=tile_rows, device=device, lora=lora)

    def train_transforms(self, base_weight: Tensor) -> None:
        """Let trainable input transforms (a mask) move the quantized weight: from now on each call re-folds
        ``base_weight`` (the base Linear's own tensor, referenced, not copied) and re-quantizes it through the
        STE, and the dense quantized copy is dropped, so the layer holds no second weight while training.
        `freeze_transforms` quantizes once more under the final transforms and restores the dense weight."""
        if self.packed is not None or self.weight_format is None:
            raise ValueError("training the transforms needs the fake runtime and a weight format")
        if tuple(base_weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"base weight must be {self.out_features}x{self.in_features}, got "
                             f"{tuple(base_weight.shape)}")
        self.requant_base = base_weight.detach()
        self.weight = None

    def freeze_transforms(self) -> None:
        """End `train_transforms`: the dense weight quantized under the current transforms, as `from_state` makes it."""
        if self.requant_base is None:
            return
        with torch.no_grad():
            weight = self.requantized_weight()
        self.requant_base = None
        self.weight = nn.Parameter(weight, requires_grad=False)

    def requantized_weight(self) -> Tensor:
        """``Q_w(fold(W) - up·down)`` from the referenced base weight, differentiable in the transforms (STE); the
        same arithmetic, in the same order, as the construction of the fake runtime's dense weight."""
        base = self.requant_base
        folded = base.to(torch.promote_types(base.dtype, torch.float32))
        for t in self.transforms:
            folded = t.fold(folded)
        if self.lowrank is not None:
            down, up = self.lowrank.factors()
            folded = folded - up.to(folded.dtype) @ down.to(folded.dtype)
        return ste_quantize(folded, self.weight_format).to(base.dtype)

    def dense_weight(self) -> Tensor:
        """The dequantized weight the layer multiplies by (decoded from its bytes under the packed runtime)."""
        if self.requant_base is not None:  # while its transforms train (`train_transforms`)
            with torch.no_grad():
                return self.requantized_weight()
        return self.weight if self.packed is None else self.packed.dense()

    # read-only views of the parts' tensors, for inspection and size accounting
    @property
    def act_format(self) -> str | None:
        return self.act.format_name

    @property
    def mask(self) -> Tensor | None:
        masks = [t.mask for t in self.transforms if isinstance(t, ChannelMask)]
        return masks[0] if masks else None

    @property
    def act_clip(self) -> Tensor | None:
        return self.act.act_clip

    @property
    def lowrank_down(self) -> Tensor | None:
        return None if self.lowrank is None else self.lowrank.lowrank_down

    @property
    def lowrank_up(self) -> Tensor | None:
        return None if self.lowrank is None else self.lowrank.lowrank_up

    @property
    def timestep_bin(self) -> int:
        return self.act.context.timestep_bin

    @timestep_bin.setter
    def timestep_bin(self, value: int) -> None:
        self.act.context.timestep_bin = value

    def forward(self, x: Tensor) -> Tensor:
        if not len(self.transforms) and self.act.format is None and self.act.act_clip is None:
            xq = x  # nothing to transform, clip or quantize: no fp32 copy of x (x -> fp32 -> x's dtype is exact)
        else:
            v = x.to(torch.promote_types(x.dtype, torch.float32))
            for t in self.transforms:
                v = t(v)
            xq = self.act(v).to(x.dtype)
        if self.packed is not None:
            y = self.packed(xq, self.bias)
        else:
            y = F.linear(xq, self.weight if self.requant_base is None else self.requantized_weight(), self.bias)
        if self.lowrank is not None:  # the branch sees the transformed, unclipped, unquantized input
            xm = x
            for t in self.transforms:
                xm = t.in_dtype(xm)
            y = y + self.lowrank(xm)
        if self.lora is not None:
            y = y + self.lora(x)
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
        parts += [f"rotation=hadamard({t.extra_repr()})" for t in self.transforms if isinstance(t, HadamardRotation)]
        if self.act_clip is not None:
            values = [round(v, 4) for v in self.act_clip.reshape(-1).tolist()]
            parts.append(f"act_clip={values[0] if self.act_clip.dim() == 0 else values}")
        if self.lowrank is not None:
            parts.append(f"rank={self.lowrank.rank}")
        if self.lora is not None:
            parts.append(f"lora_rank={self.lora.rank}")
        parts.append(f"runtime={'fake' if self.packed is None else 'packed'}")
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


def _as_tensor(value: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        got = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{what} must be a floating-point tensor, got {got}")
    return value


def _pair(lowrank: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    if not (isinstance(lowrank, tuple | list) and len(lowrank) == 2 and all(isinstance(t, Tensor) for t in lowrank)):
        raise ValueError("lowrank must be a pair of tensors (down (rank, in_features), up (out_features, rank))")
    return lowrank[0].detach(), lowrank[1].detach()


def _check_quantized(quantized: Tensor, weight: Tensor, weight_format: str | None) -> Tensor:
    if weight_format is None:
        raise ValueError("quantized_weight needs the weight_format it was rounded to")
    if not isinstance(quantized, Tensor) or quantized.shape != weight.shape:
        got = tuple(quantized.shape) if isinstance(quantized, Tensor) else type(quantized).__name__
        raise ValueError(f"quantized_weight must have the weight's shape {tuple(weight.shape)}, got {got}")
    return quantized.detach().to(weight.device, weight.dtype)
