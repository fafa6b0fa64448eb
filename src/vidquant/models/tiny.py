"""Offline Wan2.2-architecture pipelines with deterministic random weights, for tests, the demo and benchmarks.

Every component is a real diffusers/transformers class built from a config (no download ever): experts
of `WanTransformer3DModel`, an `AutoencoderKLWan`, the flow-matching `UniPCMultistepScheduler` Wan uses,
a `UMT5EncoderModel` and a tokenizer trained here on a small built-in English corpus. So they go through
`save_pretrained` / `load_pipeline` exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from vidquant.models.wan import WanPipelineLike, empty_expert

BOUNDARY_RATIO = {False: 0.875, True: 0.9}  # Wan2.2 A14B: T2V, I2V
FLOW_SHIFT = 3.0  # diffusers' Wan default; with it a 2-step run already visits both experts
LATENT_CHANNELS = 16
I2V_CHANNELS = 2 * LATENT_CHANNELS + 4  # noise latents + conditioning latents + 4 frame-mask channels

TINY_EXPERT: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,  # 32 wide: one 32-element block for MX formats, two 16-groups for NVFP4
    "out_channels": LATENT_CHANNELS,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
MEDIUM_EXPERT: dict[str, Any] = {  # Wan2.2-A14B block shapes
    **TINY_EXPERT,
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "text_dim": 4096,
    "ffn_dim": 13824,
}
TINY_TEXT: dict[str, Any] = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
MEDIUM_TEXT: dict[str, Any] = {"d_model": 4096, "d_kv": 64, "d_ff": 256, "num_layers": 1, "num_heads": 4}

CORPUS = (
    "A red car drives down a wet city street at night, neon signs reflecting in the puddles.",
    "A golden retriever runs across a green meadow and jumps to catch a yellow ball.",
    "Close-up of a cup of coffee on a wooden table, steam rising slowly in the morning light.",
    "A woman in a blue dress walks along the beach at sunset while waves roll onto the sand.",
    "Aerial view of snowy mountains and a frozen lake under a clear sky, the camera slowly pans left.",
    "A small boat sails across a calm sea; seagulls fly overhead and the water sparkles.",
    "Two children play with a kite in a park on a windy autumn afternoon, leaves falling around them.",
    "A chef slices fresh vegetables in a busy restaurant kitchen, flames flaring from the stove.",
    "Timelapse of clouds moving over a desert canyon as shadows sweep across the red rocks.",
    "An old man reads a newspaper on a bench while pigeons peck at crumbs near his feet.",
    "A white cat wearing sunglasses sits on a surfboard and gazes at the camera.",
    "A train crosses a stone bridge over a river in a green valley, smoke trailing behind it.",
    "Rain falls on a quiet street with colorful umbrellas moving past lit shop windows.",
    "A dancer spins on a stage under bright spotlights, her skirt flowing in slow motion.",
    "A forest path in spring with sunlight filtering through tall trees and birds singing.",
    "Macro shot of a bee landing on a purple flower, pollen clinging to its legs.",
    "A cyclist rides through a busy market full of fruit stalls, people and bright awnings.",
    "Fireworks burst over a harbor at midnight, reflected in the dark water below.",
    "A robot walks through an empty warehouse, its lights blinking in the dim hallway.",
    "Waves crash against a lighthouse during a storm while lightning flashes in the distance.",
    "A horse gallops across an open field, dust rising behind it in the warm evening glow.",
    "A person types on a laptop in a cozy room with plants, books and a sleeping dog.",
    "Hot air balloons rise slowly over a valley at dawn, the camera tracking upward.",
    "An astronaut floats inside a space station and waves at the camera, Earth visible outside.",
    "A jazz band plays in a small club; the drummer smiles and the singer leans into the microphone.",
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality, "
    "JPEG artifacts, ugly, deformed, extra fingers, poorly drawn hands, messy background, walking backwards.",
)

# Planted outliers (see `plant_outliers`); gains are relative to the near-unit activations of a random model.
HEAVY_GAIN = 20.0
VALUE_GAIN = 16.0
SPIKE_GAIN = 30.0
SPIKE_RATE = 0.003
TIME_RAMP_MAX = 4.0
TIME_RAMP_GAIN = 0.5
REFERENCE_TIMESTEPS = (999.0, 750.0, 500.0, 250.0, 1.0)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """A small SentencePiece-style BPE (Metaspace, `</s>` appended like T5) trained on `CORPUS`.

    Every printable ASCII character is in the alphabet, so any English prompt tokenizes without `<unk>`.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "</s>", "<unk>"],  # ids 0, 1, 2 as in T5
        initial_alphabet=[*string.printable.strip(), "\u2581"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tokenizer.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The offline tokenizer as a transformers fast tokenizer (pipeline save/load round-trips it)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def build_tiny_pipeline(
    *, i2v: bool = False, two_experts: bool = True, outliers: bool = True, seed: int = 0
) -> WanPipelineLike:
    """A Wan2.2-A14B-style T2V or I2V pipeline, 32 wide with 2 blocks per expert, float32, on CPU.

    Two experts routed at `boundary_ratio` (0.875 T2V, 0.9 I2V) or, with `two_experts=False`, one expert
    and no boundary (Wan2.1 style); I2V has no image encoder, as in Wan2.2. Same arguments, same weights.
    """
    return _build(TINY_EXPERT, TINY_TEXT, i2v, two_experts, outliers, seed, torch.float32, "cpu")


def build_medium_pipeline(
    *,
    num_layers: int = 1,
    i2v: bool = False,
    two_experts: bool = True,
    outliers: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> WanPipelineLike:
    """Like the tiny pipeline but with full-width A14B blocks (5120 = 40 x 128, FFN 13824, text 4096).

    For memory and speed benchmarks: weights are drawn directly in `dtype` on `device` (so they depend
    on the device's RNG); one block per expert builds in about 10 s on one CPU core, far less on a GPU.
    `outliers` is off by default here: calibrating the token spikes runs the experts on a reference batch,
    which takes over a minute in bfloat16 on a CPU without bf16 matmul units (instant on a GPU).
    """
    expert = {**MEDIUM_EXPERT, "num_layers": num_layers}
    return _build(expert, MEDIUM_TEXT, i2v, two_experts, outliers, seed, dtype, device)


def _build(
    expert_config: dict[str, Any],
    text_config: dict[str, Any],
    i2v: bool,
    two_experts: bool,
    outliers: bool,
    seed: int,
    dtype: torch.dtype,
    device: str,
    image_components: Callable[[], dict[str, Any]] | None = None,
    planter: Callable[[nn.Module, torch.Generator], None] | None = None,
) -> WanPipelineLike:
    """The pipeline; ``image_components`` draws Wan2.1-I2V's CLIP encoder and processor after the VAE, and
    ``planter`` (default `plant_outliers`) edits each expert when ``outliers`` is set."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), **text_config)  # pad 0 and eos 1 by default, as trained
        )
        vae = AutoencoderKLWan(
            base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )  # fmt: skip
        image = image_components() if i2v and image_components is not None else {}
    config = {**expert_config, "in_channels": I2V_CHANNELS if i2v else LATENT_CHANNELS}
    experts = {}
    for index, name in enumerate(("transformer", "transformer_2") if two_experts else ("transformer",)):
        generator = torch.Generator(device).manual_seed(seed * 1000 + index)
        expert = empty_expert(config, dtype, device)
        init_weights(expert, generator)
        if outliers:
            (planter or plant_outliers)(expert, generator)
        experts[name] = expert
    components: dict[str, Any] = {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.to(device, dtype).eval(),
        "vae": vae.to(device).eval(),
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT
        ),
        "transformer": experts["transformer"],
        "transformer_2": experts.get("transformer_2"),
        "boundary_ratio": BOUNDARY_RATIO[i2v] if two_experts else None,
    }
    if i2v:
        image = {"image_encoder": None, "image_processor": None, **image}
        if image["image_encoder"] is not None:
            image["image_encoder"] = image["image_encoder"].to(device, dtype).eval()
        return WanImageToVideoPipeline(**components, **image)
    return WanPipeline(**components)


T5_TEXT: dict[str, Any] = {  # a T5 v1.1 encoder (gated GELU), as the T5-XXL of CogVideoX and LTX-Video
    "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
}


def t5_pipeline(pipeline_cls: type, vae: Callable[[], nn.Module], transformer: Callable[[], nn.Module],
                scheduler: Any, seed: int) -> tuple[Any, torch.Generator]:
    """A T5-conditioned diffusers video pipeline of deterministic random weights (the tiny CogVideoX and LTX).

    Text encoder, VAE and transformer are drawn in that order from ``seed`` (the global RNG is left as it was),
    then the transformer is re-initialized from the returned generator, which the caller's outlier planting
    continues.
    """
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **T5_TEXT))  # pad 0, eos 1 as trained
        vae_model = vae()
        transformer_model = transformer()  # default init drawn here, then replaced
    generator = torch.Generator("cpu").manual_seed(seed)
    init_weights(transformer_model, generator)
    pipe = pipeline_cls(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae_model.eval(),
                        transformer=transformer_model.eval(), scheduler=scheduler)
    return pipe, generator


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch-default-like init drawn from one seeded generator, tensor by tensor, in the storage dtype.

    Linear/conv weights and biases ~ N(0, 1/(3 fan_in)) (the variance of PyTorch's default uniform),
    norm affines 1/0, modulation tables N(0, 1/dim) as diffusers does; every tensor is checked covered.
    """
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Conv3d):  # Conv2d: CogVideoX's patch embedding
            std = (3 * module.weight[0].numel()) ** -0.5
            for param in (module.weight, module.bias):
                if param is not None:
                    param.normal_(0.0, std, generator=generator)
                    done.add(id(param))
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
            for param, value in ((module.weight, 1.0), (getattr(module, "bias", None), 0.0)):
                if param is not None:
                    param.fill_(value)
                    done.add(id(param))
    for name, param in model.named_parameters():
        if name.endswith("scale_shift_table"):
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
            done.add(id(param))
    if missed := [name for name, param in model.named_parameters() if id(param) not in done]:
        raise RuntimeError(f"no initializer for {missed}")


@torch.no_grad()
def plant_outliers(model: nn.Module, generator: torch.Generator) -> None:
    """Edit a random expert so its block-Linear inputs look like a real DiT's rather than near-Gaussian.

    Deterministic given `generator`; all gains are module constants. What is planted, and where it shows:

    1. Heavy input channels. A few residual channels `H` (max(2, dim/256), the same in every block, as
       massive channels are in real DiTs) get `HEAVY_GAIN` on the modulation scale of `scale_shift_table`
       (self-attention and FFN chunks) -> attn1 q/k/v and FFN-up inputs; on the `norm2` affine weight ->
       attn2 q input; on the text embedder's output rows -> attn2 k/v inputs (the text context). Per block,
       a few value channels are multiplied by `VALUE_GAIN` in to_v and divided by it in to_out's columns
       (function-preserving, like an inverse SmoothQuant) -> heavy attn1/attn2 to_out input channels.
    2. Timestep-dependent scale. The slowest sinusoidal time channel is ~linear in t (sin(t * 1.07e-4));
       one time-embedding channel is made a clean ramp of it, SiLU(TIME_RAMP_MAX * t / 1000), and fed into
       the self-attention modulation scale in proportion to each channel's planted scale: attn1 q/k/v
       inputs grow ~3x from t=0 to t=1000, heavy channels included, as activation ranges drift over
       Wan's denoising trajectory.
    3. Rare token spikes. One FFN hidden unit per block becomes a threshold unit on a random direction of
       the FFN input (outside `H`): its threshold is the (1 - SPIKE_RATE) quantile of that projection over
       a reference batch of random latents at `REFERENCE_TIMESTEPS`, its slope `SPIKE_GAIN` per standard
       deviation. About 0.3 % of tokens (content dependent) then carry 10-100x the other FFN-down inputs in
       that channel, which stays near zero otherwise: a huge max / p99 ratio in ffn.net.2's input, and
       spiky tokens in the residual stream after it.
    """
    heavy = _plant_static_outliers(model, generator)
    _plant_token_spikes(model, generator, heavy)


def _pick(generator: torch.Generator, count: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=generator, device=generator.device)[:count]


def _plant_static_outliers(model: nn.Module, generator: torch.Generator) -> torch.Tensor:
    """Heavy channels and the timestep ramp (items 1 and 2 of `plant_outliers`); returns `H`."""
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    count = max(2, dim // 256)
    heavy = _pick(generator, count, dim)
    embedder = model.condition_embedder
    embedder.text_embedder.linear_2.weight[heavy] *= HEAVY_GAIN
    embedder.text_embedder.linear_2.bias[heavy] *= HEAVY_GAIN
    for block in model.blocks:
        block.scale_shift_table[0, 1, heavy] += HEAVY_GAIN  # self-attention scale
        block.scale_shift_table[0, 4, heavy] += HEAVY_GAIN  # FFN scale
        block.norm2.weight[heavy] = HEAVY_GAIN
        for attn in (block.attn1, block.attn2):
            values = _pick(generator, count, dim)
            attn.to_v.weight[values] *= VALUE_GAIN
            attn.to_v.bias[values] *= VALUE_GAIN
            attn.to_out[0].weight[:, values] /= VALUE_GAIN

    freq_dim = model.config.freq_dim
    slowest = math.exp(-math.log(10000.0) * (freq_dim // 2 - 1) / (freq_dim // 2))  # last (sin) channel
    time_embedder = embedder.time_embedder
    ramp = int(_pick(generator, 1, dim))
    time_embedder.linear_1.weight[ramp] = 0
    time_embedder.linear_1.weight[ramp, freq_dim - 1] = TIME_RAMP_MAX / (1000 * slowest)
    time_embedder.linear_1.bias[ramp] = 0
    time_embedder.linear_2.weight[ramp] = 0
    time_embedder.linear_2.weight[:, ramp] = 0
    time_embedder.linear_2.weight[ramp, ramp] = 1
    time_embedder.linear_2.bias[ramp] = 0
    gain = torch.full((dim,), TIME_RAMP_GAIN, device=heavy.device)
    gain[heavy] *= 1 + HEAVY_GAIN
    embedder.time_proj.weight[dim : 2 * dim, ramp] = gain.to(embedder.time_proj.weight.dtype)
    return heavy


def _plant_token_spikes(model: nn.Module, generator: torch.Generator, heavy: torch.Tensor) -> None:
    """FFN threshold units calibrated on a reference batch (item 3 of `plant_outliers`)."""
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    device, dtype = model.proj_out.weight.device, model.proj_out.weight.dtype
    directions = []
    for _ in model.blocks:
        direction = torch.randn(dim, generator=generator, device=device)
        direction[heavy] = 0
        directions.append(direction / direction.norm())
    projections: list[torch.Tensor] = []
    hooks = [
        block.ffn.net[0].proj.register_forward_pre_hook(
            lambda _m, args, d=direction: projections.append((args[0].float() @ d).flatten())
        )
        for block, direction in zip(model.blocks, directions, strict=True)
    ]
    batch = len(REFERENCE_TIMESTEPS)
    try:
        model(
            hidden_states=torch.randn(batch, cfg.in_channels, 2, 16, 16, generator=generator, device=device).to(dtype),
            timestep=torch.tensor(REFERENCE_TIMESTEPS, device=device),
            encoder_hidden_states=torch.randn(batch, 16, cfg.text_dim, generator=generator, device=device).to(dtype),
            return_dict=False,
        )
    finally:
        for hook in hooks:
            hook.remove()
    for block, direction, projection in zip(model.blocks, directions, projections, strict=True):
        slope = SPIKE_GAIN / float(projection.std())
        up = block.ffn.net[0].proj
        unit = _pick(generator, 1, up.out_features)
        up.weight[unit] = (slope * direction).to(up.weight.dtype)
        up.bias[unit] = -slope * float(torch.quantile(projection, 1 - SPIKE_RATE))
