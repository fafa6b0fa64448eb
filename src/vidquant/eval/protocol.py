"""The generation protocol shared by the BF16 reference run and every quantized run.

One `Protocol` object drives both runs; its fingerprint is written next to every video, so videos made
under different settings can never be compared by mistake. Defaults are the papers' protocol (720x1280,
61 frames, 40 steps, CFG 3.5, seed 42, a white placeholder image for I2V).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import torch
from diffusers import WanImageToVideoPipeline
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..models import wan

Channel = Annotated[int, Field(ge=0, le=255)]

# Wan's VAE compresses time by 4 (so 4k + 1 frames) and space by 8, and the transformer patches 2x2
# latents: sizes off this grid are silently changed by the pipeline, which would break the protocol.
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 16


class Protocol(BaseModel):
    """How every video of an evaluation is generated; prompt i uses seed ``seed + i``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: int = Field(720, ge=SPATIAL_STRIDE)
    width: int = Field(1280, ge=SPATIAL_STRIDE)
    frames: int = Field(61, ge=1)
    steps: int = Field(40, ge=1)
    cfg: float = 3.5
    seed: int = Field(42, ge=0)
    fps: int = Field(16, ge=1)
    image_color: tuple[Channel, Channel, Channel] = (255, 255, 255)  # the I2V placeholder image
    negative_prompt: str | None = None  # None: the pipeline's default

    @model_validator(mode="after")
    def _on_wan_grid(self) -> Protocol:
        if self.frames % TEMPORAL_STRIDE != 1:
            raise ValueError(f"frames must be {TEMPORAL_STRIDE}k + 1 for Wan's VAE (e.g. 61 or 81), got {self.frames}")
        for side in ("height", "width"):
            if getattr(self, side) % SPATIAL_STRIDE:
                raise ValueError(f"{side} must be a multiple of {SPATIAL_STRIDE} for Wan, got {getattr(self, side)}")
        return self

    def fingerprint(self) -> str:
        """sha256 of the protocol's JSON (fields in declaration order, so stable across runs)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def seed_for(self, index: int) -> int:
        return self.seed + index

    def call_kwargs(self, pipe, prompt: str, seed: int) -> dict:
        """The pipeline-call arguments for ``prompt`` under this protocol (calibration and generation alike)."""
        kwargs = {}
        if isinstance(pipe, WanImageToVideoPipeline):
            kwargs["image"] = wan.placeholder_image(self.height, self.width, self.image_color)
        return {
            "prompt": prompt,
            "negative_prompt": self.negative_prompt,
            "height": self.height,
            "width": self.width,
            "num_frames": self.frames,
            "num_inference_steps": self.steps,
            "guidance_scale": self.cfg,
            "generator": torch.Generator("cpu").manual_seed(seed),
            **kwargs,
        }
