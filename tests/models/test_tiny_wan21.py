"""The tiny Wan2.1 pipelines: one expert of 8 blocks, T2V and I2V (CLIP), boundary blocks unlike the middle ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline

from vidquant.models import adapter_for, load_model, load_pipeline
from vidquant.models.tiny_wan21 import NUM_BLOCKS, VALUE_SCALE, boundary_blocks


def block_inputs(model: torch.nn.Module, layer: str) -> list[float]:
    """absmax of ``blocks.i.<layer>``'s input for every block i, on one random call."""
    seen: dict[int, float] = {}
    hooks = [block.get_submodule(layer).register_forward_pre_hook(
        lambda _m, args, i=i: seen.__setitem__(i, float(args[0].abs().max()))) for i, block in enumerate(model.blocks)]
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    with torch.no_grad():
        model(hidden_states=torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g), timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 16, cfg.text_dim, generator=g), return_dict=False)
    for hook in hooks:
        hook.remove()
    return [seen[i] for i in range(len(model.blocks))]


@pytest.mark.parametrize("i2v", [False, True])
def test_wan21_loads_through_the_real_path(tmp_path: Path, i2v: bool) -> None:
    pipe = load_model("tiny-wan21", i2v=i2v)
    assert isinstance(pipe, WanImageToVideoPipeline if i2v else WanPipeline)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path, i2v=i2v)
    adapter = adapter_for(loaded)
    assert adapter.family == "wan" and list(adapter.experts()) == ["transformer"]
    assert len(adapter.blocks("transformer")) == NUM_BLOCKS and loaded.config.get("boundary_ratio") is None
    assert adapter.fingerprint() == adapter_for(pipe).fingerprint()
    targets = adapter.target_linears("transformer")
    assert ("blocks.0.attn2.add_k_proj" in targets) == i2v  # Wan2.1-I2V: the CLIP image tokens' k / v
    if i2v:
        assert type(loaded.image_encoder).__name__ == "CLIPVisionModel" and loaded.image_processor is not None


def test_boundary_blocks_sit_at_hif8s_ends_and_the_middle_does_not() -> None:
    model = load_model("tiny-wan21").transformer
    first, last = boundary_blocks(NUM_BLOCKS)
    middle = [i for i in range(NUM_BLOCKS) if i not in first + last]
    q_in = block_inputs(model, "attn1.to_q")
    assert min(q_in[i] for i in first) > 10 * max(q_in[i] for i in middle)  # massive activations: >= 2^8, 1 bit
    out_in = block_inputs(model, "attn1.to_out.0")
    assert max(out_in[i] for i in last) < 2**-8 * min(out_in[i] for i in middle)  # vanishing values
    weights = [float(b.attn1.to_out[0].weight.detach().abs().max()) for b in model.blocks]
    assert min(weights[i] for i in last) > 2**8 * max(weights[i] for i in middle)


def test_vanishing_values_preserve_the_function() -> None:
    """Undoing the last blocks' value scaling leaves the output unchanged up to fp32 rounding."""
    model = load_model("tiny-wan21").transformer
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    inputs = {"hidden_states": torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g),
              "timestep": torch.tensor([700.0]), "encoder_hidden_states": torch.randn(1, 16, cfg.text_dim, generator=g)}
    with torch.no_grad():
        planted = model(**inputs, return_dict=False)[0]
        for i in boundary_blocks(NUM_BLOCKS)[1]:
            for attn in (model.blocks[i].attn1, model.blocks[i].attn2):
                attn.to_v.weight /= VALUE_SCALE
                attn.to_v.bias /= VALUE_SCALE
                attn.to_out[0].weight *= VALUE_SCALE
        plain = model(**inputs, return_dict=False)[0]
    assert torch.allclose(planted, plain, rtol=1e-4, atol=1e-5)


def test_wan21_i2v_calibrates_quantizes_and_generates() -> None:
    import vidquant
    from vidquant.calib.calibrate import CalibSettings
    from vidquant.calib.prompts import default_prompts
    from vidquant.nn import QuantLinear

    pipe = load_model("tiny-wan21", i2v=True)
    pipe.set_progress_bar_config(disable=True)
    settings = CalibSettings(num_prompts=1, steps=2, height=32, width=32, frames=9, bins=1)
    stats = vidquant.calibrate(pipe, default_prompts(), settings, progress=False)
    assert "blocks.3.attn2.add_k_proj" in stats.layers("transformer")  # the image k / v are calibrated
    state = vidquant.quantize(pipe, "boundary-hif8", stats)
    assert len(state.layers) == 12 * 3  # 12 Linears per I2V block, the 3 middle blocks
    kwargs = adapter_for(pipe).call_kwargs(settings, "a red car", 0)
    reference = pipe(**kwargs, output_type="latent").frames
    vidquant.apply(pipe, state)
    assert sum(isinstance(m, QuantLinear) for m in pipe.transformer.modules()) == 36
    quantized = pipe(**kwargs, output_type="latent").frames
    assert quantized.shape == reference.shape and not torch.equal(quantized, reference)
    assert torch.isfinite(quantized).all()
