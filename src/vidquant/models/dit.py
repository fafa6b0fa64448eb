"""The shared shape of single-transformer diffusers video pipelines that batch classifier-free guidance.

CogVideoX and LTX-Video (and most diffusers video DiTs) denoise with one ``transformer`` whose blocks sit in
``transformer_blocks``, and run guidance as ONE call per step on ``cat([uncond, cond])`` along the batch:
rows ``[:B]`` are the unconditional branch and rows ``[B:]`` the conditional one (Wan instead calls its
expert once per branch). A family adapter adds its pipeline classes, its modulation Linears (AdaLN Linears
whose input is the time embedding: boundary, never quantized) and its frame / size grid.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from vidquant.models.base import BRANCHES, CallInfo, ModelAdapter

COND, UNCOND = BRANCHES.index("cond"), BRANCHES.index("uncond")


class BatchedCFGAdapter(ModelAdapter):
    """A diffusers video pipeline with one ``transformer`` of ``transformer_blocks``, CFG stacked in the batch."""

    is_pipeline = True
    blocks_attribute: ClassVar[str] = "transformer_blocks"
    modulation_linears: ClassVar[tuple[str, ...]] = ()  # block-relative names of AdaLN Linears (boundary)

    @classmethod
    def accepts(cls, obj: Any) -> bool:
        return isinstance(obj, tuple(cls.pipeline_classes.values()))

    def experts(self) -> dict[str, nn.Module]:
        return {"transformer": self.obj.transformer}

    def blocks(self, expert: str) -> list[str]:
        count = len(getattr(self.experts()[expert], self.blocks_attribute))
        return [f"{self.blocks_attribute}.{i}" for i in range(count)]

    def target_linears(self, expert: str) -> dict[str, nn.Linear]:
        """Every token-input Linear inside the blocks (attention, FFN); AdaLN modulation Linears excluded."""
        prefix = self.blocks_attribute + "."
        out = {}
        for name, module in self.experts()[expert].named_modules():
            if isinstance(module, nn.Linear) and name.startswith(prefix):
                local = name[len(prefix):].split(".", 1)[1]  # drop the block index
                if local not in self.modulation_linears:
                    out[name] = module
        return out

    def timestep_range(self, expert: str) -> tuple[float, float]:
        return 0.0, float(self.obj.scheduler.config.num_train_timesteps)

    def call_info(self, expert: str, args: tuple, kwargs: dict, previous: CallInfo | None) -> CallInfo:
        timestep = kwargs.get("timestep")
        t = None if timestep is None else float(torch.as_tensor(timestep).flatten()[0])
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch = 0 if hidden is None else int(hidden.shape[0])
        # diffusers pipelines keep the call's scale in `_guidance_scale` (CogVideoX has no CFG property)
        guided = float(getattr(self.obj, "_guidance_scale", 1.0) or 1.0) > 1.0
        if guided and batch % 2 == 0 and batch:
            half = batch // 2
            return CallInfo(t, (UNCOND,) * half + (COND,) * half)
        return CallInfo(t, COND)

    def config(self) -> dict[str, Any]:
        return {"pipeline": type(self.obj).__name__,
                "experts": {"transformer": {k: v for k, v in self.obj.transformer.config.items()
                                            if not k.startswith("_")}}}

    def call_kwargs(self, protocol: Any, prompt: str, seed: int) -> dict[str, Any]:
        return protocol.common_kwargs(prompt, seed)

    def _check_grid(self, protocol: Any, spatial: int, frame_step: int, why: str) -> None:
        if (protocol.frames - 1) % frame_step:
            raise ValueError(f"frames must be {frame_step}k + 1 for {self.family} ({why}), got {protocol.frames}")
        for side in ("height", "width"):
            if getattr(protocol, side) % spatial:
                raise ValueError(f"{side} must be a multiple of {spatial} for this {self.family} model, "
                                 f"got {getattr(protocol, side)}")
