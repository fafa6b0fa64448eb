from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn

from vidquant.models import adapter_for, timestep_bin
from vidquant.models.tiny import TINY_EXPERT, build_tiny_pipeline
from vidquant.models.wan import (
    boundary_linears,
    boundary_timestep,
    expert_for_timestep,
    experts,
    input_groups,
    load_pipeline,
    placeholder_image,
    target_linears,
)


def fingerprint(pipe) -> str:
    return adapter_for(pipe).fingerprint()

BLOCK_LINEARS = [
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
]  # fmt: skip
BOUNDARY = [
    "condition_embedder.time_embedder.linear_1",
    "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj",
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "proj_out",
]


def generate(pipe: Any, steps: int = 2, **kwargs: Any) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt="a red car",
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).frames


@pytest.mark.parametrize("i2v", [False, True])
def test_save_load_round_trip_is_bit_identical(tmp_path: Path, i2v: bool) -> None:
    pipe = build_tiny_pipeline(i2v=i2v)
    extra = {"image": placeholder_image(16, 16)} if i2v else {}
    before = generate(pipe, **extra)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path, i2v=i2v)
    assert type(loaded) is type(pipe)
    assert loaded.config.boundary_ratio == pipe.config.boundary_ratio
    assert fingerprint(loaded) == fingerprint(pipe)
    prompt = "An unseen prompt: zebras, 42 kites & a café!"
    assert loaded.tokenizer(prompt).input_ids == pipe.tokenizer(prompt).input_ids
    after = generate(loaded, **extra)
    assert before.shape == (1, 5, 16, 16, 3)
    assert np.isfinite(before).all()
    np.testing.assert_array_equal(before, after)


def test_load_sharded_checkpoint(tmp_path: Path) -> None:
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    assert fingerprint(load_pipeline(tmp_path)) == fingerprint(pipe)


def test_load_defaults_and_dtype(t2v_dir: Path) -> None:
    pipe = load_pipeline(t2v_dir)
    assert pipe.transformer.dtype == torch.float32
    assert pipe.device.type == "cpu"
    half = load_pipeline(t2v_dir, dtype=torch.bfloat16)
    assert half.vae.dtype == torch.float32  # decoded identically in reference and quantized runs
    assert half.text_encoder.dtype == torch.bfloat16
    for model in experts(half).values():
        assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
        # diffusers keeps these float32 when it loads in bfloat16; the loader must do the same
        assert model.blocks[0].scale_shift_table.dtype == torch.float32
        assert model.blocks[0].norm2.weight.dtype == torch.float32
        assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert fingerprint(half) != fingerprint(pipe)


def test_load_errors(tmp_path: Path, t2v_dir: Path, i2v_dir: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="no such directory") as err:
        load_pipeline(missing)
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        load_pipeline(empty)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        load_pipeline(a_file)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline, not a Wan pipeline"):
        load_pipeline(other)
    with pytest.raises(ValueError, match="text-to-video WanPipeline, but i2v=True"):
        load_pipeline(t2v_dir, i2v=True)
    with pytest.raises(ValueError, match="image-to-video WanImageToVideoPipeline, but i2v=False"):
        load_pipeline(i2v_dir, i2v=False)


def test_experts_in_order_and_skipping_none() -> None:
    pipe = build_tiny_pipeline()
    assert list(experts(pipe)) == ["transformer", "transformer_2"]
    assert experts(pipe)["transformer_2"] is pipe.transformer_2
    single = build_tiny_pipeline(two_experts=False)
    assert list(experts(single)) == ["transformer"]
    assert boundary_timestep(single) is None
    assert expert_for_timestep(single, 10) == "transformer"


@pytest.mark.parametrize(("i2v", "boundary"), [(False, 875.0), (True, 900.0)])
def test_routing_matches_the_pipeline(i2v: bool, boundary: float) -> None:
    pipe = build_tiny_pipeline(i2v=i2v)
    assert boundary_timestep(pipe) == pytest.approx(boundary)
    calls: list[tuple[str, torch.Tensor]] = []
    for name, model in experts(pipe).items():
        model.register_forward_pre_hook(
            lambda _m, _a, kwargs, name=name: calls.append((name, kwargs["timestep"][0])), with_kwargs=True
        )
    generate(pipe, steps=4, **({"image": placeholder_image(16, 16)} if i2v else {}))
    assert len(calls) == 8  # 4 steps x (conditional, unconditional)
    for name, t in calls:
        assert expert_for_timestep(pipe, t) == name
    steps = [(name, int(t)) for name, t in calls[::2]]
    # flow_shift 3 puts the second of 4 steps exactly on the I2V boundary (900), which goes high-noise
    assert steps == [("transformer", 999), ("transformer", 900), ("transformer_2", 750), ("transformer_2", 500)]


def test_expert_for_timestep_at_the_boundary() -> None:
    pipe = build_tiny_pipeline(i2v=True)
    assert expert_for_timestep(pipe, 900) == "transformer"
    assert expert_for_timestep(pipe, torch.tensor(900)) == "transformer"
    assert expert_for_timestep(pipe, 899.5) == "transformer_2"
    assert expert_for_timestep(pipe, torch.tensor([899])) == "transformer_2"


def test_layer_roles() -> None:
    pipe = build_tiny_pipeline()
    for model in experts(pipe).values():
        targets, protected = target_linears(model), boundary_linears(model)
        layers = TINY_EXPERT["num_layers"]
        assert len(targets) == 10 * layers
        assert list(targets) == [f"blocks.{i}.{n}" for i in range(layers) for n in BLOCK_LINEARS]
        assert sorted(protected) == sorted(BOUNDARY)
        every = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert set(targets) | set(protected) == every
        assert not set(targets) & set(protected)


def test_layer_roles_of_wan21_i2v() -> None:
    """Wan2.1-I2V's image k/v projections are targets; its image embedder is protected."""
    model = WanTransformer3DModel(**{**TINY_EXPERT, "in_channels": 36, "image_dim": 24, "added_kv_proj_dim": 32})
    targets = target_linears(model)
    assert len(targets) == 12 * TINY_EXPERT["num_layers"]
    assert "blocks.1.attn2.add_k_proj" in targets
    assert set(boundary_linears(model)) - set(BOUNDARY) == {
        "condition_embedder.image_embedder.ff.net.0.proj",
        "condition_embedder.image_embedder.ff.net.2",
    }
    groups = input_groups(model)
    assert ["blocks.0.attn2.add_k_proj", "blocks.0.attn2.add_v_proj"] in groups
    assert sorted(n for g in groups for n in g) == sorted(targets)


def test_input_groups() -> None:
    model = build_tiny_pipeline().transformer
    groups = input_groups(model)
    text_kv = [f"blocks.{i}.attn2.to_{p}" for i in range(TINY_EXPERT["num_layers"]) for p in "kv"]
    expected = []
    for i in range(TINY_EXPERT["num_layers"]):
        b = f"blocks.{i}."
        expected += [
            [b + "attn1.to_q", b + "attn1.to_k", b + "attn1.to_v"],
            [b + "attn1.to_out.0"],
            [b + "attn2.to_q"],
            *([text_kv] if i == 0 else []),  # one text context for every block
            [b + "attn2.to_out.0"],
            [b + "ffn.net.0.proj"],
            [b + "ffn.net.2"],
        ]
    assert groups == expected
    # in a real forward every member of a group receives the very same tensor
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0]))
               for n, m in target_linears(model).items()]
    with torch.no_grad():
        model(torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 512, 32), return_dict=False)
    for h in handles:
        h.remove()
    assert all(seen[n] is seen[g[0]] for g in groups for n in g)
    # and on the real weights, members of a group do see equal inputs while other Linears do not
    seen: dict[str, torch.Tensor] = {}
    for name, module in target_linears(model).items():
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0]))
    model(
        hidden_states=torch.randn(1, 16, 2, 4, 4),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 7, TINY_EXPERT["text_dim"]),
        return_dict=False,
    )
    for group in groups:
        assert all(seen[name] is seen[group[0]] for name in group)
    for i in range(TINY_EXPERT["num_layers"]):
        firsts = [seen[g[0]] for g in groups if g[0].startswith(f"blocks.{i}.")]
        assert len({id(t) for t in firsts}) == len(firsts)
    # the text context is one tensor for all blocks, yet groups stay within a block
    assert seen["blocks.0.attn2.to_k"] is seen["blocks.1.attn2.to_k"]


def test_placeholder_image() -> None:
    image = placeholder_image(16, 24)
    assert image.size == (24, 16)
    assert image.mode == "RGB"
    assert image.getpixel((3, 5)) == (255, 255, 255)
    assert placeholder_image(8, 8, color=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


def test_fingerprint_tracks_weights_and_config() -> None:
    pipe = build_tiny_pipeline()
    reference = fingerprint(pipe)
    assert len(reference) == 64
    assert fingerprint(pipe) == reference
    assert fingerprint(build_tiny_pipeline()) == reference
    assert fingerprint(build_tiny_pipeline(seed=1)) != reference
    with torch.no_grad():
        pipe.transformer_2.blocks[1].ffn.net[2].weight[0, 0] += 1e-3
    assert fingerprint(pipe) != reference
    pipe = build_tiny_pipeline()
    pipe.register_to_config(boundary_ratio=0.5)
    assert fingerprint(pipe) != reference


def test_publish_bins_follows_each_call() -> None:
    pipe = build_tiny_pipeline()
    adapter = adapter_for(pipe)
    edges = adapter.bin_edges(2)
    boundary = boundary_timestep(pipe)
    assert edges["transformer"] == [boundary, (boundary + 1000) / 2, 1000.0]
    assert edges["transformer_2"] == [0.0, boundary / 2, boundary]
    model = experts(pipe)["transformer_2"]
    published: list[int] = []
    seen = []
    adapter.publish_bins(edges, lambda expert, b: published.append(b) if expert == "transformer_2" else None)
    adapter.publish_bins(edges, lambda expert, b: published.append(b) if expert == "transformer_2" else None)
    model.register_forward_pre_hook(  # runs after the publisher's
        lambda m, a, k: seen.append((published[-1], adapter.call_info("transformer_2", a, k, None).timestep)),
        with_kwargs=True)
    assert len(model._forward_pre_hooks) == 2  # the second publish replaced the first one's hook
    pipe(prompt="a cat", num_inference_steps=8, height=32, width=32, num_frames=5, output_type="latent")
    assert len(seen) >= 2 and all(b == timestep_bin(t, edges["transformer_2"]) for b, t in seen)
    assert {b for b, _ in seen} == {0, 1}
    adapter.publish_bins({}, None)
    assert len(model._forward_pre_hooks) == 1
