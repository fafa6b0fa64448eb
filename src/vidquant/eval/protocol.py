"""The generation protocol shared by the BF16 reference run and every quantized run.

One `Protocol` object drives both runs; its fingerprint is written next to every video, so videos made
under different settings can never be compared by mistake. Defaults are the papers' protocol (720x1280,
61 frames, 40 steps, CFG 3.5, seed 42, a white placeholder image for I2V). Which sizes a model can generate
and how a protocol becomes pipeline-call arguments is the model adapter's (`check_protocol`, `call_kwargs`).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..models import adapter_for

Channel = Annotated[int, Field(ge=0, le=255)]


class Protocol(BaseModel):
    """How every video of an evaluation is generated; prompt i uses seed ``seed + i``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: int = Field(720, ge=1)
    width: int = Field(1280, ge=1)
    frames: int = Field(61, ge=1)
    steps: int = Field(40, ge=1)
    cfg: float = Field(3.5, ge=0.0, allow_inf_nan=False)
    seed: int = Field(42, ge=0)
    fps: int = Field(16, ge=1)
    image_color: tuple[Channel, Channel, Channel] = (255, 255, 255)  # the I2V placeholder image
    negative_prompt: str | None = None  # None: the pipeline's default

    def fingerprint(self) -> str:
        """sha256 of the protocol's JSON (fields in declaration order, so stable across runs)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def seed_for(self, index: int) -> int:
        """The seed of prompt ``index``: the one per-prompt seed rule (calibration, capture, generation)."""
        return self.seed + index

    def call_kwargs(self, pipe, prompt: str, seed: int) -> dict:
        """The pipeline-call arguments for ``prompt`` under this protocol (the model adapter's, see above)."""
        return adapter_for(pipe).call_kwargs(self, prompt, seed)

    def common_kwargs(self, prompt: str, seed: int) -> dict:
        """The arguments diffusers video pipelines share; adapters add their own (an I2V image, ...)."""
        return {
            "prompt": prompt,
            "negative_prompt": self.negative_prompt,
            "height": self.height,
            "width": self.width,
            "num_frames": self.frames,
            "num_inference_steps": self.steps,
            "guidance_scale": self.cfg,
            "generator": torch.Generator("cpu").manual_seed(seed),
        }
