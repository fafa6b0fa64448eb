"""LTX-Video (diffusers `LTXPipeline`): one transformer with self- and cross-attention, batched CFG.

Targets per block: ``attn1.*`` and ``attn2.*`` (to_q/k/v, to_out.0) and ``ff.net.0.proj`` / ``ff.net.2``;
blocks modulate with a ``scale_shift_table`` (no Linear), the shared ``time_embed.linear``, ``proj_in``,
the caption projection and ``proj_out`` stay high precision. The transformer receives sigma x 1000.
"""

from __future__ import annotations

from typing import Any

from diffusers import LTXPipeline

from vidquant.models.base import register_adapter
from vidquant.models.dit import BatchedCFGAdapter

PIPELINE_SPATIAL_MULTIPLE = 32  # `LTXPipeline.check_inputs` demands it whatever the VAE


@register_adapter
class LTXAdapter(BatchedCFGAdapter):
    """A diffusers `LTXPipeline` (text-to-video)."""

    family = "ltx"
    pipeline_classes = {"LTXPipeline": LTXPipeline}

    def check_protocol(self, protocol: Any) -> None:
        """Sizes a multiple of 32 (and of VAE compression x patch); frames k·(temporal compression) + 1."""
        pipe = self.obj
        patch = pipe.vae_spatial_compression_ratio * pipe.transformer_spatial_patch_size
        spatial = max(PIPELINE_SPATIAL_MULTIPLE, patch)
        self._check_grid(protocol, spatial, pipe.vae_temporal_compression_ratio, "the VAE's temporal compression")
