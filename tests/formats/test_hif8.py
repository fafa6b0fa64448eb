"""HiF8 against docs/formats.md: the code table, round-to-nearest (ties away), both overflow modes, and the
CPU kernel against the torch-ops path bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidquant import formats
from vidquant.formats.hif8 import HiF8Format

HIF8 = formats.get("hif8")
HIF8_INF = formats.get("hif8_inf")
MODES = pytest.mark.parametrize("fmt", [HIF8, HIF8_INF], ids=["saturate", "inf"])
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

# |E| <= bound -> (dot prefix, exponent field width D, mantissa width), the layout table of formats.md
_ROWS = ((0, "0001", 0, 3), (1, "001", 1, 3), (3, "01", 2, 3), (7, "10", 3, 2), (15, "11", 4, 1))


def _layout_table() -> dict[int, float]:
    """code -> value, built independently by writing every (S, E, mantissa) into the bit fields."""
    table = {0x00: 0.0, 0x80: math.nan, 0x6F: math.inf, 0xEF: -math.inf}
    for m in range(1, 8):  # denormals: dot 0000, value 2^(M-23)
        table[m], table[0x80 | m] = 2.0 ** (m - 23), -(2.0 ** (m - 23))
    for e in range(-15, 16):
        _, dot, d, mw = next(row for row in _ROWS if abs(e) <= row[0])
        magnitude = format(abs(e) - 2 ** (d - 1), f"0{d - 1}b") if d > 1 else ""  # leading 1 implicit
        field = ("1" if e < 0 else "0") + magnitude if d > 0 else ""
        for mant in range(1 << mw):
            bits = dot + field + format(mant, f"0{mw}b")
            assert len(bits) == 7
            code = int(bits, 2)
            if code == 0x6F:  # the Inf slot, where 1.5 * 2^15 would be
                continue
            value = 2.0**e * (1 + mant / (1 << mw))
            table[code], table[0x80 | code] = value, -value
    return table


LAYOUT = _layout_table()
FINITE_GRID = np.array(sorted(v for v in LAYOUT.values() if math.isfinite(v) and v >= 0))  # 0 ... 32768


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


def _assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    diff = (_bits(actual) != _bits(expected)).nonzero()
    if diff.numel():
        first = tuple(diff[0])
        pytest.fail(f"{diff.shape[0]} mismatches, first at {first}: {actual[first]} vs {expected[first]}")


def _oracle(x: np.ndarray, saturate: bool) -> np.ndarray:
    """Nearest HiF8 value, ties away from zero, in fp64; the Inf slot counts as 1.5 * 2^15 in Inf mode."""
    grid = FINITE_GRID if saturate else np.append(FINITE_GRID, 49152.0)
    a = np.abs(x.astype(np.float64))
    i = np.searchsorted(grid, a)
    hi, lo = grid[np.minimum(i, grid.size - 1)], grid[np.maximum(i - 1, 0)]
    with np.errstate(invalid="ignore"):
        q = np.where(hi - a <= a - lo, hi, lo)  # a tie picks hi: away from zero
    q = np.where(q == 49152.0, np.inf, q)
    q = np.where(x < 0, -q, q) + 0.0  # + 0.0: HiF8 has no -0
    return np.where(np.isnan(x), np.nan, q)


@pytest.fixture(params=["kernel", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the numba kernel and through the torch ops (VIDQUANT_NO_KERNELS=1)."""
    if request.param == "torch":
        monkeypatch.setenv("VIDQUANT_NO_KERNELS", "1")
    else:
        monkeypatch.delenv("VIDQUANT_NO_KERNELS", raising=False)
    return request.param


def _qdq_with(fmt: HiF8Format, x: torch.Tensor, kernel: bool, mp: pytest.MonkeyPatch) -> torch.Tensor:
    """``fmt.quantize_dequantize(x)`` through the kernel or through the torch ops."""
    with mp.context() as m:
        m.setenv("VIDQUANT_NO_KERNELS", "0" if kernel else "1")
        return fmt.quantize_dequantize(x)


# ---- the format object and its table ---------------------------------------------------------------
def test_registered_formats() -> None:
    for fmt, saturate in ((HIF8, True), (HIF8_INF, False)):
        assert isinstance(fmt, HiF8Format) and fmt.saturate is saturate
        assert (fmt.bits_per_value, fmt.block_size, fmt.element, fmt.scale) == (8, 1, "HiF8", "none")
        assert fmt.max_value == 32768.0


def test_table_special_codes_and_worked_decodes() -> None:
    t = HIF8.decode_table
    assert t.dtype == torch.float32 and t.shape == (256,)
    assert _bits(t[0x00]).item() == 0  # +0, and there is no -0
    assert torch.isnan(t).nonzero().flatten().tolist() == [0x80]
    assert (t[0x6F].item(), t[0xEF].item()) == (math.inf, -math.inf)
    assert (t[0x6E].item(), t[0xEE].item()) == (32768.0, -32768.0)
    assert t[0x01].item() == 2.0**-22 == t[t > 0].min().item()
    assert t[torch.isfinite(t)].abs().max().item() == 32768.0
    assert (t[0x08].item(), t[0x10].item(), t[0x18].item()) == (1.0, 2.0, 0.5)


def test_table_matches_bit_layout() -> None:
    expected = torch.tensor([LAYOUT[c] for c in range(256)], dtype=torch.float32)
    _assert_bits_equal(HIF8.decode_table, expected)
    _assert_bits_equal(HIF8_INF.decode_table, expected)


def test_table_binades_distinct_and_bf16_exact() -> None:
    t = HIF8.decode_table
    finite = t[torch.isfinite(t) & (t > 0)].double()
    assert sorted(set(torch.floor(torch.log2(finite)).int().tolist())) == list(range(-22, 16))  # 38 binades
    not_nan = t[~torch.isnan(t)]
    assert not_nan.unique().numel() == 255
    _assert_bits_equal(not_nan.to(torch.bfloat16).float(), not_nan)


# ---- rounding ---------------------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_nearest_ties_away_on_random_values(fmt: HiF8Format, dtype: torch.dtype,
                                                        path: str) -> None:
    rng = np.random.default_rng(0)
    x = np.sign(rng.standard_normal(100_000)) * 2.0 ** rng.uniform(-30, 20, 100_000)
    x = torch.from_numpy(x).to(dtype)
    expected = torch.from_numpy(_oracle(x.double().numpy(), fmt.saturate)).to(dtype)
    _assert_bits_equal(fmt.quantize_dequantize(x), expected)


@MODES
def test_quantize_at_midpoints_and_their_neighbours(fmt: HiF8Format, path: str) -> None:
    grid = FINITE_GRID if fmt.saturate else np.append(FINITE_GRID, 49152.0)
    mids = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    assert np.array_equal(mids.astype(np.float64), (grid[:-1] + grid[1:]) / 2)  # midpoints are exact in fp32
    near = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    x = np.concatenate([near, -near])
    expected = torch.from_numpy(_oracle(x.astype(np.float64), fmt.saturate).astype(np.float32))
    _assert_bits_equal(fmt.quantize_dequantize(torch.from_numpy(x)), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflow_saturating_vs_inf_mode(dtype: torch.dtype, path: str) -> None:
    edge = torch.tensor(40960.0, dtype=dtype)
    below = torch.nextafter(edge, torch.zeros_like(edge)).item()  # 40959.996 in fp32
    x = torch.tensor([below, 40960.0, 36864.0, 1e30, math.inf, -math.inf, -40960.0, -below]).to(dtype)
    m = 32768.0
    sat = torch.tensor([m, m, m, m, m, -m, -m, -m]).to(dtype)
    inf = torch.tensor([m, math.inf, m, math.inf, math.inf, -math.inf, -math.inf, -m]).to(dtype)
    _assert_bits_equal(HIF8.quantize_dequantize(x), sat)
    _assert_bits_equal(HIF8_INF.quantize_dequantize(x), inf)


@MODES
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_zero(fmt: HiF8Format, dtype: torch.dtype, path: str) -> None:
    x = torch.tensor([math.nan, -math.nan, -0.0, 0.0, 2.0**-24, -(2.0**-23), -1e-30]).to(dtype)
    y = fmt.quantize_dequantize(x)
    assert torch.isnan(y[:2]).all()
    _assert_bits_equal(y[2:], torch.tensor([0.0, 0.0, 0.0, -(2.0**-22), 0.0]).to(dtype))
    assert fmt.encode(x).codes[0, :2].tolist() == [0x80, 0x80]


# ---- codes ------------------------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_round_trips(fmt: HiF8Format, dtype: torch.dtype) -> None:
    all_codes = torch.arange(256, dtype=torch.uint8)
    values = fmt.decode(fmt.unpack(all_codes, (256,), dtype=dtype))
    _assert_bits_equal(values, HIF8.decode_table.to(dtype))
    codes = fmt.encode(values).codes.flatten()
    expected = all_codes.clone()
    if fmt.saturate:  # +-Inf saturates to +-32768
        expected[0x6F], expected[0xEF] = 0x6E, 0xEE
    assert torch.equal(codes, expected)


@MODES
def test_encode_layout_and_pack_round_trip(fmt: HiF8Format) -> None:
    x = torch.randn(3, 4, 5, dtype=torch.bfloat16) * 100
    enc = fmt.encode(x, dim=1)
    assert enc.codes.dtype == torch.uint8 and enc.codes.shape == (15, 4) and enc.meta == {}
    data = fmt.pack(enc)
    assert data.dtype == torch.uint8 and data.shape == (60,) and fmt.packed_nbytes(15, 4) == 60
    back = fmt.unpack(data, (3, 4, 5), dim=1, dtype=torch.bfloat16)
    assert torch.equal(back.codes, enc.codes) and back.meta == {}
    _assert_bits_equal(fmt.decode(back), fmt.quantize_dequantize(x, dim=1))


# ---- the CPU kernel against the torch ops -----------------------------------------------------------
def _fp32_patterns() -> torch.Tensor:
    """Every high half with low halves 0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, plus random uint32 patterns."""
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = [high | np.uint32(low) for low in (0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF)]
    rng = np.random.default_rng(1)
    bits = np.concatenate([*lows, rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32)])
    return torch.from_numpy(bits.view(np.int32)).view(torch.float32)


def _all_16bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16)).view(dtype)


@MODES
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_torch_ops_bit_for_bit(fmt: HiF8Format, dtype: torch.dtype,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    x = _fp32_patterns() if dtype == torch.float32 else _all_16bit_patterns(dtype)
    fast = _qdq_with(fmt, x, True, monkeypatch)
    _assert_bits_equal(fast, _qdq_with(fmt, x, False, monkeypatch))
    _assert_bits_equal(fast, fmt.decode(fmt.encode(x)))  # the base-class contract for `_qdq_rows`


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", [((7,), -1), ((2, 3, 5), -1), ((2, 3, 5), 0), ((2, 3, 5), 1)])
def test_shape_dtype_and_dim(dtype: torch.dtype, shape: tuple[int, ...], dim: int, path: str) -> None:
    x = (torch.randn(shape) * 10).to(dtype)
    y = HIF8.quantize_dequantize(x, dim=dim)
    assert y.shape == x.shape and y.dtype == dtype
    _assert_bits_equal(y, HIF8.quantize_dequantize(x.flatten()).reshape(shape))  # elementwise: dim is moot
    noncontig = x.transpose(0, -1)
    _assert_bits_equal(HIF8.quantize_dequantize(noncontig), y.transpose(0, -1))


# ---- properties -------------------------------------------------------------------------------------
FLOATS = st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64)


@MODES
@settings(max_examples=150, deadline=None)
@given(values=FLOATS)
def test_idempotent_and_sign_symmetric(fmt: HiF8Format, values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = fmt.quantize_dequantize(x)
    _assert_bits_equal(fmt.quantize_dequantize(y), y)
    neg = fmt.quantize_dequantize(-x)
    _assert_bits_equal(neg, torch.where(y == 0, y, -y))  # 0 has no sign: both sides give +0


@MODES
@settings(max_examples=150, deadline=None)
@given(values=FLOATS)
def test_monotone(fmt: HiF8Format, values: list[float]) -> None:
    x = torch.tensor(sorted(values), dtype=torch.float32)
    y = fmt.quantize_dequantize(x)
    assert bool((y[1:] >= y[:-1]).all())
