"""An offline Wan2.1-style pipeline (one expert, 8 blocks) whose boundary blocks look unlike its middle ones.

The boundary-protection HiFloat8 paper (Wan2.1-T2V-14B) keeps the first two and last three of 40 blocks in
BF16 because their activations differ from the middle blocks'. HiF8 has no scale: it keeps 3 mantissa bits
only for |x| in [2^-3, 2^4), 2 up to 2^8, 1 up to 2^15, and powers of two below 2^-15 — so what hurts a block
is activations (or weights) far from 1. This model plants exactly that, on top of the ordinary outliers of
`tiny.plant_outliers` (heavy channels ~20x, a timestep ramp, rare FFN spikes) that every block has:

- first ``FIRST_BLOCKS`` blocks, *massive activations* (as real DiTs have in early blocks): the heavy residual
  channels' self-attention and FFN modulation scales are multiplied by ``MASSIVE_GAIN``, and the matching
  input columns of attn1 q/k/v and FFN-up divided by it, so q/k/v and FFN-up inputs reach ~10^3 (1 mantissa
  bit in HiF8) while the block computes nearly what it did (the timestep part of the modulation is not
  rescaled);
- last ``LAST_BLOCKS`` blocks, *vanishing values*: every attention value channel (attn1 and attn2) is scaled by
  ``VALUE_SCALE`` = 2^-12 in to_v and to_out's input columns by its inverse (exactly function-preserving:
  attention is linear in V), so to_out sees inputs ~2^-13 (1 bit, some in HiF8's power-of-two denormals) and
  holds weights ~2^8 (1 bit);
- middle blocks: only the ordinary outliers (heavy inputs ~20: 2 mantissa bits).

Wan2.1-I2V conditions on a CLIP image embedding through attn2's add_k / add_v projections: the I2V variant
has a small `CLIPVisionModel` and its image processor (the PIL one: no torchvision needed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from vidquant.models.tiny import HEAVY_GAIN, TINY_EXPERT, TINY_TEXT, _build, plant_outliers
from vidquant.models.wan import WanPipelineLike

NUM_BLOCKS = 8  # enough that "first 2, last 3" leaves a middle of 3
FIRST_BLOCKS = 2
LAST_BLOCKS = 3
MASSIVE_GAIN = 64.0
VALUE_SCALE = 2.0**-12
IMAGE_SIZE = 32
CLIP_VISION: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": IMAGE_SIZE, "patch_size": 8,
}  # fmt: skip
TINY_WAN21_EXPERT: dict[str, Any] = {**TINY_EXPERT, "num_layers": NUM_BLOCKS}


def build_tiny_wan21_pipeline(*, i2v: bool = False, outliers: bool = True, seed: int = 0) -> WanPipelineLike:
    """A Wan2.1-T2V (or I2V, with a CLIP image encoder) pipeline: one 32-wide expert of 8 blocks, float32, CPU."""
    expert = dict(TINY_WAN21_EXPERT)
    if i2v:  # Wan2.1-I2V: CLIP tokens enter every block's cross-attention through add_k_proj / add_v_proj
        width = expert["num_attention_heads"] * expert["attention_head_dim"]
        expert |= {"image_dim": CLIP_VISION["hidden_size"], "added_kv_proj_dim": width}
    return _build(expert, TINY_TEXT, i2v, False, outliers, seed, torch.float32, "cpu",
                  image_components=_clip, planter=plant_boundary_outliers)


def _clip() -> dict[str, Any]:
    return {
        "image_encoder": CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION)),
        "image_processor": CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
    }


def boundary_blocks(num_blocks: int) -> tuple[list[int], list[int]]:
    """The planted first and last blocks of an expert with ``num_blocks`` blocks."""
    return list(range(FIRST_BLOCKS)), list(range(num_blocks - LAST_BLOCKS, num_blocks))


@torch.no_grad()
def plant_boundary_outliers(model: nn.Module, generator: torch.Generator) -> None:
    """`tiny.plant_outliers`, then the boundary blocks' massive activations and vanishing values (module doc)."""
    plant_outliers(model, generator)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    first, last = boundary_blocks(len(model.blocks))
    heavy = _heavy_channels(model, dim)
    for index in first:
        block = model.blocks[index]
        for chunk, consumers in ((1, [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v]),
                                 (4, [block.ffn.net[0].proj])):
            block.scale_shift_table[0, chunk, heavy] = (1 + block.scale_shift_table[0, chunk, heavy]) * MASSIVE_GAIN - 1
            for linear in consumers:
                linear.weight[:, heavy] /= MASSIVE_GAIN
    for index in last:
        block = model.blocks[index]
        for attn in (block.attn1, block.attn2):
            for value in (attn.to_v, getattr(attn, "add_v_proj", None)):  # I2V: image values reach to_out too
                if value is not None:
                    value.weight *= VALUE_SCALE
                    value.bias *= VALUE_SCALE
            attn.to_out[0].weight /= VALUE_SCALE


def _heavy_channels(model: nn.Module, dim: int) -> torch.Tensor:
    """The heavy residual channels `plant_outliers` chose: those it set ``norm2.weight`` to ``HEAVY_GAIN`` on."""
    heavy = (model.blocks[0].norm2.weight == HEAVY_GAIN).nonzero().squeeze(1)
    if not 0 < len(heavy) < dim:
        raise RuntimeError("could not find the planted heavy channels")
    return heavy
