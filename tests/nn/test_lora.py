"""The QAT parts of a QuantLinear: the LoRA delta (checked, added to the output in both runtimes, from a state) and
training the transforms (the weight re-quantized through the STE equals the one construction makes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vidquant.nn import QuantLinear
from vidquant.nn.parts import LoRADelta, check_tensors


def layer(seed: int = 0, n: int = 32, k: int = 128) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def factors(n: int = 32, k: int = 128, r: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g) * 0.1


@pytest.mark.parametrize("bad, message", [
    ({"lora_down": torch.ones(2, 128)}, "come together"),
    ({"lora_down": torch.ones(2, 127), "lora_up": torch.ones(32, 2)}, r"shape \(rank, 128\)"),
    ({"lora_down": torch.ones(2, 128), "lora_up": torch.ones(32, 3)}, r"shape \(32, 2\)"),
    ({"lora_down": torch.ones(2, 128, dtype=torch.int32), "lora_up": torch.ones(32, 2)}, "floating point"),
    ({"lora_down": torch.full((2, 128), float("nan")), "lora_up": torch.ones(32, 2)}, "non-finite"),
])
def test_lora_tensors_are_checked_naming_the_layer(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        check_tensors(bad, 32, 128, "hif4", "layer transformer.blocks.0.attn1.to_q")
    assert "transformer.blocks.0.attn1.to_q" in str(err.value)


@settings(max_examples=10, deadline=None)
@given(fmt=st.sampled_from(["hif4", "hif8", "mxfp4", "int4_g64"]), seed=st.integers(0, 1000))
def test_delta_adds_to_the_output_and_packed_equals_fake(fmt: str, seed: int) -> None:
    lin = layer(seed)
    mask = torch.rand(128, generator=torch.Generator().manual_seed(seed)) + 0.5
    down, up = factors(seed=seed)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(seed + 1))
    plain = QuantLinear(lin, fmt, fmt, mask=mask, act_clip=0.9)
    with_delta = QuantLinear(lin, fmt, fmt, mask=mask, act_clip=0.9, lora=(down, up))
    torch.testing.assert_close(with_delta(x), plain(x) + (x @ down.T) @ up.T)
    tensors = {"mask": mask, "act_clip": torch.tensor(0.9), "lora_down": down, "lora_up": up}
    fake = QuantLinear.from_state(lin, fmt, fmt, tensors, runtime="fake")
    packed = QuantLinear.from_state(lin, fmt, fmt, tensors, runtime="packed")
    assert torch.equal(fake(x), packed(x))
    assert torch.equal(fake(x), with_delta(x))
    assert isinstance(fake.lora, LoRADelta) and fake.lora.rank == 3 and "lora_rank=3" in repr(fake)


@pytest.mark.parametrize("fmt", ["hif4", "hif8", "nvfp4_sim"])
def test_training_the_mask_requantizes_the_weight_exactly(fmt: str) -> None:
    lin = layer(2)
    mask = torch.rand(128, generator=torch.Generator().manual_seed(3)) + 0.5
    q = QuantLinear(lin, fmt, fmt, mask=mask, lowrank=factors(r=2))
    reference = q.weight.detach().clone()
    q.train_transforms(lin.weight)
    assert q.weight is None  # no dense copy while the transforms train
    assert torch.equal(q.dense_weight(), reference)  # the same arithmetic as construction
    x = torch.randn(4, 128, requires_grad=True)
    q(x).square().sum().backward()  # gradients reach the input through both STEs
    assert x.grad is not None and x.grad.abs().sum() > 0
    new_mask = mask.clone() * 1.5
    with torch.no_grad():
        q.transforms[0].mask.copy_(new_mask)
    q.freeze_transforms()
    assert q.requant_base is None
    moved = QuantLinear(lin, fmt, fmt, mask=new_mask.clone(), lowrank=factors(r=2))
    assert not torch.equal(moved.weight, reference)
    assert torch.equal(q.weight, moved.weight)


def test_training_the_mask_needs_the_fake_runtime() -> None:
    q = QuantLinear(layer(), "hif4", "hif4", mask=torch.ones(128), runtime="packed")
    with pytest.raises(ValueError, match="fake runtime"):
        q.train_transforms(layer().weight)
