"""The `HadamardRotation` part: exact before quantization, hand-computed after, checked, and saved in a state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vidquant
from vidquant import formats
from vidquant.methods.rotation import random_signs, resolve_block, rotate
from vidquant.methods.smoothing import sqnr_db
from vidquant.nn import QuantLinear, check_tensors
from vidquant.nn.hadamard import HadamardRotation, rotation_tensors
from vidquant.recipes import Recipe, load_recipe
from vidquant.state import LayerState, quant_linear


def heavy(rows: int, k: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, :3] *= 40.0  # a few heavy channels, as a DiT has
    return x.to(dtype)


def layer_tensors(k: int, n: int, block: int | str, seed: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = rotation_tensors(k, block, seed)
    t["mask"] = torch.exp(torch.randn(k, generator=g))  # spans e^+-3
    if rank:
        t["lowrank_down"] = torch.randn(rank, k, generator=g)
        t["lowrank_up"] = torch.randn(n, rank, generator=g) * 0.01
    return t


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([32, 64, 96, 192, 256]), st.sampled_from(["full", 64, 32, 16]), st.integers(0, 2**31 - 1),
       st.sampled_from([0, 3]))
def test_without_quantization_the_layer_is_the_original_within_fp32_rounding(k: int, block, seed: int,
                                                                             rank: int) -> None:
    """Smooth, rotate, low-rank branch on the rotated input: (x·m R)((W/m) R - U D)^T + (x·m R) D^T U^T = x W^T."""
    torch.manual_seed(seed)
    linear = nn.Linear(k, 24)
    x = heavy(7, k, seed)
    q = QuantLinear.from_state(linear, None, None, layer_tensors(k, 24, block, seed, rank))
    reference = linear(x).detach()
    exact = (x.double() @ linear.weight.double().T + linear.bias.double())
    scale = (x.double().abs() @ linear.weight.double().abs().T).max() + linear.bias.double().abs().max()
    # the rounding of a product is relative to the magnitudes it multiplies: in the rotated basis those are
    # |x m R| and |(W/m) R|, whose products can sum to more than sum |x w| (Cauchy-Schwarz), so both count
    xr, wr = x.double(), linear.weight.detach().double()
    for t in q.transforms:
        xr, wr = t(xr), t.fold(wr)
    rotated = (xr.abs() @ wr.abs().T).max() + linear.bias.double().abs().max()
    # a few fp32 roundings per product path: log2(n) butterflies, the mask, the fold, the sums over K
    assert (q(x).double() - exact).abs().max() <= 64 * 2.0**-24 * max(scale, rotated) * (1 + rank)
    assert (reference.double() - exact).abs().max() <= 64 * 2.0**-24 * scale


@pytest.mark.parametrize("name", ["hif4", "mxfp4", "nvfp4", "int4_g64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_forward_is_hand_computed(name: str, dtype: torch.dtype) -> None:
    """F.linear(Q_a((x·m) R), Q_w((W/m) R)): the rotation sits between the mask and the quantizers."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 16).to(dtype)
    x = heavy(5, 128, dtype=dtype)
    t = layer_tensors(128, 16, 32, 7, 0)
    q = QuantLinear.from_state(linear, name, name, t)
    fmt, signs = formats.get(name), t["rotation_signs"]
    w = fmt.quantize_dequantize(rotate(linear.weight.detach().float() / t["mask"], signs, 32)).to(dtype)
    xq = fmt.quantize_dequantize(rotate(x.float() * t["mask"], signs, 32)).to(dtype)
    assert torch.equal(q(x), F.linear(xq, w, linear.bias))


@pytest.mark.parametrize("name", ["mxfp4", "int4_g64"])
def test_rotation_spreads_heavy_channels_and_lowers_the_error(name: str) -> None:
    """Every 16th channel 20x the rest: each unit's scale is set by its heavy channels and the others round to
    few levels; rotated, every unit holds a near-Gaussian mix and the layer output gains (MX: a power-of-two
    scale, INT4: a uniform grid, the formats that suffer most from a peaked unit)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    x[:, ::16] *= 20.0
    reference = linear(x).detach()
    plain = QuantLinear(linear, name, name)
    rotated = QuantLinear.from_state(linear, name, name, rotation_tensors(256, 32, 0))
    assert sqnr_db(reference, rotated(x)) > sqnr_db(reference, plain(x)) + 2


@pytest.mark.parametrize(("change", "message"), [
    ({"rotation_signs": torch.ones(63, dtype=torch.int8)}, r"rotation_signs must have shape \(64,\)"),
    ({"rotation_signs": torch.full((64,), 2, dtype=torch.int8)},
     "rotation_signs must hold only \\+1 and -1, found 64 other"),
    ({"rotation_signs": torch.ones(64, dtype=torch.bool)}, "rotation_signs must be a real tensor of \\+-1"),
    ({"rotation_block": torch.tensor(48)}, "rotation_block must be a power of two dividing in_features 64, got 48"),
    ({"rotation_block": torch.tensor(128)}, "rotation_block must be a power of two dividing in_features 64, got 128"),
    ({"rotation_block": torch.tensor(32.0)}, "rotation_block must be an integer scalar"),
    ({"rotation_seed": torch.tensor([1, 2])}, "rotation_seed must be an integer scalar"),
    ({"rotation_seed": torch.tensor(-1)}, "rotation_seed must be >= 0"),
    ({"rotation_seed": None}, "rotation_signs, rotation_block, rotation_seed come together: rotation_seed missing"),
])
def test_bad_tensors_are_refused_naming_the_layer(change: dict, message: str) -> None:
    tensors = {**rotation_tensors(64, "full", 3), **change}
    tensors = {k: v for k, v in tensors.items() if v is not None}
    with pytest.raises(ValueError, match=f"layer blocks.2.attn1.to_q: {message}"):
        check_tensors(tensors, 8, 64, "hif4", "layer blocks.2.attn1.to_q")


def test_tensors_come_from_the_seed_and_a_unit_block_that_cannot_tile_k_falls_back(caplog) -> None:
    t = rotation_tensors(5120, "full", 11)
    assert int(t["rotation_block"]) == 1024 and int(t["rotation_seed"]) == 11
    assert torch.equal(t["rotation_signs"], random_signs(5120, 11))
    with caplog.at_level("WARNING"):
        assert int(rotation_tensors(96, 64, 0, where="layer b.ffn")["rotation_block"]) == 32
    assert "layer b.ffn: rotation block 64 does not divide in_features 96; using 32" in caplog.text
    part = HadamardRotation.from_tensors(t)
    assert part.block == 1024 and "block=1024, seed=11" in repr(part)
    assert HadamardRotation.from_tensors({"mask": torch.ones(4)}) is None


def test_a_layer_state_with_a_rotation_round_trips_bit_identically(tmp_path: Path) -> None:
    """Quantize a small module with each rotated recipe, save, load, apply: the same outputs, the same signs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    loop = [heavy(16, 64, seed) for seed in range(3)]
    stats = vidquant.calibrate(model, loop)
    x = heavy(9, 64, 99)
    for fmt in ("hif4", "mxfp4", "nvfp4"):
        recipe = load_recipe(f"rotated-tail-aware-{fmt}")
        state = vidquant.quantize(model, recipe, stats, forward_loop=loop)
        layer = state.layers["model.0"]
        assert int(layer.tensors["rotation_block"]) == resolve_block(64, recipe.rotation.block)
        assert torch.equal(layer.tensors["rotation_signs"], random_signs(64, 0))
        state.save(tmp_path / fmt)
        loaded = vidquant.load_state(tmp_path / fmt)
        assert loaded.fingerprint() == state.fingerprint()
        assert loaded.recipe["rotation"]["block"] == recipe.rotation.block
        outputs = []
        for s in (state, loaded):
            m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
            m.load_state_dict(model.state_dict())
            vidquant.apply(m, s, runtime="packed")
            assert any(isinstance(t, HadamardRotation) for t in m[0].transforms)
            with torch.no_grad():
                outputs.append(m(x))
        assert torch.equal(outputs[0], outputs[1])


def test_state_tensors_make_the_same_layer_as_the_part() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    t = rotation_tensors(64, 16, 5)
    state = LayerState("hif4", "hif4", "0" * 64, dict(t))
    a = quant_linear(linear, state)
    b = QuantLinear(linear, "hif4", "hif4", transforms=[HadamardRotation(t["rotation_signs"], 16, 5)])
    x = heavy(3, 64)
    assert torch.equal(a(x), b(x)) and torch.equal(a.weight, b.weight)
    assert "rotation=hadamard(block=16, seed=5)" in repr(a)


def test_a_recipe_rotation_section_is_validated() -> None:
    base = load_recipe("tail-aware-hif4").to_dict()
    assert "rotation" not in base  # unrotated manifests stay as they were
    r = Recipe.model_validate({**base, "rotation": {"block": "full", "seed": 4}})
    assert r.rotation.kind == "hadamard" and r.to_dict()["rotation"] == {"kind": "hadamard", "block": "full", "seed": 4}
    for bad in ({"block": 48}, {"kind": "givens"}, {"seed": -1}, {"blocks": 64}):
        with pytest.raises(ValueError, match="rotation"):
            Recipe.model_validate({**base, "rotation": bad})
