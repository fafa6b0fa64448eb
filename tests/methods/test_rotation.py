"""The randomized Hadamard rotation (`methods.rotation`) against its dense definition R = D H / sqrt(n)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidquant.methods import rotation as rot

LOG_BLOCKS = st.integers(0, 7)  # blocks 1 .. 128
SEEDS = st.integers(0, 2**31 - 1)


def data(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x *= torch.exp(2 * torch.randn(*shape, generator=g, dtype=torch.float64))  # heavy tails, wide range
    return x.to(dtype)


@st.composite
def layouts(draw) -> tuple[int, int, int, int]:
    """(rows, K, block, seed): K = block * a few, sometimes with the block "full" resolution."""
    block = 2 ** draw(LOG_BLOCKS)
    return draw(st.integers(1, 5)), block * draw(st.integers(1, 4)), block, draw(SEEDS)


def test_hadamard_matrix_is_sylvester() -> None:
    h = rot.hadamard_matrix(8)
    assert torch.equal(h @ h.T, 8 * torch.eye(8))
    assert torch.equal(h[:4, :4], rot.hadamard_matrix(4)) and torch.equal(h[4:, 4:], -rot.hadamard_matrix(4))
    with pytest.raises(ValueError, match="power of two"):
        rot.hadamard_matrix(12)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_fwht_equals_the_dense_hadamard_matmul(layout) -> None:
    rows, k, block, seed = layout
    x = data(seed, rows, k, dtype=torch.float64)
    dense = (x.view(rows, k // block, block) @ rot.hadamard_matrix(block, torch.float64)).view(rows, k)
    torch.testing.assert_close(rot.fwht(x, block), dense, rtol=1e-12, atol=1e-12 * float(x.abs().max()) * block)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_rotate_equals_x_times_dense_r(layout) -> None:
    rows, k, block, seed = layout
    x = data(seed, rows, k, dtype=torch.float64)
    signs = rot.random_signs(k, seed)
    r = rot.dense_rotation(signs, block)
    torch.testing.assert_close(rot.rotate(x, signs, block), x @ r, rtol=1e-12, atol=1e-13 * float(x.abs().max()))
    # fp32 (the numba kernel on CPU): one rounding per butterfly stage, log2(n) + 2 roundings per value
    y32 = rot.rotate(x.float(), signs, block).double()
    bound = (math.log2(block) + 2) * 2.0**-24 * (x.abs() @ r.abs()) + 1e-30
    assert ((y32 - x @ r).abs() <= bound * 1.01).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 8), SEEDS)
def test_r_is_orthogonal_and_unrotate_inverts(log_block: int, seed: int) -> None:
    block = 2**log_block
    k = block * (1 + seed % 3)
    signs = rot.random_signs(k, seed)
    r = rot.dense_rotation(signs, block)
    torch.testing.assert_close(r @ r.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    x = data(seed, 3, k, dtype=torch.float64)
    y = rot.rotate(x, signs, block)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)  # an isometry
    torch.testing.assert_close(rot.unrotate(y, signs, block), x, rtol=1e-12, atol=1e-12 * float(x.abs().max()))
    torch.testing.assert_close(rot.unrotate(x, signs, block), x @ r.T, rtol=1e-12, atol=1e-12 * float(x.abs().max()))


@settings(max_examples=40, deadline=None)
@given(layouts())
def test_block_variant_rotates_each_block_alone(layout) -> None:
    rows, k, block, seed = layout
    x = data(seed, rows, k)
    signs = rot.random_signs(k, seed)
    whole = rot.rotate(x, signs, block)
    for j in range(0, k, block):
        part = rot.rotate(x[:, j:j + block].contiguous(), signs[j:j + block], block)
        assert torch.equal(whole[:, j:j + block], part)  # no block sees another's values


@settings(max_examples=40, deadline=None)
@given(layouts(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_numba_kernel_equals_torch_ops_bit_for_bit(layout, dtype) -> None:
    rows, k, block, seed = layout
    x = data(seed, rows, k).clamp(-6e4, 6e4).to(dtype)
    signs = rot.random_signs(k, seed)
    assert rot.use_numba(x.float())  # `rotate` takes the kernel here (unless VIDQUANT_NO_KERNELS=1 is set)
    fast, reference = rot.rotate(x, signs, block), rot.rotate_torch(x, signs, block)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert fast.dtype == dtype and torch.equal(fast.view(bits), reference.view(bits))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), SEEDS)
def test_rotation_preserves_the_linear_and_rotates_the_hessian(log_block: int, seed: int) -> None:
    block, k = 2**log_block, 2**log_block * 2
    x, w = data(seed, 9, k, dtype=torch.float64), data(seed + 1, 5, k, dtype=torch.float64)
    signs = rot.random_signs(k, seed)
    torch.testing.assert_close(rot.rotate(x, signs, block) @ rot.rotate(w, signs, block).T, x @ w.T,
                               rtol=1e-10, atol=1e-10 * float((x.abs() @ w.abs().T).max()))
    h = x.T @ x
    r = rot.dense_rotation(signs, block)
    xr = rot.rotate(x, signs, block)
    torch.testing.assert_close(rot.rotate_hessian(h, signs, block), r.T @ h @ r, rtol=1e-10,
                               atol=1e-10 * float(h.abs().max()))
    torch.testing.assert_close(rot.rotate_hessian(h, signs, block), xr.T @ xr, rtol=1e-9,
                               atol=1e-9 * float(h.abs().max()))


@given(st.integers(1, 4096), SEEDS)
def test_signs_are_plus_minus_one_and_reproducible(n: int, seed: int) -> None:
    s = rot.random_signs(n, seed)
    assert s.dtype == torch.int8 and s.shape == (n,) and ((s == 1) | (s == -1)).all()
    assert torch.equal(s, rot.random_signs(n, seed))


def test_other_seeds_give_other_signs() -> None:
    assert not torch.equal(rot.random_signs(256, 0), rot.random_signs(256, 1))
    assert 0.35 < (rot.random_signs(4096, 7) == 1).float().mean() < 0.65  # balanced, not all one sign


@pytest.mark.parametrize("block", [16, 64, 1024])
def test_an_outlier_channel_spreads_over_its_block(block: int) -> None:
    """Why it helps tails: a lone spike becomes block values of size A / sqrt(n), so a block's max/RMS drops from
    sqrt(n) to 1, and no other block is touched."""
    k = 2 * block
    x = torch.zeros(1, k)
    x[0, 3] = 100.0
    y = rot.rotate(x, rot.random_signs(k, 0), block)
    torch.testing.assert_close(y[0, :block].abs(), torch.full((block,), 100.0 / math.sqrt(block)))
    assert torch.equal(y[0, block:], torch.zeros(block))


def test_block_resolution() -> None:
    assert rot.full_block(4096) == 4096
    assert rot.full_block(5120) == 1024 and rot.full_block(13824) == 512  # A14B: 5 and 27 blocks
    assert rot.resolve_block(5120, "full") == 1024 and rot.resolve_block(5120, 64) == 64
    with pytest.raises(ValueError, match="blocks.3.ffn: rotation block 64 does not divide in_features 96"):
        rot.resolve_block(96, 64, "blocks.3.ffn")
    with pytest.raises(ValueError, match="power of two"):
        rot.resolve_block(96, 48)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"signs must have shape \(64,\)"):
        rot.rotate(torch.zeros(2, 64), rot.random_signs(32, 0), 32)
    with pytest.raises(ValueError, match="block 48 must be a power of two"):
        rot.rotate(torch.zeros(2, 96), rot.random_signs(96, 0), 48)
    with pytest.raises(ValueError, match="floating-point"):
        rot.rotate(torch.zeros(2, 64, dtype=torch.int32), rot.random_signs(64, 0), 64)
    with pytest.raises(ValueError, match="square"):
        rot.rotate_hessian(torch.zeros(4, 8), rot.random_signs(8, 0), 8)


def test_gradients_flow_through_the_rotation() -> None:
    """Fine-tuning through a rotated layer: d sum(x R) / dx = 1 R^T (the kernels step aside for autograd)."""
    x = torch.randn(3, 128, requires_grad=True)
    signs = rot.random_signs(128, 0)
    assert not rot.use_numba(x)
    y = rot.rotate(x, signs, 32)
    assert torch.equal(y.detach(), rot.rotate(x.detach(), signs, 32))
    y.sum().backward()
    torch.testing.assert_close(x.grad, rot.unrotate(torch.ones(3, 128), signs, 32))
