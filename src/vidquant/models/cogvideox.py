"""CogVideoX (diffusers `CogVideoXPipeline`): one transformer, joint [text; video] attention, batched CFG.

Targets per block: ``attn1.to_q/k/v``, ``attn1.to_out.0``, ``ff.net.0.proj``, ``ff.net.2``; the AdaLN
``norm1.linear`` / ``norm2.linear`` (input: the time embedding, one row per sample) stay high precision with
the embedders, ``norm_out.linear`` and ``proj_out``. The transformer receives the integer timestep 0..999.
"""

from __future__ import annotations

from typing import Any

from diffusers import CogVideoXPipeline

from vidquant.models.base import register_adapter
from vidquant.models.dit import BatchedCFGAdapter


@register_adapter
class CogVideoXAdapter(BatchedCFGAdapter):
    """A diffusers `CogVideoXPipeline` (text-to-video)."""

    family = "cogvideox"
    pipeline_classes = {"CogVideoXPipeline": CogVideoXPipeline}
    modulation_linears = ("norm1.linear", "norm2.linear")

    def check_protocol(self, protocol: Any) -> None:
        """Sizes a multiple of VAE compression x patch; frames 8k + 1: the VAE decodes latent frames in pairs
        (after a first single one), so only an odd latent count (F - 1) / 4 + 1 gives back F frames (as 49)."""
        spatial = self.obj.vae_scale_factor_spatial * self.obj.transformer.config.patch_size
        self._check_grid(protocol, spatial, 2 * self.obj.vae_scale_factor_temporal, "an odd number of latent frames")
