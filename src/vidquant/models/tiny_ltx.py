"""Offline LTX-Video-architecture pipeline with deterministic random weights, for tests and adapters.

Every component is a real diffusers/transformers class built from a config (no download ever): an
`LTXVideoTransformer3DModel` (2 blocks, 32 wide), an `AutoencoderKLLTXVideo`, the `FlowMatchEulerDiscreteScheduler`
configured as LTX-Video ships it, a `T5EncoderModel` and the tokenizer of `vidquant.models.tiny`. So it goes through
`save_pretrained` / `from_pretrained` like a checkpoint.

Frame grid. `LTXPipeline.check_inputs` demands `height` and `width` divisible by 32 (whatever the VAE), so 32 x 32
is the smallest frame. The VAE keeps LTX's temporal compression 8 (3 spatio-temporal scaling blocks, the fewest
that keep it; `num_frames` = 8k + 1 gives 1 + k latent frames and decodes back to exactly 8k + 1 frames, other
counts are floored to the grid below them), but with VAE patch size 1 instead of 4 its spatial compression is 8,
not 32: a 32 x 32 frame is 4 x 4 latent tokens (transformer patch size 1) instead of a single one. Latent channels
are LTX's 128. Smallest valid call: 32 x 32 x 1 frame. `TINY_PROTOCOL` (32 x 32 x 9) gives 2 latent frames =
32 video tokens per sample, cross-attending to 128 text tokens (the pipeline pads prompts to
`max_sequence_length=128` and masks the padding); 2 steps take ~0.06 s on one CPU core.

Classifier-free guidance. With `guidance_scale > 1` the pipeline runs ONE transformer call per step on a batch of
2B: `prompt_embeds = cat([negative, positive])` (and the attention masks alike), `latents` repeated, so rows [:B]
are uncond and rows [B:] cond (batch index 1 is cond for one prompt); `noise_pred.chunk(2)` gives (uncond, text).
Wan instead calls its transformer once per branch.

Timesteps. Flow matching with `num_train_timesteps=1000`; the pipeline passes `sigmas = linspace(1, 1/S, S)`
shifted by a sequence-length-dependent `mu` (dynamic shifting) and stretched to end at `shift_terminal=0.1`. The
transformer receives the scheduler's `timestep = sigma * 1000` as a float in (0, 1000] (e.g. 1000.0 and 100.0
for 2 steps), embedded by a 256-channel sinusoid -> `time_embed.emb.timestep_embedder`.

Linears of `LTXVideoTransformer3DModel`. Inside `transformer_blocks.{i}` (all take tokens):
  attn1.to_q, to_k, to_v    self-attention over video tokens (after RMSNorm and AdaLN modulation)
  attn1.to_out.0
  attn2.to_q                cross-attention query: the raw residual stream (no norm, no modulation in LTX)
  attn2.to_k, to_v          cross-attention over the projected T5 states (padding masked)
  attn2.to_out.0
  ff.net.0.proj             FFN up (GELU-tanh)
  ff.net.2                  FFN down
The blocks hold no modulation Linear: each has a `scale_shift_table` (6 x dim) added to the shared AdaLN output.
Outside the blocks: proj_in (latent channels -> dim), time_embed.emb.timestep_embedder.linear_1 / linear_2
(timestep MLP), time_embed.linear (the AdaLN modulation Linear: input SiLU(time embedding), output 6 x dim,
shared by all blocks), caption_projection.linear_1 / linear_2 (T5 states -> dim), proj_out. The only
modulation Linear is therefore `time_embed.linear`, outside the blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

from vidquant.models.tiny import (
    HEAVY_GAIN,
    TIME_RAMP_GAIN,
    TIME_RAMP_MAX,
    VALUE_GAIN,
    t5_pipeline,
)
from vidquant.models.tiny_cogvideox import _pick, plant_token_spikes

TINY_PROTOCOL: dict[str, int] = {"height": 32, "width": 32, "frames": 9}
MIN_PROTOCOL: dict[str, int] = {"height": 32, "width": 32, "frames": 1}  # the smallest call that generates
SPATIAL_MULTIPLE = 32  # height/width, from `LTXPipeline.check_inputs`
FRAME_STEP = 8  # num_frames = 8k + 1
LATENT_CHANNELS = 128
SPATIAL_COMPRESSION = 8
TEXT_LENGTH = 128  # LTX pads every prompt to this (`max_sequence_length`)
SPIKE_RATE = 0.01  # tiny.py uses 0.003: at 32 video tokens per sample that would rarely fire at all
RESIDUAL_GAIN = 8.0  # heavy channels of the residual stream (proj_in rows): attn2.to_q has no norm before it

# Linear names of the transformer (module docstring): inside `transformer_blocks.{i}` (all token inputs; no
# modulation Linear in LTX blocks), then those outside the blocks; `time_embed.linear` is the modulation Linear.
BLOCK_TOKEN_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)  # fmt: skip
BLOCK_MODULATION_LINEARS: tuple[str, ...] = ()
OUTSIDE_LINEARS = (
    "proj_in",
    "time_embed.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_2", "time_embed.linear",
    "caption_projection.linear_1", "caption_projection.linear_2",
    "proj_out",
)  # fmt: skip
OUTSIDE_MODULATION_LINEARS = ("time_embed.linear",)  # a subset of OUTSIDE_LINEARS

TINY_TRANSFORMER: dict[str, Any] = {
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 16,  # 32 wide
    "cross_attention_dim": 32,  # = inner dim: the caption projection maps T5 states to it
    "num_layers": 2,
    "caption_channels": 32,
}
TINY_VAE: dict[str, Any] = {
    "latent_channels": LATENT_CHANNELS,
    "block_out_channels": (8, 8, 8),
    "down_block_types": ("LTXVideoDownBlock3D",) * 3,
    "decoder_block_out_channels": (8, 8, 8),
    "layers_per_block": (1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1),
    "spatio_temporal_scaling": (True, True, True),
    "decoder_spatio_temporal_scaling": (True, True, True),
    "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("conv", "conv", "conv"),
    "upsample_residual": (False, False, False),
    "upsample_factor": (1, 1, 1),
    "patch_size": 1,
    "patch_size_t": 1,
    "encoder_causal": True,
    "decoder_causal": False,
}
# scheduler_config.json of Lightricks/LTX-Video (the class defaults have no dynamic shifting, which the pipeline
# asks for through `mu`, and no terminal stretch).
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.95,
    "max_shift": 2.05,
    "base_image_seq_len": 1024,
    "max_image_seq_len": 4096,
    "shift_terminal": 0.1,
}


def build_tiny_ltx_pipeline(outliers: bool = True, seed: int = 0) -> LTXPipeline:
    """An LTX-Video-style T2V pipeline, 32 wide with 2 blocks, float32, on CPU; same seed, same weights.

    With `outliers`, the transformer's block-Linear inputs get heavy channels, a timestep-dependent scale and
    rare token spikes (see `plant_outliers`), so activation-aware quantization has something to do.
    """
    pipe, generator = t5_pipeline(LTXPipeline, lambda: AutoencoderKLLTXVideo(**TINY_VAE),
                                  lambda: LTXVideoTransformer3DModel(**TINY_TRANSFORMER),
                                  FlowMatchEulerDiscreteScheduler(**SCHEDULER), seed)
    if outliers:
        plant_outliers(pipe, generator)
    return pipe


@torch.no_grad()
def plant_outliers(pipe: LTXPipeline, generator: torch.Generator) -> None:
    """Edit the random transformer so its block-Linear inputs look like a real DiT's (cf. `tiny.plant_outliers`).

    `tiny.plant_outliers` is Wan-specific (`blocks`, `condition_embedder`, `ffn`, a cross-attention norm); this is
    the same recipe with the same gains on LTX's layout.

    1. Heavy channels `H` (max(2, dim/256), the same in every block): `HEAVY_GAIN` on the modulation scales of
       each block's `scale_shift_table` (self-attention and FFN chunks) -> attn1 q/k/v and ff.net.0.proj inputs;
       `RESIDUAL_GAIN` on proj_in's rows (the residual stream) -> attn2.to_q, which reads the raw residual;
       `HEAVY_GAIN` on the caption projection's output rows -> attn2 k/v inputs. A few value channels per
       attention are multiplied by `VALUE_GAIN` in to_v and divided by it in to_out's columns
       (function-preserving) -> heavy attn1/attn2 to_out.0 input channels.
    2. Timestep ramp: one time-embedding channel becomes SiLU(TIME_RAMP_MAX * t / 1000) (from the slowest
       sinusoid channel) and feeds the self-attention modulation scale, heavy channels more: attn1 q/k/v inputs
       shrink as denoising proceeds (~3x from t=1000 to t=100). Through `embedded_timestep` the ramp channel
       also shifts and scales that channel of proj_out's input.
    3. Rare token spikes (`tiny_cogvideox.plant_token_spikes`): one FFN hidden unit per block fires on
       ~`SPIKE_RATE` of the tokens -> a huge max/p99 in that channel of ff.net.2's input.
    """
    heavy = _plant_static_outliers(pipe.transformer, generator)
    plant_token_spikes(pipe, generator, heavy, SPIKE_RATE, TINY_PROTOCOL)


def _plant_static_outliers(model: LTXVideoTransformer3DModel, generator: torch.Generator) -> torch.Tensor:
    """Heavy channels and the timestep ramp (items 1 and 2 of `plant_outliers`); returns `H`."""
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    count = max(2, dim // 256)
    heavy = _pick(generator, count, dim)
    model.proj_in.weight[heavy] *= RESIDUAL_GAIN
    model.proj_in.bias[heavy] *= RESIDUAL_GAIN
    model.caption_projection.linear_2.weight[heavy] *= HEAVY_GAIN
    model.caption_projection.linear_2.bias[heavy] *= HEAVY_GAIN
    for block in model.transformer_blocks:
        block.scale_shift_table[1, heavy] += HEAVY_GAIN  # self-attention scale (shift, scale, gate, ...)
        block.scale_shift_table[4, heavy] += HEAVY_GAIN  # FFN scale
        for attn in (block.attn1, block.attn2):
            values = _pick(generator, count, dim)
            attn.to_v.weight[values] *= VALUE_GAIN
            attn.to_v.bias[values] *= VALUE_GAIN
            attn.to_out[0].weight[:, values] /= VALUE_GAIN

    embedder = model.time_embed.emb.timestep_embedder
    freq_dim = embedder.linear_1.in_features  # 256: [cos, sin], the last channel the slowest sin
    slowest = math.exp(-math.log(10000.0) * (freq_dim // 2 - 1) / (freq_dim // 2))
    ramp = int(_pick(generator, 1, dim))
    embedder.linear_1.weight[ramp] = 0
    embedder.linear_1.weight[ramp, freq_dim - 1] = TIME_RAMP_MAX / (1000 * slowest)
    embedder.linear_1.bias[ramp] = 0
    embedder.linear_2.weight[ramp] = 0
    embedder.linear_2.weight[:, ramp] = 0
    embedder.linear_2.weight[ramp, ramp] = 1
    embedder.linear_2.bias[ramp] = 0
    gain = torch.full((dim,), TIME_RAMP_GAIN)
    gain[heavy] *= 1 + HEAVY_GAIN
    model.time_embed.linear.weight[dim : 2 * dim, ramp] = gain  # self-attention scale chunk
    return heavy
