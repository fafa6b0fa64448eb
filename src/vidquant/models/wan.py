"""Wan2.1 / Wan2.2 (T2V and I2V, one or two experts): the adapter and the Wan-specific helpers it uses.

The only module that knows how diffusers lays out Wan: experts ``transformer`` (high noise) and
``transformer_2`` (low noise) routed at ``boundary_ratio``, the 10 Linears of each of the ``blocks``
as targets, the embedders / ``time_proj`` / ``proj_out`` as boundary Linears, one expert call per CFG
branch (conditional first), and the I2V placeholder image.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from PIL import Image
from torch import nn

from vidquant.models.base import CallInfo, ModelAdapter, register_adapter
from vidquant.models.loading import load_with

logger = logging.getLogger(__name__)

WanPipelineLike = WanPipeline | WanImageToVideoPipeline
EXPERT_NAMES = ("transformer", "transformer_2")
TEXT_CONTEXT_LENGTH = 512  # Wan's text length; diffusers' Wan2.1-I2V attention processor hard-codes it
# Wan's VAE compresses time by 4 (so 4k + 1 frames) and space by 8, and the transformer patches 2x2
# latents: sizes off this grid are silently changed by the pipeline, which would break the protocol.
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 16


@register_adapter
class WanAdapter(ModelAdapter):
    """A diffusers `WanPipeline` / `WanImageToVideoPipeline` (Wan2.1: one expert; Wan2.2 A14B: two)."""

    family = "wan"
    is_pipeline = True
    pipeline_classes = {"WanPipeline": WanPipeline, "WanImageToVideoPipeline": WanImageToVideoPipeline}

    @classmethod
    def accepts(cls, obj: Any) -> bool:
        return isinstance(obj, WanPipeline | WanImageToVideoPipeline)

    @classmethod
    def check_kind(cls, where: str, class_name: str, i2v: bool | None) -> None:
        is_i2v = class_name == "WanImageToVideoPipeline"
        if i2v is not None and i2v != is_i2v:
            kind = "image-to-video" if is_i2v else "text-to-video"
            raise ValueError(f"{where}: holds a {kind} {class_name}, but i2v={i2v} was asked for")

    def experts(self) -> dict[str, nn.Module]:
        return experts(self.obj)

    def target_linears(self, expert: str) -> dict[str, nn.Linear]:
        return target_linears(self.experts()[expert])

    def boundary_linears(self, expert: str) -> dict[str, nn.Linear]:
        return boundary_linears(self.experts()[expert])

    def blocks(self, expert: str) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.experts()[expert].blocks))]

    def input_groups(self, expert: str) -> list[list[str]]:
        return input_groups(self.experts()[expert])

    def timestep_range(self, expert: str) -> tuple[float, float]:
        boundary = boundary_timestep(self.obj)
        top = float(self.obj.scheduler.config.num_train_timesteps)
        if boundary is None:
            return 0.0, top
        return (boundary, top) if expert == "transformer" else (0.0, boundary)

    def call_info(self, expert: str, args: tuple, kwargs: dict, previous: CallInfo | None) -> CallInfo:
        """Wan calls an expert once per CFG branch at each timestep, conditional first (one call without CFG).

        The n-th consecutive call at one timestep is branch n mod 2 with guidance on, so two prompts whose
        schedules start at the same timestep (or one-step runs) still alternate correctly.
        """
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is None:
            raise ValueError("a Wan expert was called without a timestep")
        t = float(torch.as_tensor(timestep).flatten()[0])  # Wan2.2 TI2V passes one per token
        repeat = previous.repeat + 1 if previous is not None and previous.timestep == t else 0
        guided = getattr(self.obj, "do_classifier_free_guidance", True)
        return CallInfo(t, repeat % 2 if guided else 0, repeat)

    def config(self) -> dict[str, Any]:
        """Pipeline class, routing boundary and expert configs (volatile ``_`` keys left out)."""
        return {
            "pipeline": type(self.obj).__name__,
            "boundary_ratio": self.obj.config.get("boundary_ratio"),
            "experts": {
                name: {k: v for k, v in model.config.items() if not k.startswith("_")}
                for name, model in self.experts().items()
            },
        }

    def check_protocol(self, protocol: Any) -> None:
        if protocol.frames % TEMPORAL_STRIDE != 1:
            raise ValueError(f"frames must be {TEMPORAL_STRIDE}k + 1 for Wan's VAE (e.g. 61 or 81), "
                             f"got {protocol.frames}")
        for side in ("height", "width"):
            if getattr(protocol, side) % SPATIAL_STRIDE:
                raise ValueError(f"{side} must be a multiple of {SPATIAL_STRIDE} for Wan, "
                                 f"got {getattr(protocol, side)}")

    def check_calibration(self, protocol: Any) -> None:
        """Every expert must see some step of the schedule, or it would get no statistics at all."""
        if missing := [e for e in self.experts() if e not in _reached(self, protocol.steps)]:
            need = next((n for n in range(protocol.steps + 1, 10 * protocol.steps + 64) if _reaches_all(self, n)),
                        None)
            raise ValueError(f"with {protocol.steps} steps the schedule never reaches expert {', '.join(missing)} "
                             f"(boundary timestep {boundary_timestep(self.obj):g}): calibrate with at least "
                             f"{need} steps")

    def call_kwargs(self, protocol: Any, prompt: str, seed: int) -> dict[str, Any]:
        kwargs = protocol.common_kwargs(prompt, seed)
        if isinstance(self.obj, WanImageToVideoPipeline):
            kwargs["image"] = placeholder_image(protocol.height, protocol.width, protocol.image_color)
        return kwargs


@register_adapter
class WanTransformerAdapter(ModelAdapter):
    """A bare `WanTransformer3DModel` (one expert, e.g. ``pipe.transformer`` with the user's forward loop)."""

    family = "wan-transformer"

    @classmethod
    def accepts(cls, obj: Any) -> bool:
        return isinstance(obj, WanTransformer3DModel)

    def experts(self) -> dict[str, nn.Module]:
        return {"transformer": self.obj}

    def target_linears(self, expert: str) -> dict[str, nn.Linear]:
        return target_linears(self.obj)

    def boundary_linears(self, expert: str) -> dict[str, nn.Linear]:
        return boundary_linears(self.obj)

    def blocks(self, expert: str) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.obj.blocks))]

    def input_groups(self, expert: str) -> list[list[str]]:
        return input_groups(self.obj)


def _reached(adapter: WanAdapter, steps: int) -> set[str]:
    """The experts a ``steps``-step schedule calls (on a copy of the scheduler)."""
    scheduler = copy.deepcopy(adapter.obj.scheduler)
    scheduler.set_timesteps(steps, device="cpu")
    return {expert_for_timestep(adapter.obj, t) for t in scheduler.timesteps}


def _reaches_all(adapter: WanAdapter, steps: int) -> bool:
    return _reached(adapter, steps) >= set(adapter.experts())


def load_pipeline(
    model: str | Path,
    *,
    i2v: bool | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
) -> WanPipelineLike:
    """Load a Wan T2V or I2V pipeline from a local diffusers folder (offline) or a hub id.

    `i2v`, when given, must match what the folder holds (see `loading.load_with`).
    """
    return load_with([WanAdapter], model, i2v=i2v, dtype=dtype, device=device)


def empty_expert(
    config: dict[str, Any], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> WanTransformer3DModel:
    """An expert with allocated but uninitialised weights, for code that fills every tensor itself.

    Skipping random init is what makes full-width experts cheap to build; parameters get diffusers' dtype
    islands (`_keep_in_fp32_modules` stay float32) and the RoPE tables are computed as usual.
    """
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    keep_fp32 = WanTransformer3DModel._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if any(k in name.split(".") for k in keep_fp32) else dtype)
    model.to_empty(device=device)
    cfg = model.config
    model.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len).to(device)
    stale = [n for n, m in model.named_modules() if m._non_persistent_buffers_set and not n.startswith("rope")]
    if stale:
        raise RuntimeError(f"unexpected non-persistent buffers in {stale}: this diffusers version is not supported")
    return model.eval()


def experts(pipe: DiffusionPipeline) -> dict[str, WanTransformer3DModel]:
    """The pipeline's denoising experts, high-noise `transformer` first; absent ones are skipped."""
    return {name: model for name in EXPERT_NAMES if (model := getattr(pipe, name, None)) is not None}


def boundary_timestep(pipe: DiffusionPipeline) -> float | None:
    """The timestep where Wan2.2 hands over from `transformer` to `transformer_2` (None: one expert)."""
    ratio = pipe.config.get("boundary_ratio")
    return None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps


def expert_for_timestep(pipe: DiffusionPipeline, t: float | torch.Tensor) -> str:
    """The expert the pipeline calls at timestep `t`.

    The comparison is done in torch, like the pipeline's `t >= boundary_timestep` on a scheduler tensor, so
    a timestep on the boundary routes the same way (a Python float comparison can differ by rounding).
    """
    boundary = boundary_timestep(pipe)
    if boundary is None:
        return "transformer"
    t = t if isinstance(t, torch.Tensor) else torch.tensor(t)
    return "transformer" if bool(t >= boundary) else "transformer_2"


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the transformer blocks (attention, cross-attention, image k/v, FFN): the ones to quantize."""
    return {n: m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, nn.Linear)}


def boundary_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear outside the blocks (time/text/image embedders, time_proj, proj_out): kept high precision."""
    return {n: m for n, m in model.named_modules() if not n.startswith("blocks.") and isinstance(m, nn.Linear)}


def input_groups(model: nn.Module) -> list[list[str]]:
    """Partition the target Linears into groups that always receive the very same input tensor.

    Found by running a copy of the expert on the meta device (no memory, no compute, whatever the size) and
    grouping Linears whose forward receives the identical tensor object: q/k/v of self-attention, the image
    k/v of Wan2.1-I2V, and the cross-attention k/v of *every* block, which all read the one text context.
    Calibration keeps one observer per group (the text context alone would otherwise be observed 40 times
    per expert); recipes still select layers by name. Singletons are included, in call order, so every
    target Linear is in exactly one group.
    """
    with torch.device("meta"):
        probe = type(model).from_config(model.config)
    records: list[tuple[str, torch.Tensor]] = []
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: records.append((name, args[0])))
        for name, module in target_linears(probe).items()
    ]
    try:
        with torch.no_grad():
            probe(**_meta_inputs(probe.config), return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name, tensor in records:
        group = groups.setdefault(id(tensor), [])
        if name not in group:
            group.append(name)
    result = list(groups.values())
    called = {name for name, _ in records}
    return result + [[name] for name in target_linears(probe) if name not in called]


def _meta_inputs(cfg: Any) -> dict[str, torch.Tensor]:
    """Smallest valid forward inputs for an expert, on the meta device."""
    p_t, p_h, p_w = cfg.patch_size
    inputs = {
        "hidden_states": torch.empty(1, cfg.in_channels, p_t, 2 * p_h, 2 * p_w, device="meta"),
        "timestep": torch.empty(1, device="meta"),
        "encoder_hidden_states": torch.empty(1, TEXT_CONTEXT_LENGTH, cfg.text_dim, device="meta"),
    }
    if cfg.image_dim is not None:
        # first-last-frame models (pos_embed_seq_len) take two images' tokens, which they fold into one
        pos = cfg.pos_embed_seq_len
        shape = (2, pos // 2, cfg.image_dim) if pos else (1, 4, cfg.image_dim)
        inputs["encoder_hidden_states_image"] = torch.empty(*shape, device="meta")
    return inputs


def placeholder_image(height: int, width: int, color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The blank I2V conditioning image; calibration and generation must use the same one."""
    return Image.new("RGB", (width, height), color)
