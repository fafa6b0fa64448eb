"""MX formats and the E2M1 element grid against independent oracles (ml_dtypes, numpy), plus properties."""

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
from vidquant.formats.elements import E2M1
from vidquant.formats.mx import e8m0_value

NAMES = ["mxfp4", "mxfp4_sim", "mxfp8", "mxfp8_e5m2"]
ML_DTYPE = {"E2M1": ml_dtypes.float4_e2m1fn, "E4M3": ml_dtypes.float8_e4m3fn, "E5M2": ml_dtypes.float8_e5m2}
E2M1_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
f32 = np.float32


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert bits_equal(a, b), f"{a} vs {b}"


def finite_bf16_patterns() -> torch.Tensor:
    """Every finite bfloat16 value, as fp32."""
    v = torch.arange(-(2**15), 2**15, dtype=torch.int16).view(torch.bfloat16).float()
    return v[torch.isfinite(v)]


def e2m1_midpoints() -> np.ndarray:
    """Exact midpoints of neighbouring E2M1 magnitudes, their fp32 neighbours, both signs."""
    mids = ((E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2).astype(f32)
    near = np.concatenate([mids, np.nextafter(mids, f32(0)), np.nextafter(mids, f32(10)), [f32(7), f32(6.5)]])
    return np.concatenate([near, -near]).astype(f32)


def rha_e2m1(v: np.ndarray) -> np.ndarray:
    """Nearest E2M1 value, ties away from zero, computed exactly in float64."""
    a = np.abs(v.astype(np.float64))
    d = np.abs(a[..., None] - E2M1_GRID)
    idx = len(E2M1_GRID) - 1 - np.argmin(d[..., ::-1], axis=-1)
    return np.copysign(E2M1_GRID[idx], v).astype(f32)


def mx_oracle(x: torch.Tensor, name: str) -> torch.Tensor:
    """docs/formats.md MX steps, literally, in numpy (frexp for floor(log2), ml_dtypes for the RNE grid)."""
    fmt = formats.get(name)
    rows = x.float().numpy()
    k = rows.shape[-1]
    padded = np.zeros((rows.shape[0], -(-k // 32) * 32), f32)
    padded[:, :k] = rows
    blocks = padded.reshape(rows.shape[0], -1, 32)
    finite = np.isfinite(blocks).all(-1)
    blocks = np.where(finite[..., None], blocks, f32(0))
    amax = np.abs(blocks).max(-1)
    emax = {"E2M1": 2, "E4M3": 8, "E5M2": 15}[fmt.element]
    e = np.clip(np.where(amax > 0, np.frexp(amax)[1] - 1 - emax, -127), -127, 127)
    scale = np.ldexp(1.0, e)[..., None]
    v = (blocks / scale).astype(f32)
    if name == "mxfp4_sim":
        q = rha_e2m1(v)
    else:  # saturate first: ml_dtypes turns E4M3/E5M2 overflow into NaN/Inf
        v = np.clip(v, -fmt.grid.max_value, fmt.grid.max_value)
        q = v.astype(ML_DTYPE[fmt.element]).astype(f32)
    out = (q * scale).astype(f32)
    out[~finite] = np.nan
    return torch.from_numpy(out.reshape(padded.shape)[:, :k].copy()).to(x.dtype)


# ---- the E2M1 element grid --------------------------------------------------------------------------
def test_e2m1_rne_matches_ml_dtypes_on_every_bf16_value() -> None:
    v = finite_bf16_patterns()
    expected = torch.from_numpy(v.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8))
    assert torch.equal(E2M1.quantize(v), expected)


def test_e2m1_rne_matches_ml_dtypes_on_midpoints_and_random_fp32() -> None:
    rng = np.random.default_rng(0)
    random = (rng.standard_normal(50_000) * np.exp2(rng.integers(-6, 4, 50_000))).astype(f32)
    v = np.concatenate([e2m1_midpoints(), random])
    expected = torch.from_numpy(v.astype(ml_dtypes.float4_e2m1fn).view(np.uint8))
    assert torch.equal(E2M1.quantize(torch.from_numpy(v)), expected)


def test_e2m1_ties_away_matches_exact_rounding() -> None:
    v = np.concatenate([finite_bf16_patterns().numpy(), e2m1_midpoints()[:7], -e2m1_midpoints()[:7]])
    got = E2M1.value(E2M1.quantize(torch.from_numpy(v), ties="away"))
    assert_bits_equal(got, torch.from_numpy(rha_e2m1(v)))


def test_ties_away_is_floor_half_in_fp32() -> None:
    """round_half computes RHA as floor(v + 0.5) in fp32: one fp32 value below 0.25 rounds up with it."""
    below = torch.nextafter(torch.tensor([0.25, 0.75, 2.5]), torch.tensor(0.0))
    assert E2M1.value(E2M1.quantize(below, ties="away")).tolist() == [0.5, 0.5, 2.0]


def test_e2m1_decodes_every_code_like_ml_dtypes() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    expected = codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(f32)
    assert_bits_equal(E2M1.value(codes), torch.from_numpy(expected))


def test_e8m0_values() -> None:
    codes = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8)
    got = e8m0_value(codes)
    expected = torch.tensor([2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127], dtype=torch.float64).float()
    assert_bits_equal(got[:-1], expected)
    assert torch.isnan(got[-1])


# ---- hand-worked blocks -----------------------------------------------------------------------------
TIE_BLOCK = [7.0, 4.0, 0.25, 0.75, 1.25, 2.5, 5.0, -2.5, -0.25, 3.5, 0.0, -0.0, 0.1] + [0.0] * 19


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mxfp4", [6, 4, 0, 1, 1, 2, 4, -2, -0.0, 4, 0, -0.0, 0]),
        ("mxfp4_sim", [6, 4, 0.5, 1, 1.5, 3, 6, -3, -0.5, 4, 0, -0.0, 0]),
    ],
)
def test_mxfp4_block_with_ties(name: str, expected: list[float]) -> None:
    """amax 7 -> X = 2^(2-2) = 1; 7 saturates to 6; the ties go to even or away from zero."""
    fmt = formats.get(name)
    x = torch.tensor([TIE_BLOCK])
    enc = fmt.encode(x)
    assert enc.meta["scale"].tolist() == [[127]]
    assert_bits_equal(fmt.decode(enc)[0, :13], torch.tensor(expected))
    magnitude = {0: 0, 0.5: 1, 1: 2, 1.5: 3, 2: 4, 3: 5, 4: 6, 6: 7}
    codes = [magnitude[abs(v)] | (8 if np.signbit(v) else 0) for v in expected]
    assert enc.codes[0, :13].tolist() == codes


def test_mxfp4_special_blocks() -> None:
    """Zero block -> E8M0 code 0; NaN/Inf blocks -> 0xFF and all NaN; exponent clamped at -127."""
    fmt = formats.get("mxfp4")
    x = torch.zeros(5, 32)
    x[1, 3], x[1, 4] = float("nan"), 1.0
    x[2, 0] = float("-inf")
    x[3, :2] = torch.tensor([3 * 2.0**-130, -(2.0**-131)])
    x[4, :2] = torch.tensor([1.5 * 2.0**127, 2.0**125])
    enc = fmt.encode(x)
    assert enc.meta["scale"].flatten().tolist() == [0, 255, 255, 0, 252]
    assert enc.codes[0].eq(0).all() and enc.codes[1:3].eq(0).all()
    y = fmt.decode(enc)
    assert y[0].eq(0).all() and y[1:3].isnan().all()
    assert_bits_equal(y[3, :2], torch.tensor([2.0**-128, -0.0]))  # X = 2^-127: 0.375 -> 0.5, -0.0625 -> -0
    assert_bits_equal(y[4, :2], torch.tensor([1.5 * 2.0**127, 2.0**125]))


def test_mxfp8_block() -> None:
    """amax 500 -> X = 2^(8-8) = 1: 500 saturates to 448, 17 ties to 16, 19 ties to 20, 300 -> 288."""
    fmt = formats.get("mxfp8")
    x = torch.tensor([[500.0, 17.0, 19.0, 300.0, -0.001953125, 0.0009765625] + [0.0] * 26])
    enc = fmt.encode(x)
    assert enc.meta["scale"].tolist() == [[127]]
    expected = [448.0, 16.0, 20.0, 288.0, -0.001953125, 0.0]
    assert_bits_equal(fmt.decode(enc)[0, :6], torch.tensor(expected))
    assert enc.codes[0, :6].tolist() == [0x7E, 0x58, 0x5A, 0x79, 0x81, 0x00]


def test_mxfp8_e5m2_block() -> None:
    fmt = formats.get("mxfp8_e5m2")
    x = torch.tensor([[1.0, 0.875, 2.0**-31, 0.9375] + [0.0] * 28])
    enc = fmt.encode(x)
    assert enc.meta["scale"].tolist() == [[127 - 15]]
    assert_bits_equal(fmt.decode(enc)[0, :4], torch.tensor([1.0, 0.875, 2.0**-31, 1.0]))


def test_packed_layout() -> None:
    fmt = formats.get("mxfp4")
    x = torch.zeros(1, 40)
    x[0, :3] = torch.tensor([1.0, -0.5, 6.0])
    x[0, 32] = 2.0**-10
    data = fmt.pack(fmt.encode(x))
    assert data.numel() == 2 * 17 == fmt.packed_nbytes(1, 40)
    assert data[:2].tolist() == [0x2 | (0x9 << 4), 0x7] and data[16] == 127
    assert data[17].item() == 0x6 and data[33].item() == 127 - 12


# ---- against the numpy oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_oracle(name: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    lo, hi = (-20, 12) if dtype == torch.float16 else (-30, 30)
    x = torch.randn(64, 100, generator=g) * torch.exp2(torch.randint(lo, hi, (64, 1), generator=g).float())
    x = x.to(dtype)
    x[0, 5] = float("nan")
    x[1, :32] = 0
    x[2, :32] = torch.tensor(TIE_BLOCK) * 2.0**-3
    fmt = formats.get(name)
    assert_bits_equal(fmt.quantize_dequantize(x), mx_oracle(x, name))


# ---- properties ------------------------------------------------------------------------------------
@st.composite
def tame(draw: st.DrawFn) -> torch.Tensor:
    """Values 0 or +-[1, 256) times one power of two: every block's scale is far from the format's ends."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 80)))
    magnitude = st.one_of(st.just(0.0), st.floats(1, 256, exclude_max=True, width=32))
    sign = draw(arrays(f32, shape, elements=st.sampled_from([-1.0, 1.0])))
    values = draw(arrays(f32, shape, elements=magnitude)) * sign
    shift = draw(st.integers(-6, 6) if dtype == torch.float16 else st.integers(-40, 40))
    return torch.from_numpy(values * f32(2.0**shift)).to(dtype)


@settings(max_examples=60, deadline=None)
@given(x=tame(), name=st.sampled_from(NAMES))
def test_grid_idempotence_and_error_bound(x: torch.Tensor, name: str) -> None:
    fmt = formats.get(name)
    y = fmt.quantize_dequantize(x)
    assert_bits_equal(fmt.quantize_dequantize(y), y)
    # on the grid: y / X is an element value (a power-of-two scale divides exactly)
    k = x.shape[-1]
    scale = e8m0_value(fmt.encode(x).meta["scale"]).repeat_interleave(32, dim=-1)[:, :k]
    ratio = (y.float() / scale).numpy()
    assert np.array_equal(ratio.astype(ML_DTYPE[fmt.element]).astype(f32), ratio)
    # error: half the top step, or the saturation gap, is at most amax/4 (E2M1) or amax/8 (FP8)
    padded = torch.nn.functional.pad(x.float().abs(), (0, -k % 32))
    amax = padded.reshape(x.shape[0], -1, 32).amax(-1).repeat_interleave(32, dim=-1)[:, :k]
    bound = 0.25 if fmt.element == "E2M1" else 0.125
    assert ((y.float() - x.float()).abs() <= bound * amax).all()


@pytest.mark.parametrize("name", NAMES)
def test_other_dims_and_padding(name: str) -> None:
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 37, 5, generator=g).to(torch.bfloat16)
    for dim in (0, 1, -1):
        moved = x.movedim(dim, -1)
        expected = fmt.quantize_dequantize(moved.contiguous()).movedim(-1, dim)
        assert_bits_equal(fmt.quantize_dequantize(x, dim=dim), expected)
        enc = fmt.encode(x, dim=dim)
        back = fmt.unpack(fmt.pack(enc), x.shape, dim, x.dtype)
        assert_bits_equal(fmt.decode(back), expected)
    rows = x.reshape(-1, 5 * 37)
    padded = torch.nn.functional.pad(rows, (0, 192 - 185))
    assert_bits_equal(fmt.quantize_dequantize(rows), fmt.quantize_dequantize(padded)[:, :185])
