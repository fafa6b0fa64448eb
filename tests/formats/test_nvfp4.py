"""NVFP4 (with and without the FP32 tensor scale) against a numpy + ml_dtypes oracle, plus properties."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vidquant import formats
from vidquant.formats import bits_equal

NAMES = ["nvfp4", "nvfp4_sim"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
f32 = np.float32


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert bits_equal(a, b), f"{a} vs {b}"


def e4m3(v: np.ndarray) -> np.ndarray:
    """RNE onto E4M3, saturating at 448 (clipping first is the same: 448 is the top grid point)."""
    return np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(f32)


def nvfp4_oracle(x: torch.Tensor, tensor_scale: bool) -> torch.Tensor:
    """docs/formats.md NVFP4 steps, literally, in numpy fp32 with ml_dtypes for both RNE roundings."""
    rows = x.float().numpy()
    k = rows.shape[-1]
    padded = np.zeros((rows.shape[0], -(-k // 16) * 16), f32)
    padded[:, :k] = rows
    blocks = padded.reshape(rows.shape[0], -1, 16)
    amax = np.abs(blocks).max(-1)
    g = f32(amax.max() / f32(6 * 448)) if tensor_scale else f32(1)
    g = g if g > 0 else f32(1)
    s = (e4m3(amax / f32(6) / g) * g)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(s > 0, blocks / s, blocks * f32(0)).astype(f32)
    q = v.astype(ml_dtypes.float4_e2m1fn).astype(f32)  # ml_dtypes saturates E2M1 at 6
    out = (q * s).astype(f32).reshape(padded.shape)[:, :k]
    return torch.from_numpy(np.ascontiguousarray(out)).to(x.dtype)


# ---- hand-worked blocks -----------------------------------------------------------------------------
def hand_row() -> torch.Tensor:
    x = torch.zeros(1, 56)
    x[0, :5] = torch.tensor([2688.0, 1120.0, 224.0, 112.0, -1568.0])
    x[0, 16:21] = torch.tensor([6.0, 5.0, 0.75, -0.0, 1.25])
    x[0, 32:34] = torch.tensor([1e-4, -5e-5])
    x[0, 48:51] = torch.tensor([0.3, 0.1, -0.2])
    return x


@pytest.mark.parametrize("name", NAMES)
def test_hand_worked_blocks(name: str) -> None:
    """amax 2688 -> g = 1; block scales 448, 1, 0 (1e-4/6 < 2^-10) and E4M3(0.05) = 1.625 * 2^-5."""
    fmt = formats.get(name)
    enc = fmt.encode(hand_row())
    assert enc.meta["scale"].tolist() == [[0x7E, 0x38, 0x00, 0x15]]
    y = fmt.decode(enc)[0]
    assert_bits_equal(y[:5], torch.tensor([2688.0, 896.0, 224.0, 0.0, -1792.0]))  # ties 2.5, .25, 3.5
    assert_bits_equal(y[16:21], torch.tensor([6.0, 4.0, 1.0, -0.0, 1.0]))  # ties 5, 0.75, 1.25 to even
    assert_bits_equal(y[32:34], torch.tensor([0.0, -0.0]))
    assert_bits_equal(y[48:51], torch.tensor([0.3046875, 0.1015625, -0.203125]))
    assert enc.codes[0, :5].tolist() == [0x7, 0x4, 0x1, 0x0, 0xE]
    data = fmt.pack(enc)
    assert data.numel() == fmt.packed_nbytes(1, 56) == 4 * 9 + (4 if name == "nvfp4" else 0)
    assert data[:3].tolist() == [0x7 | 0x4 << 4, 0x1, 0xE] and data[8].item() == 0x7E
    if name == "nvfp4":
        assert enc.meta["tensor_scale"].tolist() == [[1.0]]
        assert data[-4:].tolist() == [0x00, 0x00, 0x80, 0x3F]


def test_tensor_scale_spans_all_rows() -> None:
    fmt = formats.get("nvfp4")
    x = torch.tensor([[1.0] * 16, [300.0] * 16])
    enc = fmt.encode(x)
    expected_g = torch.tensor(300.0) / torch.tensor(2688.0)
    assert torch.equal(enc.meta["tensor_scale"], expected_g.expand(2, 1))
    assert not torch.equal(fmt.quantize_dequantize(x)[:1], fmt.quantize_dequantize(x[:1]))


def test_zero_and_underflowing_tensors() -> None:
    """amax 0, or amax / 2688 rounding to 0 in fp32: g = 1 is stored and everything decodes to 0."""
    fmt = formats.get("nvfp4")
    for x in (torch.zeros(2, 20), torch.full((2, 20), -(2.0**-140))):
        enc = fmt.encode(x)
        assert enc.meta["tensor_scale"].eq(1.0).all() and enc.meta["scale"].eq(0).all()
        assert_bits_equal(fmt.decode(enc), x * 0)


def test_subnormal_tensor_scale() -> None:
    """amax 2^-130 gives a subnormal g (195 * 2^-149); the fp32 steps still run as written, with no NaN."""
    fmt = formats.get("nvfp4")
    x = torch.zeros(1, 48)
    x[0, 0], x[0, 16], x[0, 17], x[0, 32] = 2.0**-130, 2.0**-147, -(2.0**-148), 2.0**-149
    enc = fmt.encode(x)
    assert enc.meta["tensor_scale"].view(torch.int32).item() == 195
    y = fmt.decode(enc)
    assert torch.isfinite(y).all()
    assert_bits_equal(y, nvfp4_oracle(x, tensor_scale=True))


def test_sim_saturates_without_a_tensor_scale() -> None:
    fmt = formats.get("nvfp4_sim")
    x = torch.tensor([[1e4, -3000.0, 100.0] + [0.0] * 13])
    enc = fmt.encode(x)
    assert enc.meta["scale"].tolist() == [[0x7E]]
    assert fmt.decode(enc)[0, :3].tolist() == [2688.0, -2688.0, 0.0]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_an_error(name: str, bad: float) -> None:
    x = torch.ones(2, 16)
    x[1, 3] = bad
    with pytest.raises(ValueError, match=name):
        formats.get(name).encode(x)


def test_pack_rejects_mixed_tensor_scales() -> None:
    fmt = formats.get("nvfp4")
    enc = fmt.encode(torch.ones(2, 16))
    enc.meta["tensor_scale"][1] = 2.0
    with pytest.raises(ValueError, match="tensor scale"):
        fmt.pack(enc)


# ---- against the numpy oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_oracle(name: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    lo, hi = (-12, 4) if dtype == torch.float16 else (-14, 14) if name == "nvfp4_sim" else (-30, 30)
    x = torch.randn(64, 100, generator=g) * torch.exp2(torch.randint(lo, hi, (64, 1), generator=g).float())
    x = x.to(dtype)
    x[2, :56] = hand_row()[0] * 2.0**-3
    fmt = formats.get(name)
    assert_bits_equal(fmt.quantize_dequantize(x), nvfp4_oracle(x, name == "nvfp4"))
    assert_bits_equal(fmt.quantize_dequantize(x[:1]), nvfp4_oracle(x[:1], name == "nvfp4"))


# ---- properties ------------------------------------------------------------------------------------
@st.composite
def tame(draw: st.DrawFn, shift: bool) -> torch.Tensor:
    """Values 0 or +-[1, 256), optionally times one power of two: every block scale is a normal E4M3."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 50)))
    magnitude = st.one_of(st.just(0.0), st.floats(1, 256, exclude_max=True, width=32))
    sign = draw(arrays(f32, shape, elements=st.sampled_from([-1.0, 1.0])))
    values = draw(arrays(f32, shape, elements=magnitude)) * sign
    power = draw(st.integers(-6, 6) if dtype == torch.float16 else st.integers(-40, 40)) if shift else 0
    return torch.from_numpy(values * f32(2.0**power)).to(dtype)


def _grid_and_error(x: torch.Tensor, y: torch.Tensor, meta: dict[str, torch.Tensor]) -> None:
    """y = dtype(q * (b * g)) with q on the E2M1 grid, and |y - x| <= amax_block / 4."""
    k = x.shape[-1]
    b = torch.from_numpy(meta["scale"].numpy().view(ml_dtypes.float8_e4m3fn).astype(f32))
    s = b * meta["tensor_scale"] if "tensor_scale" in meta else b
    s = s.repeat_interleave(16, dim=-1)[:, :k]
    ratio = torch.where(s > 0, y.float() / s, y.float())  # a zero scale leaves +-0
    q = torch.from_numpy(ratio.numpy().astype(ml_dtypes.float4_e2m1fn).astype(f32))
    assert_bits_equal((q * s).to(y.dtype), y)
    padded = torch.nn.functional.pad(x.float().abs(), (0, -k % 16))
    amax = padded.reshape(x.shape[0], -1, 16).amax(-1).repeat_interleave(16, dim=-1)[:, :k]
    assert ((y.float() - x.float()).abs() <= 0.25 * amax).all()


@settings(max_examples=60, deadline=None)
@given(x=tame(shift=True))
def test_nvfp4_grid_error_and_requantization(x: torch.Tensor) -> None:
    """Re-encoding gives the same codes; the fp32 tensor scale may move by an ulp, so fp32 values may too."""
    fmt = formats.get("nvfp4")
    enc = fmt.encode(x)
    y = fmt.decode(enc)
    _grid_and_error(x, y, enc.meta)
    again = fmt.encode(y)
    assert torch.equal(again.codes, enc.codes) and torch.equal(again.meta["scale"], enc.meta["scale"])
    if x.dtype != torch.float32:
        assert_bits_equal(fmt.quantize_dequantize(y), y)


@settings(max_examples=60, deadline=None)
@given(x=tame(shift=False))
def test_nvfp4_sim_grid_error_and_idempotence(x: torch.Tensor) -> None:
    fmt = formats.get("nvfp4_sim")
    enc = fmt.encode(x)
    y = fmt.decode(enc)
    _grid_and_error(x, y, enc.meta)
    assert_bits_equal(fmt.quantize_dequantize(y), y)


@pytest.mark.parametrize("name", NAMES)
def test_tail_is_zero_padded(name: str) -> None:
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 21, 5, generator=g).to(torch.bfloat16)
    rows = x.reshape(-1, 105)
    padded = torch.nn.functional.pad(rows, (0, 112 - 105))
    assert_bits_equal(fmt.quantize_dequantize(rows), fmt.quantize_dequantize(padded)[:, :105])
