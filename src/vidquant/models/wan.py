"""Wan2.1/Wan2.2 adapters: loading, experts, timestep routing, layer roles and fingerprints.

This is the only module that knows how diffusers lays out Wan; everything else works on the names and
modules it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from PIL import Image
from torch import nn

from vidquant.checksum import hash_tensor

logger = logging.getLogger(__name__)

WanPipelineLike = WanPipeline | WanImageToVideoPipeline
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "WanPipeline": WanPipeline,
    "WanImageToVideoPipeline": WanImageToVideoPipeline,
}
EXPERT_NAMES = ("transformer", "transformer_2")
TEXT_CONTEXT_LENGTH = 512  # Wan's text length; diffusers' Wan2.1-I2V attention processor hard-codes it
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

def load_pipeline(
    model: str | Path,
    *,
    i2v: bool | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
) -> WanPipelineLike:
    """Load a Wan T2V or I2V pipeline from a local diffusers folder (offline) or a hub id.

    `dtype` defaults to bfloat16 on CUDA and float32 on CPU; the VAE stays float32, as diffusers recommends
    for Wan, so it is the same in the reference and the quantized runs. `i2v`, when given, must match.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtypes = {"default": dtype, "vae": torch.float32}
    path = Path(model).expanduser()
    if not path.exists() and _HUB_ID.match(str(model)):
        pipe = DiffusionPipeline.from_pretrained(str(model), dtype=dtypes)
        _check_kind(str(model), type(pipe).__name__, i2v)
    else:
        cls = PIPELINE_CLASSES[_check_kind(str(path), _saved_class_name(path), i2v)]
        pipe = cls.from_pretrained(path, dtype=dtypes, local_files_only=True)
        logger.info("loaded %s from %s (%s on %s)", cls.__name__, path, dtype, device)
    pipe = pipe.to(device)
    if torch.device(device).type == "cpu":
        _copy_out_of_mmap(pipe)
    return pipe


def _copy_out_of_mmap(pipe: DiffusionPipeline) -> None:
    """Give every CPU weight its own aligned memory.

    Weights loaded on the CPU stay memory-mapped at their offset in the safetensors file; misaligned
    tensors take other BLAS kernels, which round differently, so results would depend on the file layout
    (seen here: 6e-7 differences between a model and its save/load round trip). A copy fixes that.
    """
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                tensor.data = tensor.data.clone()


def _saved_class_name(path: Path) -> str:
    """The pipeline class recorded by `save_pretrained`, with an error that says what is missing."""
    if not path.exists():
        raise ValueError(f"{path}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{path}: no model_index.json, so not a pipeline saved by diffusers")
    try:
        return str(json.loads(index_file.read_text())["_class_name"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_file}: unreadable or without `_class_name` ({err})") from err


def _check_kind(where: str, class_name: str, i2v: bool | None) -> str:
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"{where}: holds a {class_name}, not a Wan pipeline ({' or '.join(PIPELINE_CLASSES)})")
    is_i2v = class_name == "WanImageToVideoPipeline"
    if i2v is not None and i2v != is_i2v:
        kind = "image-to-video" if is_i2v else "text-to-video"
        raise ValueError(f"{where}: holds a {kind} {class_name}, but i2v={i2v} was asked for")
    return class_name


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


def bin_edges(lo: float, hi: float, bins: int) -> list[float]:
    """Edges of ``bins`` equal timestep bins over an expert's share [lo, hi] of the schedule."""
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


def expert_bin_edges(pipe: DiffusionPipeline, bins: int) -> dict[str, list[float]]:
    """Per expert, the edges of ``bins`` equal timestep bins over the share of the schedule it denoises."""
    boundary = boundary_timestep(pipe)
    top = float(pipe.scheduler.config.num_train_timesteps)
    edges = {}
    for name in experts(pipe):
        lo, hi = (0.0, top) if boundary is None else ((boundary, top) if name == "transformer" else (0.0, boundary))
        edges[name] = bin_edges(lo, hi, bins)
    return edges


def timestep_bin(t: float, edges: list[float]) -> int:
    """Index of the bin of ``edges`` holding timestep ``t`` (the ends are closed)."""
    for i in range(len(edges) - 2, -1, -1):
        if t >= edges[i]:
            return i
    return 0


def call_timestep(args: tuple, kwargs: dict) -> float:
    """The timestep of an expert's forward call (its first element: Wan2.2 TI2V passes one per token)."""
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if timestep is None:
        raise ValueError("a Wan expert was called without a timestep")
    return float(torch.as_tensor(timestep).flatten()[0])


def publish_timestep_bins(pipe: DiffusionPipeline, edges: dict[str, list[float]]) -> None:
    """Before every expert call, set ``timestep_bin`` on the expert's modules that have one (`QuantLinear`).

    Per-timestep-bin parameters (the SVDQuant-GPTQ recipe's activation clip ratios) follow the denoising
    step this way. Calling it again replaces the hook instead of adding a second one.
    """
    for name, model in experts(pipe).items():
        old = getattr(model, "_vidquant_timestep_hook", None)
        if old is not None:
            old.remove()
            del model._vidquant_timestep_hook
        if name not in edges:
            continue
        users = [m for m in model.modules() if hasattr(m, "timestep_bin")]
        if not users:
            continue

        def hook(_module: nn.Module, args: tuple, kwargs: dict, users=users, expert_edges=edges[name]) -> None:
            b = timestep_bin(call_timestep(args, kwargs), expert_edges)
            for m in users:
                m.timestep_bin = b

        model._vidquant_timestep_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


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


def config_fingerprint(pipe: DiffusionPipeline) -> str:
    """sha256 of what the weights do not say: pipeline class, routing boundary and the expert configs.

    Volatile config keys (`_name_or_path`, versions) are left out, so a save/load round trip keeps it.
    """
    header = {
        "pipeline": type(pipe).__name__,
        "boundary_ratio": pipe.config.get("boundary_ratio"),
        "experts": {
            name: {k: v for k, v in model.config.items() if not k.startswith("_")}
            for name, model in experts(pipe).items()
        },
    }
    return hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(pipe: DiffusionPipeline) -> str:
    """sha256 of `config_fingerprint` and every expert tensor (name, shape, dtype, bytes), one at a time."""
    digest = hashlib.sha256(config_fingerprint(pipe).encode())
    for name, model in experts(pipe).items():
        for key, tensor in sorted(model.state_dict().items()):
            digest.update(f"\n{name}.{key}".encode())
            hash_tensor(digest, tensor)
    return digest.hexdigest()
