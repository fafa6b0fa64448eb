"""The offline CogVideoX and LTX-Video builders: save/load round trip, generation, determinism, planted outliers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline, DiffusionPipeline, LTXPipeline
from torch import nn

from vidquant.models import tiny_cogvideox, tiny_ltx
from vidquant.models.tiny import CORPUS


@dataclass(frozen=True)
class Kind:
    module: ModuleType
    build: Callable[..., DiffusionPipeline]
    pipeline_class: type[DiffusionPipeline]
    first_timestep: int | float  # what the transformer receives at step 0 (2 steps)
    timestep_dtype: torch.dtype


KINDS = {
    "cogvideox": Kind(
        tiny_cogvideox, tiny_cogvideox.build_tiny_cogvideox_pipeline, CogVideoXPipeline, 999, torch.int64
    ),
    "ltx": Kind(tiny_ltx, tiny_ltx.build_tiny_ltx_pipeline, LTXPipeline, 1000.0, torch.float32),
}


def _call(kind: Kind, steps: int = 2, **overrides: Any) -> dict[str, Any]:
    protocol = kind.module.TINY_PROTOCOL
    return {
        "prompt": "a red car drives down a wet street at night",
        "negative_prompt": "blurry, low quality",
        "height": protocol["height"],
        "width": protocol["width"],
        "num_frames": protocol["frames"],
        "num_inference_steps": steps,
        "guidance_scale": 3.5,
        "generator": torch.Generator("cpu").manual_seed(0),
        "output_type": "np",
        **overrides,
    }


def _build(kind: Kind, **kwargs: Any) -> DiffusionPipeline:
    pipe = kind.build(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", KINDS)
def test_round_trip_generates_deterministically_with_one_cfg_call(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    kind.build().save_pretrained(tmp_path)
    pipe = kind.pipeline_class.from_pretrained(tmp_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    calls: list[dict[str, Any]] = []
    pipe.transformer.register_forward_pre_hook(lambda _m, _args, kwargs: calls.append(kwargs), with_kwargs=True)
    steps: list[int] = []

    def on_step_end(_pipe: DiffusionPipeline, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        assert torch.isfinite(tensors["latents"]).all()
        steps.append(step)
        return tensors

    call = _call(kind, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    videos = [pipe(**{**call, "generator": torch.Generator("cpu").manual_seed(0)}).frames[0] for _ in range(2)]

    protocol = kind.module.TINY_PROTOCOL
    assert videos[0].shape == (protocol["frames"], protocol["height"], protocol["width"], 3)
    assert np.isfinite(videos[0]).all()
    np.testing.assert_array_equal(videos[0], videos[1])
    assert steps == [0, 1, 0, 1]
    # CFG: one transformer call per step on [uncond; cond]; batch index 1 is the prompt.
    assert len(calls) == 4
    first = calls[0]
    assert first["timestep"].dtype == kind.timestep_dtype
    assert first["timestep"].tolist() == [kind.first_timestep] * 2
    cond = pipe.encode_prompt(call["prompt"], do_classifier_free_guidance=False)[0]
    uncond = pipe.encode_prompt(call["negative_prompt"], do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(first["encoder_hidden_states"][1:], cond)
    torch.testing.assert_close(first["encoder_hidden_states"][:1], uncond)


@pytest.mark.parametrize("name", KINDS)
def test_smallest_grid_generates(name: str) -> None:
    kind = KINDS[name]
    smallest = kind.module.MIN_PROTOCOL
    pipe = _build(kind, outliers=False)
    call = _call(kind, height=smallest["height"], width=smallest["width"], num_frames=smallest["frames"])
    video = pipe(**call).frames[0]
    assert video.shape == (1, smallest["height"], smallest["width"], 3)
    assert np.isfinite(video).all()


@pytest.mark.parametrize("name", KINDS)
def test_builds_are_deterministic(name: str) -> None:
    kind = KINDS[name]
    first, second, other = kind.build(), kind.build(), kind.build(seed=1)
    for component in ("transformer", "vae", "text_encoder"):
        a, b = getattr(first, component).state_dict(), getattr(second, component).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{component}.{key}")
    assert not torch.equal(first.transformer.proj_out.weight, other.transformer.proj_out.weight)
    assert type(first.scheduler).__name__ in {"CogVideoXDPMScheduler", "FlowMatchEulerDiscreteScheduler"}


@pytest.mark.parametrize("name", KINDS)
def test_linear_layout_matches_the_documented_split(name: str) -> None:
    module = KINDS[name].module
    model = KINDS[name].build(outliers=False).transformer
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    blocks = len(model.transformer_blocks)
    inside = {
        f"transformer_blocks.{i}.{suffix}"
        for i in range(blocks)
        for suffix in module.BLOCK_TOKEN_LINEARS + module.BLOCK_MODULATION_LINEARS
    }
    assert blocks == 2
    assert linears == inside | set(module.OUTSIDE_LINEARS)
    assert set(module.OUTSIDE_MODULATION_LINEARS) <= set(module.OUTSIDE_LINEARS)


def _block_input_stats(pipe: DiffusionPipeline, kind: Kind) -> dict[str, torch.Tensor]:
    """Inputs (tokens x channels) of block 0's to_q and FFN-down over a batch of corpus prompts."""
    inputs: dict[str, list[torch.Tensor]] = {"attn1.to_q": [], "ff.net.2": []}
    block = pipe.transformer.transformer_blocks[0]
    for suffix, store in inputs.items():
        block.get_submodule(suffix).register_forward_pre_hook(
            lambda _m, args, store=store: store.append(args[0].detach().flatten(0, -2))
        )
    prompts = list(CORPUS[:4])
    pipe(**_call(kind, steps=3, prompt=prompts, negative_prompt=[CORPUS[-1]] * 4, output_type="latent"))
    return {suffix: torch.cat(store).abs() for suffix, store in inputs.items()}


@pytest.mark.parametrize("name", KINDS)
def test_planted_outliers_reach_block_linear_inputs(name: str) -> None:
    kind = KINDS[name]
    planted = _block_input_stats(_build(kind, outliers=True), kind)
    plain = _block_input_stats(_build(kind, outliers=False), kind)

    def channel_ratio(x: torch.Tensor) -> float:  # heavy input channels: max channel range / median one
        ranges = x.amax(0)
        return float(ranges.max() / ranges.median())

    assert channel_ratio(planted["attn1.to_q"]) > 5 * channel_ratio(plain["attn1.to_q"])
    # Token spikes: in the planted FFN-down input, one channel is ~0 for almost every token and huge for a few.
    down = planted["ff.net.2"]
    p99 = down.quantile(0.99, dim=0)
    spiky = (down.amax(0) > 10 * p99.clamp_min(1e-3)) & (p99 < 0.1)
    assert spiky.any()
    rate = float((down[:, spiky] > 1).float().mean())
    assert 0 < rate < 0.05
    assert not ((plain["ff.net.2"].amax(0) > 10 * plain["ff.net.2"].quantile(0.99, dim=0).clamp_min(1e-3)).any())
