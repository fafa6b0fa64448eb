"""Offline CogVideoX-5B-architecture pipeline with deterministic random weights, for tests and adapters.

Every component is a real diffusers/transformers class built from a config (no download ever): a
`CogVideoXTransformer3DModel` (2 blocks, 32 wide, rotary positions as in CogVideoX-5B), an
`AutoencoderKLCogVideoX`, the `CogVideoXDPMScheduler` CogVideoX-5B ships with, a `T5EncoderModel` and the
tokenizer of `vidquant.models.tiny`. So it goes through `save_pretrained` / `from_pretrained` like a checkpoint.

Frame grid. The VAE keeps CogVideoX's temporal compression 4 (`num_frames` F gives (F - 1) // 4 + 1 latent
frames) but has 3 blocks instead of 4, so its spatial compression is 4, not 8: with patch size 2, `height` and
`width` must be multiples of 8 (what `check_inputs` already demands); 8 x 8 is the smallest frame, non-square is
fine. The VAE decodes latent frames in chunks of 2 (the first chunk takes 3 when the count is odd), so only
F = 8k + 1 (an odd latent count: 1, 9, 17, 25, ..., as the real 49) decodes back to F frames; F = 8k + 5 (an even
latent count) decodes to 8k + 8 frames (5 -> 8, 13 -> 16), and other F are first floored to 4k + 1. Smallest
valid call: 8 x 8 x 1 frame (`MIN_PROTOCOL`). `TINY_PROTOCOL` (32 x 32 x 9) gives 3 latent frames of 4 x 4 patches
= 48 video tokens per sample, next to the 226 text tokens (the pipeline pads every prompt to
`max_sequence_length=226`, and CogVideoX attends jointly over [text; video]); 2 steps take ~0.1 s on one CPU core.

Classifier-free guidance. With `guidance_scale > 1` the pipeline runs ONE transformer call per step on a batch of
2B: `prompt_embeds = cat([negative, positive])` and `latents` repeated, so rows [:B] are uncond and rows [B:]
cond (batch index 1 is cond for one prompt); `noise_pred.chunk(2)` gives (uncond, text). Wan instead calls its
transformer once per branch.

Timesteps. The scheduler has `num_train_timesteps=1000`, v-prediction, zero-terminal-SNR betas and "trailing"
spacing (2 steps visit t = 999, 499); the transformer receives the integer timestep 0..999 (int64, expanded to
the batch) and embeds it with a 32-channel sinusoid (`time_proj`, width = inner dim) -> `time_embedding`.

Linears of `CogVideoXTransformer3DModel`. Inside `transformer_blocks.{i}` (token inputs unless noted):
  norm1.linear              AdaLN modulation, input SiLU(time embedding) -> 6 x dim (shift/scale/gate, video+text)
  attn1.to_q, to_k, to_v    joint self-attention over [text; video] tokens (no cross-attention in CogVideoX)
  attn1.to_out.0
  norm2.linear              AdaLN modulation, input SiLU(time embedding)
  ff.net.0.proj             FFN up (GELU-tanh), over [text; video] tokens
  ff.net.2                  FFN down
Outside the blocks: patch_embed.text_proj (T5 states -> dim), time_embedding.linear_1 / linear_2 (timestep MLP),
norm_out.linear (final AdaLN modulation), proj_out. The video patch embedding `patch_embed.proj` is a Conv2d.
Modulation Linears (input = time embedding, one row per sample, not tokens): `norm1.linear`, `norm2.linear`
in every block and `norm_out.linear` outside.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    LTXPipeline,
)

from vidquant.models.tiny import (
    CORPUS,
    HEAVY_GAIN,
    SPIKE_GAIN,
    SPIKE_RATE,
    TIME_RAMP_GAIN,
    TIME_RAMP_MAX,
    VALUE_GAIN,
    t5_pipeline,
)

logger = logging.getLogger(__name__)

TINY_PROTOCOL: dict[str, int] = {"height": 32, "width": 32, "frames": 9}
MIN_PROTOCOL: dict[str, int] = {"height": 8, "width": 8, "frames": 1}  # the smallest call that generates
SPATIAL_MULTIPLE = 8  # height/width: VAE compression 4 x patch 2
FRAME_STEP = 4  # num_frames = 4k + 1
LATENT_CHANNELS = 16
SPATIAL_COMPRESSION = 4
TEXT_LENGTH = 226  # CogVideoX pads every prompt to this (`max_sequence_length`)
# Token-spike calibration run (see `plant_token_spikes`).
REFERENCE_PROMPTS = 8
REFERENCE_STEPS = 4
REFERENCE_GUIDANCE = 3.5

# Linear names of the transformer (module docstring): inside `transformer_blocks.{i}`, token inputs and
# modulation (input: time embedding) separately; then those outside the blocks.
BLOCK_TOKEN_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
BLOCK_MODULATION_LINEARS = ("norm1.linear", "norm2.linear")
OUTSIDE_MODULATION_LINEARS = ("norm_out.linear",)  # a subset of OUTSIDE_LINEARS
OUTSIDE_LINEARS = (
    "patch_embed.text_proj", "time_embedding.linear_1", "time_embedding.linear_2", "norm_out.linear", "proj_out",
)  # fmt: skip

TINY_TRANSFORMER: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,  # 32 wide; head dim 16 splits into 4 + 6 + 6 rotary channels (t, h, w)
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "time_embed_dim": 32,
    "text_embed_dim": 32,
    "num_layers": 2,
    # The rotary crop grid is computed relative to these (latent pixels / pixel frames, as in the real config).
    "sample_height": TINY_PROTOCOL["height"] // SPATIAL_COMPRESSION,
    "sample_width": TINY_PROTOCOL["width"] // SPATIAL_COMPRESSION,
    "sample_frames": TINY_PROTOCOL["frames"],
    "patch_size": 2,
    "temporal_compression_ratio": FRAME_STEP,
    "max_text_seq_length": TEXT_LENGTH,
    "use_rotary_positional_embeddings": True,  # CogVideoX-5B; the 2B model uses sincos positions instead
}
TINY_VAE: dict[str, Any] = {
    "down_block_types": ("CogVideoXDownBlock3D",) * 3,  # 3 blocks: the fewest that keep temporal compression 4
    "up_block_types": ("CogVideoXUpBlock3D",) * 3,
    "block_out_channels": (8, 8, 8),
    "latent_channels": LATENT_CHANNELS,
    "layers_per_block": 1,
    "norm_num_groups": 2,
    "temporal_compression_ratio": FRAME_STEP,
    "scaling_factor": 0.7,  # CogVideoX-5B
}
# scheduler_config.json of THUDM/CogVideoX-5b (the class defaults are epsilon / "leading" / no zero-SNR).
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
    "snr_shift_scale": 1.0,
}


def build_tiny_cogvideox_pipeline(outliers: bool = True, seed: int = 0) -> CogVideoXPipeline:
    """A CogVideoX-5B-style T2V pipeline, 32 wide with 2 blocks, float32, on CPU; same seed, same weights.

    With `outliers`, the transformer's block-Linear inputs get heavy channels, a timestep-dependent scale and
    rare token spikes (see `plant_outliers`), so activation-aware quantization has something to do.
    """
    pipe, generator = t5_pipeline(CogVideoXPipeline, lambda: AutoencoderKLCogVideoX(**TINY_VAE),
                                  lambda: CogVideoXTransformer3DModel(**TINY_TRANSFORMER),
                                  CogVideoXDPMScheduler(**SCHEDULER), seed)
    if outliers:
        plant_outliers(pipe, generator)
    return pipe


@torch.no_grad()
def plant_outliers(pipe: CogVideoXPipeline, generator: torch.Generator) -> None:
    """Edit the random transformer so its block-Linear inputs look like a real DiT's (cf. `tiny.plant_outliers`).

    `tiny.plant_outliers` is Wan-specific (`blocks`, `scale_shift_table`, `condition_embedder`, `ffn`); this is
    the same recipe with the same gains on CogVideoX's layout, where the modulation is a per-block Linear.

    1. Heavy channels `H` (max(2, dim/256), the same in every block): `HEAVY_GAIN` added to the bias of the
       video and text modulation *scale* rows of `norm1.linear` -> attn1 q/k/v inputs, and of `norm2.linear`
       -> ff.net.0.proj input. A few value channels per block are multiplied by `VALUE_GAIN` in to_v and
       divided by it in to_out's columns (function-preserving) -> heavy attn1.to_out.0 input channels.
    2. Timestep ramp: one time-embedding channel becomes SiLU(TIME_RAMP_MAX * t / 1000) (from the slowest
       sinusoid channel) and feeds the attention modulation scales, heavy channels more: attn1 q/k/v inputs
       shrink as denoising proceeds (the median channel range ~2.5x from t=999 to t=249).
    3. Rare token spikes (`plant_token_spikes`): one FFN hidden unit per block fires on ~`SPIKE_RATE` of the
       tokens -> a huge max/p99 in that channel of ff.net.2's input.
    """
    heavy = _plant_static_outliers(pipe.transformer, generator)
    plant_token_spikes(pipe, generator, heavy, SPIKE_RATE, TINY_PROTOCOL)


def _pick(generator: torch.Generator, count: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=generator, device=generator.device)[:count]


def _plant_static_outliers(model: CogVideoXTransformer3DModel, generator: torch.Generator) -> torch.Tensor:
    """Heavy channels and the timestep ramp (items 1 and 2 of `plant_outliers`); returns `H`."""
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    heavy = _pick(generator, max(2, dim // 256), dim)
    scale_rows = (1, 4)  # chunks of norm{1,2}.linear: shift, scale, gate, enc_shift, enc_scale, enc_gate
    for block in model.transformer_blocks:
        for norm in (block.norm1, block.norm2):
            for chunk in scale_rows:
                norm.linear.bias[chunk * dim + heavy] += HEAVY_GAIN
        values = _pick(generator, len(heavy), dim)
        block.attn1.to_v.weight[values] *= VALUE_GAIN
        block.attn1.to_v.bias[values] *= VALUE_GAIN
        block.attn1.to_out[0].weight[:, values] /= VALUE_GAIN

    freq_dim = dim  # `time_proj` has as many channels as the inner dim: [cos, sin], the last one the slowest sin
    slowest = math.exp(-math.log(10000.0) * (freq_dim // 2 - 1) / (freq_dim // 2))
    embedding = model.time_embedding
    ramp = int(_pick(generator, 1, embedding.linear_1.out_features))
    embedding.linear_1.weight[ramp] = 0
    embedding.linear_1.weight[ramp, freq_dim - 1] = TIME_RAMP_MAX / (1000 * slowest)
    embedding.linear_1.bias[ramp] = 0
    embedding.linear_2.weight[ramp] = 0
    embedding.linear_2.weight[:, ramp] = 0
    embedding.linear_2.weight[ramp, ramp] = 1
    embedding.linear_2.bias[ramp] = 0
    gain = torch.full((dim,), TIME_RAMP_GAIN)
    gain[heavy] *= 1 + HEAVY_GAIN
    for block in model.transformer_blocks:
        for chunk in scale_rows:
            block.norm1.linear.weight[chunk * dim : (chunk + 1) * dim, ramp] = gain
    return heavy


@torch.no_grad()
def plant_token_spikes(
    pipe: CogVideoXPipeline | LTXPipeline, generator: torch.Generator, heavy: torch.Tensor, rate: float,
    protocol: dict[str, int],
) -> None:  # fmt: skip
    """Make one FFN hidden unit per block a threshold unit that fires on ~`rate` of the tokens.

    For any pipeline whose transformer has `transformer_blocks[i].ff.net[0].proj` (diffusers' `FeedForward`).
    The unit reads a random direction of the FFN input (outside the heavy channels `heavy`); its threshold is
    the (1 - rate) quantile of that projection over the pipeline's own trajectory: `REFERENCE_PROMPTS` prompts
    of `CORPUS` against its negative prompt, with CFG, `REFERENCE_STEPS` steps at `protocol`. Calibrating on the
    trajectory rather than on noise at fixed timesteps (as `tiny.py` does) matters here: the FFN inputs drift
    with the timestep and the denoised latents, and at a few dozen video tokens per sample a threshold set on
    noise hardly ever fires. The slope is `SPIKE_GAIN` per standard deviation of the projection.
    """
    blocks = pipe.transformer.transformer_blocks
    dim = blocks[0].ff.net[0].proj.in_features
    directions = []
    for _ in blocks:
        direction = torch.randn(dim, generator=generator)
        direction[heavy] = 0
        directions.append(direction / direction.norm())
    projections: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [
        block.ff.net[0].proj.register_forward_pre_hook(
            lambda _m, args, d=direction, out=out: out.append((args[0].float() @ d).flatten())
        )
        for block, direction, out in zip(blocks, directions, projections, strict=True)
    ]
    progress = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe(
            prompt=list(CORPUS[:REFERENCE_PROMPTS]),
            negative_prompt=[CORPUS[-1]] * REFERENCE_PROMPTS,
            height=protocol["height"],
            width=protocol["width"],
            num_frames=protocol["frames"],
            num_inference_steps=REFERENCE_STEPS,
            guidance_scale=REFERENCE_GUIDANCE,
            generator=torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator))),
            output_type="latent",
        )
    finally:
        pipe._progress_bar_config = progress
        for hook in hooks:
            hook.remove()
    for block, direction, chunks in zip(blocks, directions, projections, strict=True):
        projection = torch.cat(chunks)
        slope = SPIKE_GAIN / float(projection.std())
        up = block.ff.net[0].proj
        unit = _pick(generator, 1, up.out_features)
        up.weight[unit] = slope * direction
        up.bias[unit] = -slope * float(torch.quantile(projection, 1 - rate))
        logger.debug("spike unit %d: threshold from %d token projections", int(unit), projection.numel())
