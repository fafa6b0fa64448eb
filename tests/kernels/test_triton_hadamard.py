"""The Triton FWHT kernel (in Triton's CPU interpreter) against the CPU rotation, bit for bit.

The kernel does the CPU path's fp32 operations in the same order (signs, butterfly stages h = 1, 2, ..., one
multiplication by fp32(1/sqrt(n)), one rounding to the output dtype), so any difference is a bug, not rounding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from vidquant.kernels import triton_hadamard as th  # noqa: E402
from vidquant.methods import rotation as rot  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def _interpreter() -> Iterator[None]:
    """Triton's interpreter for this module (set before the kernel is first wrapped, `th._triton`)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 9), st.integers(1, 3), st.integers(1, 70), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_kernel_equals_the_cpu_rotation_bit_for_bit(log_block: int, blocks: int, rows: int, seed: int,
                                                    dtype: torch.dtype) -> None:
    block = 2**log_block
    k = block * blocks
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * torch.exp(3 * torch.randn(rows, 1, generator=g))).to(dtype)
    signs = rot.random_signs(k, seed)
    assert th.uses_kernel(x)
    out = th.hadamard_transform(x, signs, block)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(bits(out), bits(rot.rotate_torch(x, signs, block)))
    assert torch.equal(bits(out), bits(rot.rotate(x, signs, block)))  # the numba kernel too


def test_leading_dims_tokens_and_a_full_4096_block() -> None:
    x = torch.randn(2, 3, 4096, generator=torch.Generator().manual_seed(0))
    signs = rot.random_signs(4096, 1)
    out = th.hadamard_transform(x, signs, 4096)
    assert torch.equal(out, rot.rotate_torch(x, signs, 4096))
    torch.testing.assert_close(out.double(), x.double() @ rot.dense_rotation(signs, 4096), rtol=0, atol=1e-5)


def test_special_values_pass_through_as_on_cpu() -> None:
    x = torch.tensor([[0.0, -0.0, 1e-40, -3e38], [float("inf"), 1.0, 2.0, 3.0]])
    signs = torch.tensor([1, -1, 1, -1], dtype=torch.int8)
    assert torch.equal(th.hadamard_transform(x, signs, 4).isnan(), rot.rotate_torch(x, signs, 4).isnan())
    finite = th.hadamard_transform(x[:1], signs, 4)
    assert torch.equal(bits(finite), bits(rot.rotate_torch(x[:1], signs, 4)))


def test_bad_inputs_are_refused() -> None:
    signs = rot.random_signs(64, 0)
    with pytest.raises(ValueError, match=r"signs must have shape \(96,\)"):
        th.hadamard_transform(torch.zeros(2, 96), signs, 32)
    with pytest.raises(ValueError, match="block 48 must be a power of two"):
        th.hadamard_transform(torch.zeros(2, 96), rot.random_signs(96, 0), 48)
    with pytest.raises(ValueError, match="non-empty floating-point"):
        th.hadamard_transform(torch.zeros(2, 64, dtype=torch.int32), signs, 64)


def test_without_the_interpreter_cpu_tensors_take_the_cpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(3, 128)
    signs = rot.random_signs(128, 2)
    assert not th.uses_kernel(x)
    assert torch.equal(th.hadamard_transform(x, signs, 32), rot.rotate(x, signs, 32))
