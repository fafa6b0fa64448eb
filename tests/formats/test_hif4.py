"""HiF4 against an independent per-unit oracle written from docs/formats.md, plus properties."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vidquant import formats
from vidquant.formats import bits_equal, hif4

FMT = formats.get("hif4")
f32 = np.float32


def bf16(v) -> np.float32:
    return f32(ml_dtypes.bfloat16(f32(v)))


def oracle_unit(x: np.ndarray) -> np.ndarray:
    """Steps 1-8 of formats.md for one unit of 64 fp32 values, literally, in numpy fp32."""
    a = np.abs(x).astype(f32)
    m4 = a.reshape(16, 4).max(1)
    m8 = m4.reshape(8, 2).max(1)
    m64 = m8.max()
    sf = bf16(np.clip(f32(m64 * bf16(1 / 7)), f32(2.0**-48), f32(49152)))
    e = math.floor(math.log2(sf))
    s = f32(np.round(sf * f32(2.0 ** (2 - e))) * f32(2.0 ** (e - 2)))
    r = bf16(f32(1) / s)
    eb = (m8 * r >= 4).astype(np.int32)
    ec = ((m4 * r) / f32(2.0) ** eb.repeat(2) >= 2).astype(np.int32)
    p = eb.repeat(8) + ec.repeat(4)
    t = (a / f32(2.0) ** p) * r
    c = np.minimum(np.floor(f32(4) * t + f32(0.5)), f32(7))
    return np.where(np.signbit(x), f32(-1), f32(1)) * (c / 4) * f32(2.0) ** p * s


def oracle(x: torch.Tensor) -> torch.Tensor:
    rows = x.float().reshape(-1, x.shape[-1]).numpy()
    k = rows.shape[1]
    padded = np.zeros((rows.shape[0], -(-k // 64) * 64), f32)
    padded[:, :k] = rows
    out = np.stack([oracle_unit(u) for u in padded.reshape(-1, 64)]).reshape(padded.shape)[:, :k]
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(x.shape).to(x.dtype)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert bits_equal(a, b), f"{a} vs {b}"


def torch_path(x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv("VIDQUANT_NO_KERNELS", "1")
        return FMT.quantize_dequantize(x)


def heavy_tailed(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Gaussian rows with per-unit scales over 2^-40..2^20, spikes and exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.exp2(torch.randint(-40, 20, (*shape[:-1], -(-shape[-1] // 64)), generator=g).float()
                       ).repeat_interleave(64, -1)[..., : shape[-1]]
    x = x * torch.where(torch.rand(shape, generator=g) < 0.01, 50.0, 1.0)
    x = x * (torch.rand(shape, generator=g) > 0.05)
    return x.to(dtype)


# ---- hand-worked units -------------------------------------------------------------------------------
def test_all_zero_unit() -> None:
    enc = FMT.encode(torch.zeros(1, 64, dtype=torch.bfloat16))
    assert enc.meta["scale"].item() == 0x00  # s = 2^-48
    assert not enc.codes.any() and not enc.meta["eb"].any() and not enc.meta["ec"].any()
    assert not FMT.decode(enc).any()


def test_one_spike() -> None:
    # M64 = 1: sf = bf16(1 * 0.142578125) = 0.142578125 = 1.140625 * 2^-3; RNE(4.5625) = 5, so
    # s = 5 * 2^-5 = 0.15625 (E6M2 byte (45 << 2) | 1); r = bf16(6.4) = 6.40625; Eb = Ec = 1;
    # c = floor(4 * 6.40625 / 4 + 0.5) = 6, value = 6/4 * 4 * 0.15625 = 0.9375.
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, 0] = 1.0
    enc = FMT.encode(x)
    assert enc.meta["scale"].item() == (45 << 2) | 1
    assert enc.meta["eb"][0, 0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert enc.meta["ec"][0, 0, :2].tolist() == [1, 0]
    assert enc.codes[0, 0].item() == 6
    assert FMT.quantize_dequantize(x)[0, 0].item() == 0.9375


def test_thresholds_of_eb_and_ec() -> None:
    # Unit max 7: sf = bf16(0.998046875) = 1.0 (tie to even), so s = 1 and r = 1 exactly.
    x = torch.zeros(1, 64)
    x[0, 0] = 7.0
    x[0, 8], x[0, 16] = 4.0, 3.984375  # Eb threshold M8 * r >= 4: at it, and one bf16 step below
    x[0, 12] = 4.0  # sub-block 3 shares Eb = 1 with sub-block 2: Ec iff M4 * r / 2 >= 2: at it
    x[0, 20] = 3.96875  # sub-block 5, Eb = 0 (its 8-block max is 3.984375): Ec iff M4 >= 2
    x[0, 24], x[0, 28] = 2.0, 1.9921875  # sub-blocks 6 and 7 (Eb = 0): at the Ec threshold, below
    x = x.to(torch.bfloat16)
    enc = FMT.encode(x)
    assert hif4.scale_value(enc.meta["scale"]).item() == 1.0
    assert enc.meta["eb"][0, 0, :4].tolist() == [1, 1, 0, 0]
    assert enc.meta["ec"][0, 0, :8].tolist() == [1, 0, 1, 1, 1, 1, 1, 0]
    y = FMT.quantize_dequantize(x)[0]
    # 3.984375, 3.96875 and 1.9921875 saturate at 7/4 * 2^(Eb+Ec)
    assert [y[i].item() for i in (0, 8, 12, 16, 20, 24, 28)] == [7.0, 4.0, 4.0, 3.5, 3.5, 2.0, 1.75]
    assert_bits_equal(y, oracle(x)[0])


def test_unit_above_the_largest_value_saturates() -> None:
    x = torch.tensor([[1e6, -5e5, 344064.0, 100.0] + [0.0] * 60], dtype=torch.bfloat16)
    enc = FMT.encode(x)
    assert enc.meta["scale"].item() == 0xFE  # 49152, the largest scale
    y = FMT.quantize_dequantize(x)[0]
    assert y[:3].tolist() == [344064.0, -344064.0, 344064.0]  # 7 * 49152
    assert_bits_equal(y, oracle(x)[0])


def test_short_tail_is_zero_padded() -> None:
    x = heavy_tailed((3, 70), seed=1)
    padded = torch.nn.functional.pad(x, (0, 58))
    assert_bits_equal(FMT.quantize_dequantize(x), FMT.quantize_dequantize(padded)[:, :70])
    assert FMT.pack(FMT.encode(x)).numel() == 3 * 2 * 36
    x1 = heavy_tailed((1, 5), seed=2)
    assert_bits_equal(FMT.quantize_dequantize(x1), oracle(x1))


def test_nan_poisons_its_unit_only() -> None:
    x = heavy_tailed((2, 128), seed=3)
    x[0, 70] = float("nan")
    enc = FMT.encode(x)
    assert enc.meta["scale"][0, 1].item() == hif4.SCALE_NAN
    y = FMT.quantize_dequantize(x)
    assert torch.isnan(y[0, 64:]).all() and not torch.isnan(y[0, :64]).any() and not torch.isnan(y[1]).any()
    assert_bits_equal(FMT.decode(enc), y)


def test_inf_saturates() -> None:
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, 0], x[0, 1] = float("inf"), float("-inf")
    y = FMT.quantize_dequantize(x)[0]
    assert y[:2].tolist() == [344064.0, -344064.0]


# ---- bit-exactness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_matches_the_oracle(dtype: torch.dtype) -> None:
    x = heavy_tailed((40, 256), seed=4, dtype=torch.float32)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    expected = oracle(x) if dtype != torch.float16 else oracle(x.float()).to(dtype)
    assert_bits_equal(FMT.quantize_dequantize(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_kernel_equals_torch_ops(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    x = heavy_tailed((257, 1000), seed=5, dtype=torch.float32)
    x[7, 100], x[8, 3], x[9, 9] = float("nan"), float("inf"), -0.0
    x[10, :] = torch.tensor(1e-39)  # fp32 subnormals
    x = x.to(dtype)
    fast = FMT.quantize_dequantize(x)
    assert_bits_equal(fast, torch_path(x, monkeypatch))
    assert_bits_equal(fast, FMT.decode(FMT.encode(x)))


def test_every_bf16_magnitude_in_a_fixed_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each finite positive bf16 value next to a unit max of 2^k, for every k: kernel == torch ops."""
    vals = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    n = -(-vals.numel() // 63) * 63
    body = torch.nn.functional.pad(vals, (0, n - vals.numel())).reshape(-1, 63)
    for k in (-30, -1, 0, 7, 15):
        x = torch.cat([torch.full((body.shape[0], 1), 2.0**k, dtype=torch.bfloat16), body], 1)
        assert_bits_equal(FMT.quantize_dequantize(x), torch_path(x, monkeypatch))


def test_reciprocal_table_equals_bf16_of_one_over_s() -> None:
    codes = torch.arange(255, dtype=torch.uint8)
    s = hif4.scale_value(codes)
    assert torch.equal(hif4.scale_code(s), codes)
    r_spec = (1.0 / s).to(torch.bfloat16).float()
    mant = (codes & 3).long()
    e = (codes.long() >> 2) - 48
    r_table = torch.from_numpy(hif4._RECIPROCALS)[mant] * torch.exp2(-e.double()).float()
    assert torch.equal(r_spec, r_table)


# ---- properties ----------------------------------------------------------------------------------------
finite_bf16 = st.floats(-3e5, 3e5, width=32, allow_subnormal=True).map(lambda v: float(bf16(v)))
units = arrays(np.float32, st.integers(1, 200), elements=finite_bf16)


@settings(max_examples=200, deadline=None)
@given(units)
def test_properties(values: np.ndarray) -> None:
    x = torch.from_numpy(values).reshape(1, -1).to(torch.bfloat16)
    y = FMT.quantize_dequantize(x)
    # sign symmetry, bit for bit
    assert_bits_equal(FMT.quantize_dequantize(-x), -y)
    # error bound: within a unit, at most 1/8 of its max magnitude (E6M2 rounding + element rounding), plus
    # half the smallest step 2^-50 (0.25 x the smallest scale 2^-48) for units below the scale's range
    xp = torch.nn.functional.pad(x.float(), (0, -x.shape[1] % 64)).reshape(-1, 64)
    yp = torch.nn.functional.pad(y.float(), (0, -x.shape[1] % 64)).reshape(-1, 64)
    assert ((yp - xp).abs() <= 0.13 * xp.abs().amax(1, keepdim=True) + 2.0**-51).all()
    # the element rounding is a projection: dequantized values re-round to themselves
    enc = FMT.encode(x)
    s = hif4.scale_value(enc.meta["scale"]).unsqueeze(-1)
    r = (1.0 / s).to(torch.bfloat16).float()
    eb, ec = enc.meta["eb"].float(), enc.meta["ec"].float()
    c = (enc.codes.reshape(1, -1, 64) & 7).float()
    back = hif4.round_elements(hif4.element_values(c, s, eb, ec), r, eb, ec)
    assert torch.equal(back, c)
    # codes, bytes and values round-trip
    enc2 = FMT.unpack(FMT.pack(enc), tuple(x.shape), -1, torch.bfloat16)
    assert torch.equal(enc2.codes, enc.codes)
    assert all(torch.equal(enc2.meta[k], enc.meta[k]) for k in enc.meta)
    assert_bits_equal(FMT.decode(enc2), y)
    assert_bits_equal(y, oracle(x))


def test_full_quantize_dequantize_is_not_idempotent() -> None:
    """Re-quantizing recomputes the scale from the dequantized max: v14 is not a projection."""
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, 0] = 1.0
    once = FMT.quantize_dequantize(x)
    assert once[0, 0].item() == 0.9375 and FMT.quantize_dequantize(once)[0, 0].item() == 0.875


def test_layout_along_other_dims() -> None:
    x = heavy_tailed((3, 130, 5), seed=6).float()
    y = FMT.quantize_dequantize(x, dim=1)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_bits_equal(y, FMT.quantize_dequantize(x.transpose(1, 2).contiguous()).transpose(1, 2))
    enc = FMT.encode(x, dim=1)
    assert FMT.pack(enc).numel() == 15 * 3 * 36
    assert_bits_equal(FMT.decode(FMT.unpack(FMT.pack(enc), x.shape, 1, x.dtype)), y)
