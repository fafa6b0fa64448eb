"""Straight-through estimators: the forward is the format's quantize-dequantize bit for bit; the backward is the
identity inside the representable range / the clip, zero outside, and the clip ratio gets PACT's gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vidquant import formats
from vidquant.methods.smoothing import quantize_input
from vidquant.methods.ste import ste_quantize, ste_quantize_input

FORMATS = ["hif4", "hif8", "mxfp4", "nvfp4_sim", "fp8_e4m3", "int8", "int4_g64"]
values = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def matrix(rows: int = 3, cols: int = 70):
    return arrays(np.float32, (rows, cols), elements=values)


@settings(max_examples=30, deadline=None)
@given(x=matrix(), name=st.sampled_from(FORMATS))
def test_forward_is_quantize_dequantize_bit_for_bit(x: np.ndarray, name: str) -> None:
    fmt = formats.get(name)
    t = torch.from_numpy(x).requires_grad_(True)
    y = ste_quantize(t, fmt)
    assert torch.equal(y.detach(), fmt.quantize_dequantize(torch.from_numpy(x), dim=-1))
    assert y.requires_grad


@settings(max_examples=30, deadline=None)
@given(x=matrix(), name=st.sampled_from(FORMATS), seed=st.integers(0, 2**16))
def test_backward_is_identity_inside_the_range(x: np.ndarray, name: str, seed: int) -> None:
    t = torch.from_numpy(x).requires_grad_(True)
    g = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    ste_quantize(t, name).backward(g)
    assert torch.equal(t.grad, g)  # every |x| <= 1e3 is inside every format's range


def test_hif8_passes_no_gradient_beyond_its_saturation() -> None:
    limit = formats.get("hif8").max_value
    t = torch.tensor([1.0, -limit, limit * 2, -limit * 4], requires_grad=True)
    ste_quantize(t, "hif8").sum().backward()
    assert t.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


@settings(max_examples=30, deadline=None)
@given(x=matrix(), name=st.sampled_from([*FORMATS, None]), ratio=st.floats(0.05, 1.0))
def test_clipped_forward_equals_quantize_input(x: np.ndarray, name: str | None, ratio: float) -> None:
    r = torch.tensor(ratio, dtype=torch.float32, requires_grad=True)
    y = ste_quantize_input(torch.from_numpy(x).requires_grad_(True), name, r)
    assert torch.equal(y.detach(), quantize_input(torch.from_numpy(x), None, name, torch.tensor(ratio)))


@settings(max_examples=30, deadline=None)
@given(x=matrix(), name=st.sampled_from(FORMATS), ratio=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_clipped_backward_is_identity_inside_and_pact_for_the_ratio(x: np.ndarray, name: str, ratio: float,
                                                                    seed: int) -> None:
    v = torch.from_numpy(x).requires_grad_(True)
    r = torch.tensor(ratio, dtype=torch.float32, requires_grad=True)
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))
    ste_quantize_input(v, name, r).backward(g)
    peak = v.detach().abs().amax(-1, keepdim=True)
    bound = peak * r.detach()
    inside = v.detach().abs() <= bound
    assert torch.equal(v.grad[inside], g[inside])  # identity where unclipped
    assert (v.grad[~inside] == 0).all()  # zero beyond the clip
    at_clip = v.detach().abs() >= bound
    expected = (g * at_clip * torch.sign(v.detach()) * peak).sum()
    torch.testing.assert_close(r.grad, expected)


def test_ratio_gradient_points_to_less_clipping_when_the_peak_matters() -> None:
    # a loss that wants the output to keep the token's peak: shrinking the ratio hurts, so dL/dr < 0
    v = torch.tensor([[4.0, 1.0, -0.5, 0.25]])
    r = torch.tensor(0.5, requires_grad=True)
    y = ste_quantize_input(v, None, r)
    ((y - v) ** 2).sum().backward()
    assert r.grad < 0


def test_one_ratio_per_call() -> None:
    with pytest.raises(ValueError, match="one clip ratio"):
        ste_quantize_input(torch.ones(2, 4), "hif8", torch.ones(2))
