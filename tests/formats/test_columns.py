"""GPTQ's column quantizers: entered from the weight and rounded column by column they are `encode`, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vidquant import formats
from vidquant.formats import bits_equal
from vidquant.formats.base import ColumnQuantizer

SUPPORTED = ["hif4", "mxfp4", "mxfp4_sim", "mxfp8", "mxfp8_e5m2", "nvfp4", "nvfp4_sim",
             "int8", "int4", "int8_g64", "int4_g64", "int4_g64_full"]
UNSUPPORTED = ["hif8", "hif8_inf", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3_tensor"]
DTYPES = [torch.bfloat16, torch.float32]


def weight(rows: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian rows with per-row scales over 2^-10..2^10, some exact zeros and a few spikes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-10, 10, (rows, 1), generator=g).float())
    w = w * torch.where(torch.rand(rows, k, generator=g) < 0.02, 20.0, 1.0)
    w = w * (torch.rand(rows, k, generator=g) > 0.05)
    return w.to(dtype)


def round_all(q: ColumnQuantizer, w: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """Enter every block from ``w`` (fp32), round every column (in ``order``); the returned values (R, K)."""
    b = q.block_size
    for block in range(q.n_blocks):
        q.enter(block, w[:, block * b:(block + 1) * b])
    out = torch.empty_like(w)
    for j in order or range(w.shape[1]):
        out[:, j] = q.round(j, w[:, j])
    return out


def assert_same_encoding(a: formats.Encoded, b: formats.Encoded) -> None:
    assert (a.format, a.shape, a.dim, a.dtype) == (b.format, b.shape, b.dim, b.dtype)
    assert torch.equal(a.codes, b.codes)
    assert a.meta.keys() == b.meta.keys()
    for key in a.meta:
        assert a.meta[key].dtype == b.meta[key].dtype and torch.equal(a.meta[key], b.meta[key]), key


def test_supported_formats_are_all_but_the_elementwise_ones() -> None:
    assert sorted(SUPPORTED + UNSUPPORTED) == sorted(formats.names())


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [128, 100])
def test_rounding_every_column_is_encode(name: str, dtype: torch.dtype, k: int) -> None:
    fmt = formats.get(name)
    w = weight(12, k, seed=k, dtype=dtype)
    q = fmt.column_quantizer(w.float())
    values = round_all(q, w.float())
    enc = q.encoded(dtype)
    assert_same_encoding(enc, fmt.encode(w))
    expected = fmt.quantize_dequantize(w)
    assert bits_equal(values.to(dtype), expected)
    assert bits_equal(fmt.decode(enc), expected)
    back = fmt.unpack(fmt.pack(enc), enc.shape, enc.dim, dtype)
    assert bits_equal(fmt.decode(back), expected)


@pytest.mark.parametrize("name", SUPPORTED)
def test_column_order_does_not_matter(name: str) -> None:
    """act_order rounds columns in any order under metadata entered up front: the same codes."""
    fmt = formats.get(name)
    w = weight(6, 100, seed=3)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0)).tolist()
    q = fmt.column_quantizer(w)
    round_all(q, w, order)
    assert_same_encoding(q.encoded(torch.float32), fmt.encode(w))


@pytest.mark.parametrize("name", SUPPORTED)
def test_entered_metadata_is_encode_of_the_block(name: str) -> None:
    """`enter` on values other than the weight's (GPTQ's updated columns, a short last block included)."""
    fmt = formats.get(name)
    w = weight(5, 100, seed=4)
    q = fmt.column_quantizer(w)
    b = q.block_size
    for block in range(q.n_blocks):
        values = weight(5, min(b, 100 - block * b), seed=10 + block)
        if name == "nvfp4":  # the tensor scale is the weight's: make the block hold the weight's amax
            values = values / values.abs().amax() * w.abs().amax()
        q.enter(block, values)
        expected = fmt.encode(values).meta
        for key, meta in q.meta.items():
            got = meta[:, block:block + 1] if key != "tensor_scale" else meta
            assert torch.equal(got, expected[key]), (block, key)


def test_nvfp4_tensor_scale_comes_from_the_constructor_weight() -> None:
    fmt = formats.get("nvfp4")
    w = weight(4, 32, seed=5)
    q = fmt.column_quantizer(w)
    q.enter(0, w[:, :16] * 0.001)
    g = fmt.encode(w).meta["tensor_scale"]
    assert torch.equal(q.meta["tensor_scale"], g)
    assert torch.equal(q.encoded(torch.float32).meta["tensor_scale"], g)


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_per_channel_block_is_the_whole_row(name: str) -> None:
    q = formats.get(name).column_quantizer(weight(3, 70, seed=6))
    assert q.block_size == 70 and q.n_blocks == 1 and q.meta["scale"].shape == (3, 1)


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_formats_say_so(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: GPTQ has no column quantizer"):
        formats.get(name).column_quantizer(weight(2, 64, seed=0))


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(name: str, bad: float) -> None:
    w = weight(2, 64, seed=0)
    w[1, 7] = bad
    with pytest.raises(ValueError, match=f"{name}: the weight contains Inf or NaN"):
        formats.get(name).column_quantizer(w)


def test_misuse_is_a_value_error() -> None:
    q = formats.get("hif4").column_quantizer(weight(2, 100, seed=0))
    with pytest.raises(ValueError, match="2-D"):
        formats.get("hif4").column_quantizer(torch.zeros(64))
    with pytest.raises(ValueError, match="dtype"):
        formats.get("hif4").column_quantizer(torch.zeros(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="before its block 1 was entered"):
        q.round(64, torch.zeros(2))
    with pytest.raises(ValueError, match=r"block 1 needs values of shape \(2, 36\)"):
        q.enter(1, torch.zeros(2, 64))
    with pytest.raises(ValueError, match="block 2 is out of range"):
        q.enter(2, torch.zeros(2, 36))
    with pytest.raises(ValueError, match="Inf or NaN"):
        q.enter(0, torch.full((2, 64), float("nan")))
    q.enter(0, torch.zeros(2, 64))
    with pytest.raises(ValueError, match="column 100 is out of range"):
        q.round(100, torch.zeros(2))
    with pytest.raises(ValueError, match=r"a column has shape \(2,\)"):
        q.round(0, torch.zeros(3))


# ---- property ---------------------------------------------------------------------------------------
@st.composite
def weights(draw: st.DrawFn) -> torch.Tensor:
    """Small weights: values 0 or +-[1, 256) times a per-row power of two, bf16 or fp32."""
    dtype = draw(st.sampled_from(DTYPES))
    rows, k = draw(st.integers(1, 4)), draw(st.integers(1, 150))
    magnitude = st.one_of(st.just(0.0), st.floats(1, 256, exclude_max=True, width=32))
    values = draw(arrays(np.float32, (rows, k), elements=magnitude))
    values *= draw(arrays(np.float32, (rows, k), elements=st.sampled_from([-1.0, 1.0])))
    shifts = draw(arrays(np.int32, (rows, 1), elements=st.integers(-20, 6)))
    return torch.from_numpy(values * np.exp2(shifts).astype(np.float32)).to(dtype)


@settings(max_examples=80, deadline=None)
@given(w=weights(), name=st.sampled_from(SUPPORTED), seed=st.integers(0, 2**16))
def test_encode_property(w: torch.Tensor, name: str, seed: int) -> None:
    fmt = formats.get(name)
    order = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed)).tolist()
    q = fmt.column_quantizer(w.float())
    values = round_all(q, w.float(), order)
    enc = q.encoded(w.dtype)
    assert_same_encoding(enc, fmt.encode(w))
    expected = fmt.quantize_dequantize(w)
    assert bits_equal(values.to(w.dtype), expected) and bits_equal(fmt.decode(enc), expected)
