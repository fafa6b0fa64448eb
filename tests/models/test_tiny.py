from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline

from vidquant.models import adapter_for
from vidquant.models.tiny import build_medium_pipeline, build_tiny_pipeline, tiny_tokenizer
from vidquant.models.wan import experts, placeholder_image, target_linears

CALL = {
    "prompt": "a red car",
    "height": 16,
    "width": 16,
    "num_frames": 5,
    "num_inference_steps": 2,
    "guidance_scale": 3.5,
    "output_type": "np",
}


@pytest.mark.parametrize("i2v", [False, True])
def test_generation_is_deterministic(i2v: bool) -> None:
    """(Its speed is measured side by side in bench/models.py, never asserted here.)"""
    pipe = build_tiny_pipeline(i2v=i2v)
    pipe.set_progress_bar_config(disable=True)
    extra = {"image": placeholder_image(16, 16)} if i2v else {}
    videos = [pipe(**CALL, **extra, generator=torch.Generator().manual_seed(0)).frames for _ in range(3)]
    assert videos[0].shape == (1, 5, 16, 16, 3)
    assert np.isfinite(videos[0]).all()
    np.testing.assert_array_equal(videos[0], videos[2])


def test_configs_follow_wan22_a14b() -> None:
    t2v, i2v = build_tiny_pipeline(), build_tiny_pipeline(i2v=True)
    assert type(t2v) is WanPipeline
    assert type(i2v) is WanImageToVideoPipeline
    assert (t2v.config.boundary_ratio, i2v.config.boundary_ratio) == (0.875, 0.9)
    assert i2v.image_encoder is None  # Wan2.2 I2V conditions on VAE latents only
    assert t2v.transformer.config.in_channels == 16
    assert i2v.transformer.config.in_channels == 36
    assert t2v.scheduler.config.prediction_type == "flow_prediction"
    single = build_tiny_pipeline(two_experts=False)
    assert single.transformer_2 is None
    assert single.config.boundary_ratio is None


def test_builds_are_deterministic_and_experts_differ() -> None:
    pipe = build_tiny_pipeline()
    assert adapter_for(build_tiny_pipeline()).fingerprint() == adapter_for(pipe).fingerprint()
    assert adapter_for(build_tiny_pipeline(seed=3)).fingerprint() != adapter_for(pipe).fingerprint()
    first, second = experts(pipe).values()
    assert not torch.equal(first.blocks[0].attn1.to_q.weight, second.blocks[0].attn1.to_q.weight)
    rng_before = torch.random.get_rng_state()
    build_tiny_pipeline()
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is left alone


def test_tokenizer_covers_any_english_prompt() -> None:
    tokenizer = tiny_tokenizer()
    ids = tokenizer(string.printable.strip() + " a quokka juggles xylophones").input_ids
    assert tokenizer.unk_token_id not in ids
    assert ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.pad_token_id == 0
    padded = tokenizer("a red car", padding="max_length", max_length=12)
    assert padded.input_ids[-1] == 0
    assert sum(padded.attention_mask) < 12
    assert tokenizer.decode(tokenizer("a red car").input_ids, skip_special_tokens=True) == "a red car"


def _block_inputs(model: torch.nn.Module, t: float) -> dict[str, torch.Tensor]:
    """Inputs of every target Linear (tokens x channels) for fixed random latents at timestep t."""
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, model.config.in_channels, 4, 32, 32, generator=generator)  # 1024 tokens
    text = torch.randn(1, 20, model.config.text_dim, generator=generator)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0][0]))
        for name, module in target_linears(model).items()
    ]
    with torch.no_grad():
        model(hidden_states=latents, timestep=torch.tensor([t]), encoder_hidden_states=text, return_dict=False)
    for handle in handles:
        handle.remove()
    return seen


def _heavy_channel_ratio(x: torch.Tensor) -> float:
    """Largest per-channel absmax over the median per-channel absmax."""
    channel_max = x.abs().amax(0)
    return float(channel_max.max() / channel_max.median())


def _spike_ratio(x: torch.Tensor) -> float:
    """Largest over channels of max / 99th percentile of |x| across tokens."""
    a = x.abs()
    return float((a.amax(0) / torch.quantile(a, 0.99, dim=0).clamp_min(1e-3)).max())


@pytest.mark.parametrize("i2v", [False, True])
def test_outliers_show_in_block_inputs(i2v: bool) -> None:
    for outliers in (True, False):
        for model in experts(build_tiny_pipeline(i2v=i2v, outliers=outliers)).values():
            high, low = _block_inputs(model, 999.0), _block_inputs(model, 1.0)
            heavy = [
                _heavy_channel_ratio(high[f"blocks.0.{name}"])
                for name in ("attn1.to_q", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "ffn.net.0.proj")
            ]
            spikes = max(
                _spike_ratio(inputs[f"blocks.{i}.ffn.net.2"])
                for inputs in (high, low, _block_inputs(model, 500.0))
                for i in range(len(model.blocks))
            )
            drift = float(high["blocks.0.attn1.to_q"].abs().max() / low["blocks.0.attn1.to_q"].abs().max())
            if outliers:
                assert min(heavy) > 5, heavy
                assert spikes > 100
                assert drift > 2
            else:
                assert max(heavy) < 3, heavy
                assert spikes < 5
                assert 0.8 < drift < 1.25


def test_outliers_keep_generation_finite() -> None:
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    video = pipe(**{**CALL, "height": 64, "width": 64}, generator=torch.Generator().manual_seed(0)).frames
    assert np.isfinite(video).all()
    assert video.std() > 0


@pytest.mark.slow
def test_medium_pipeline_has_a14b_block_shapes() -> None:
    pipe = build_medium_pipeline()
    for model in experts(pipe).values():
        shapes = {name: tuple(m.weight.shape) for name, m in target_linears(model).items()}
        assert len(shapes) == 10
        assert shapes["blocks.0.attn1.to_q"] == (5120, 5120)
        assert shapes["blocks.0.ffn.net.0.proj"] == (13824, 5120)
        assert shapes["blocks.0.ffn.net.2"] == (5120, 13824)
        assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
        assert model.blocks[0].scale_shift_table.dtype == torch.float32
        assert model.condition_embedder.text_embedder.linear_1.weight.shape == (5120, 4096)
    assert pipe.config.boundary_ratio == 0.875
