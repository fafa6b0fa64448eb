"""FP8 E4M3/E5M2 element grids and the per-row-scaled FP8 formats against ml_dtypes, plus properties."""

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
from vidquant.formats.elements import E4M3, E5M2, ElementGrid

NAMES = ["fp8_e4m3", "fp8_e5m2"]
GRIDS = {"E4M3": (E4M3, ml_dtypes.float8_e4m3fn), "E5M2": (E5M2, ml_dtypes.float8_e5m2)}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
f32 = np.float32


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert bits_equal(a, b), f"{a} vs {b}"


def ml_codes(v: np.ndarray, grid: ElementGrid, ml: type) -> torch.Tensor:
    """ml_dtypes' RNE codes, saturated (clipping first is the same: max_value is the top grid point)."""
    return torch.from_numpy(np.clip(v, -grid.max_value, grid.max_value).astype(ml).view(np.uint8))


def grid_midpoints(ml: type) -> np.ndarray:
    """Exact midpoints of neighbouring finite magnitudes, their fp32 neighbours, both signs."""
    values = np.arange(256, dtype=np.uint8).view(ml).astype(f32)
    grid = np.unique(np.abs(values[np.isfinite(values)]))
    mids = ((grid[1:] + grid[:-1]) / 2).astype(f32)
    near = np.concatenate([mids, np.nextafter(mids, f32(0)), np.nextafter(mids, f32(1e6))])
    return np.concatenate([near, -near]).astype(f32)


# ---- the element grids ------------------------------------------------------------------------------
@pytest.mark.parametrize("element", GRIDS)
def test_rne_matches_ml_dtypes_on_every_bf16_value(element: str) -> None:
    grid, ml = GRIDS[element]
    v = torch.arange(-(2**15), 2**15, dtype=torch.int16).view(torch.bfloat16).float()
    v = v[torch.isfinite(v)]
    assert torch.equal(grid.quantize(v), ml_codes(v.numpy(), grid, ml))


@pytest.mark.parametrize("element", GRIDS)
def test_rne_matches_ml_dtypes_on_midpoints_and_random_fp32(element: str) -> None:
    grid, ml = GRIDS[element]
    rng = np.random.default_rng(5)
    random = (rng.standard_normal(50_000) * np.exp2(rng.integers(-24, 18, 50_000))).astype(f32)
    v = np.concatenate([grid_midpoints(ml), random])
    assert torch.equal(grid.quantize(torch.from_numpy(v)), ml_codes(v, grid, ml))


@pytest.mark.parametrize("element", GRIDS)
def test_saturation(element: str) -> None:
    grid, _ = GRIDS[element]
    top = grid.code(torch.tensor(grid.max_value)).item()
    v = torch.tensor([grid.max_value * 1.1, -1e30, 3e38, -grid.max_value])
    assert grid.quantize(v).tolist() == [top, top | 0x80, top, top | 0x80]


@pytest.mark.parametrize("element", GRIDS)
def test_decodes_every_code_like_ml_dtypes(element: str) -> None:
    grid, ml = GRIDS[element]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = torch.from_numpy(codes.numpy().view(ml).astype(f32))
    assert_bits_equal(grid.value(codes), expected)


# ---- hand-worked rows ------------------------------------------------------------------------------
def test_e4m3_rows() -> None:
    """amax 896 -> scale 2: 896 -> 448 (0x7E), 34 -> 17 ties to 16, -0 keeps its sign; zero row -> scale 1."""
    fmt = formats.get("fp8_e4m3")
    x = torch.tensor([[896.0, 34.0, -0.0, -2.0**-9], [0.0, 0.0, 0.0, 0.0]])
    enc = fmt.encode(x)
    assert enc.meta["scale"].tolist() == [[2.0], [1.0]]
    assert enc.codes.tolist() == [[0x7E, 0x58, 0x80, 0x80], [0, 0, 0, 0]]
    assert_bits_equal(fmt.decode(enc), torch.tensor([[896.0, 32.0, -0.0, -0.0], [0.0, 0.0, 0.0, 0.0]]))
    data = fmt.pack(enc)
    assert data.tolist() == [0x7E, 0x58, 0x80, 0x80, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0x80, 0x3F]


def test_e5m2_row() -> None:
    """amax 4 * 57344 -> scale 4: 30720 ties between 28672 and 32768 and goes to 32768 (even)."""
    fmt = formats.get("fp8_e5m2")
    x = torch.tensor([[4 * 57344.0, 4 * 30720.0, -3.0]])
    enc = fmt.encode(x)
    assert enc.meta["scale"].tolist() == [[4.0]]
    assert_bits_equal(fmt.decode(enc), torch.tensor([[4 * 57344.0, 4 * 32768.0, -3.0]]))
    assert enc.codes[0].tolist() == [0x7B, 0x78, 0xBA]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_input_is_an_error(name: str, bad: float) -> None:
    x = torch.ones(2, 8)
    x[0, 1] = bad
    with pytest.raises(ValueError, match=name):
        formats.get(name).encode(x)


# ---- against the numpy oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_oracle(name: str, dtype: torch.dtype) -> None:
    fmt = formats.get(name)
    grid, ml = GRIDS[fmt.element]
    g = torch.Generator().manual_seed(6)
    lo, hi = (-12, 12) if dtype == torch.float16 else (-60, 60)
    x = torch.randn(64, 100, generator=g) * torch.exp2(torch.randint(lo, hi, (64, 1), generator=g).float())
    x = x.to(dtype)
    x[3] = 0
    rows = x.float().numpy()
    scale = np.abs(rows).max(-1, keepdims=True) / f32(grid.max_value)
    scale = np.where(scale > 0, scale, f32(1))
    codes = ml_codes(rows / scale, grid, ml)
    enc = fmt.encode(x)
    assert torch.equal(enc.codes, codes) and torch.equal(enc.meta["scale"], torch.from_numpy(scale))
    expected = torch.from_numpy(codes.numpy().view(ml).astype(f32) * scale).to(dtype)
    assert_bits_equal(fmt.quantize_dequantize(x), expected)


# ---- properties ------------------------------------------------------------------------------------
@st.composite
def tame(draw: st.DrawFn) -> torch.Tensor:
    """Values 0 or +-[1, 256) times one power of two (no fp32 subnormal or overflowing scale)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 40)))
    magnitude = st.one_of(st.just(0.0), st.floats(1, 256, exclude_max=True, width=32))
    sign = draw(arrays(f32, shape, elements=st.sampled_from([-1.0, 1.0])))
    values = draw(arrays(f32, shape, elements=magnitude)) * sign
    power = draw(st.integers(-6, 6) if dtype == torch.float16 else st.integers(-60, 60))
    return torch.from_numpy(values * f32(2.0**power)).to(dtype)


@settings(max_examples=60, deadline=None)
@given(x=tame(), name=st.sampled_from(NAMES))
def test_grid_error_and_requantization(x: torch.Tensor, name: str) -> None:
    """Re-encoding keeps the codes; qdq is idempotent on bf16/fp16 (an fp32 scale may move by an ulp)."""
    fmt = formats.get(name)
    grid, ml = GRIDS[fmt.element]
    enc = fmt.encode(x)
    y = fmt.decode(enc)
    s = enc.meta["scale"]
    q = torch.from_numpy((y.float() / s).numpy().astype(ml).astype(f32))
    assert_bits_equal((q * s).to(y.dtype), y)
    amax = x.float().abs().amax(-1, keepdim=True)
    bound = 0.07 if fmt.element == "E4M3" else 0.13  # half a step (2^-4 / 2^-3) plus the output rounding
    assert ((y.float() - x.float()).abs() <= bound * amax).all()
    assert torch.equal(fmt.encode(y).codes, enc.codes)
    if x.dtype != torch.float32:
        assert_bits_equal(fmt.quantize_dequantize(y), y)


# ---- per tensor ------------------------------------------------------------------------------------
def test_per_tensor_rows_share_the_tensor_scale() -> None:
    """amax 896 over the tensor -> scale 2 for both rows: the small row loses what a per-row scale keeps."""
    fmt = formats.get("fp8_e4m3_tensor")
    x = torch.tensor([[896.0, 34.0, -0.0, -2.0**-9], [2.0**-9, 0.0, 0.0, 0.0]])
    enc = fmt.encode(x)
    assert enc.meta["scale"].tolist() == [[2.0], [2.0]]
    assert enc.codes.tolist() == [[0x7E, 0x58, 0x80, 0x80], [0, 0, 0, 0]]
    per_row = formats.get("fp8_e4m3").quantize_dequantize(x)
    assert per_row[1, 0] == 2.0**-9 and fmt.quantize_dequantize(x)[1, 0] == 0
    data = fmt.pack(enc)
    assert data.tolist() == [0x7E, 0x58, 0x80, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x40]
    assert fmt.packed_nbytes(2, 4) == 12
    assert_bits_equal(fmt.decode(fmt.unpack(data, (2, 4), -1, torch.float32)), fmt.decode(enc))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_matches_the_oracle(dtype: torch.dtype) -> None:
    fmt = formats.get("fp8_e4m3_tensor")
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 16, 40, generator=g) * torch.exp2(torch.randint(-8, 8, (3, 16, 1), generator=g).float()))
    x = x.to(dtype)
    values = x.float().numpy()
    scale = f32(np.abs(values).max() / f32(448.0))
    codes = ml_codes(values / scale, E4M3, ml_dtypes.float8_e4m3fn)
    expected = torch.from_numpy(codes.numpy().view(ml_dtypes.float8_e4m3fn).astype(f32) * scale).to(dtype)
    assert_bits_equal(fmt.quantize_dequantize(x), expected)
    enc = fmt.encode(x)
    data = fmt.pack(enc)
    assert data.numel() == 3 * 16 * 40 + 4
    assert_bits_equal(fmt.decode_packed(data, 48, 40, dtype), expected.reshape(48, 40))


def test_per_tensor_pack_refuses_rows_with_other_scales() -> None:
    fmt = formats.get("fp8_e4m3_tensor")
    enc = formats.get("fp8_e4m3").encode(torch.tensor([[1.0, 2.0], [4.0, 8.0]]))
    with pytest.raises(ValueError, match="share one tensor scale"):
        fmt.pack(type(enc)("fp8_e4m3_tensor", enc.codes, enc.meta, enc.shape, enc.dim, enc.dtype))
