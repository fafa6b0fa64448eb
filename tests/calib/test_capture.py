"""Held-out input capture: deterministic, bounded, uniform over the stream, disjoint seeds, shared tensors."""

from __future__ import annotations

import pytest
import torch

from vidquant.calib import capture as capture_module
from vidquant.calib.calibrate import CalibSettings
from vidquant.calib.capture import Reservoir, capture_inputs
from vidquant.calib.prompts import default_prompts
from vidquant.models import tiny, wan

SETTINGS = CalibSettings(num_prompts=2, steps=2, height=32, width=32, frames=5)
PROMPTS = default_prompts()[2:4]




@pytest.fixture(scope="module")
def pipe():
    return tiny.build_tiny_pipeline()


def test_reservoir_keeps_the_smallest_keys_in_stream_order() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(int(torch.randint(3, 40, (), generator=g)), 3, generator=g) for _ in range(30)]
    batches[0][1, 2] = float("nan")
    batches[5][0, 0] = float("inf")
    reservoir = Reservoir(37, seed=5)
    for batch in batches:
        reservoir.add(batch)
    keys = torch.Generator().manual_seed(5)
    all_keys = torch.cat([torch.rand(len(b), generator=keys, dtype=torch.float64) for b in batches])
    rows = torch.cat(batches)
    all_keys[~torch.isfinite(rows).all(1)] = float("inf")  # never kept
    expected = rows[all_keys.topk(37, largest=False).indices.sort().values]
    assert torch.equal(reservoir.sample(), expected)


def test_capture_is_deterministic_bounded_and_shares_group_tensors(pipe) -> None:
    first = capture_inputs(pipe, PROMPTS, SETTINGS, max_tokens=5)
    second = capture_inputs(pipe, PROMPTS, SETTINGS, max_tokens=5)
    for expert, model in wan.experts(pipe).items():
        assert list(first[expert]) == list(wan.target_linears(model))
        for layer, x in first[expert].items():
            assert x.shape == (5, wan.target_linears(model)[layer].in_features)
            assert torch.equal(x, second[expert][layer])
        got = first[expert]
        assert got["blocks.0.attn1.to_q"] is got["blocks.0.attn1.to_k"] is got["blocks.0.attn1.to_v"]
        assert got["blocks.0.attn2.to_k"] is got["blocks.1.attn2.to_v"]  # the one text context
        assert got["blocks.0.attn1.to_q"] is not got["blocks.1.attn1.to_q"]


def test_sample_is_drawn_from_every_call(pipe) -> None:
    layer = "blocks.1.ffn.net.2"
    seen: list[torch.Tensor] = []
    module = wan.target_linears(wan.experts(pipe)["transformer_2"])[layer]
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 64).clone()))
    try:
        everything = capture_inputs(pipe, PROMPTS, SETTINGS, {"transformer_2": [layer]}, max_tokens=10**6)
    finally:
        handle.remove()
    stream = torch.cat(seen)
    assert list(everything) == ["transformer_2"] and list(everything["transformer_2"]) == [layer]
    assert torch.equal(everything["transformer_2"][layer], stream)  # all of it, in stream order

    small = capture_inputs(pipe, PROMPTS, SETTINGS, {"transformer_2": [layer]}, max_tokens=16)["transformer_2"][layer]
    positions = [int((stream == row).all(1).nonzero()[0]) for row in small]
    assert positions == sorted(positions) and len(set(positions)) == 16
    assert positions[-1] - positions[0] > len(stream) // 2  # spread over the run, not its first calls


def test_held_out_seeds_are_disjoint_from_calibration(pipe, monkeypatch) -> None:
    seeds: list[int] = []
    real = capture_module.generate

    def recording(pipe_, prompt, settings, *, seed, on_step=None):
        seeds.append(seed)
        real(pipe_, prompt, settings, seed=seed, on_step=on_step)

    monkeypatch.setattr(capture_module, "generate", recording)
    capture_inputs(pipe, PROMPTS, SETTINGS, {"transformer": ["blocks.0.attn1.to_q"]}, max_tokens=4)
    assert seeds == [SETTINGS.seed + 10_000, SETTINGS.seed + 10_001]
    assert not set(seeds) & set(range(SETTINGS.seed, SETTINGS.seed + SETTINGS.num_prompts))
    with pytest.raises(ValueError, match="calibration seeds"):
        capture_inputs(pipe, PROMPTS, SETTINGS, seed_offset=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers={"transformer_3": ["blocks.0.attn1.to_q"]}), "unknown expert"),
        (dict(layers={"transformer": ["proj_out"]}), "not target Linears"),
        (dict(max_tokens=0), "max_tokens"),
    ],
)
def test_capture_argument_errors(pipe, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        capture_inputs(pipe, PROMPTS, SETTINGS, **kwargs)
