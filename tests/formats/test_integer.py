"""Symmetric INT8/INT4 (per channel and per 64) against a numpy oracle, plus properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vidquant import formats
from vidquant.formats import bits_equal

NAMES = ["int8", "int4", "int8_g64", "int4_g64", "int4_g64_full"]
GROUPED = ["int8_g64", "int4_g64", "int4_g64_full"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
f32 = np.float32


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert bits_equal(a, b), f"{a} vs {b}"


def int_oracle(x: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """docs/formats.md INT steps in numpy: (codes, scales, quantize-dequantize)."""
    fmt = formats.get(name)
    bits, group = int(fmt.element[3:]), fmt.block_size
    qmax = 2 ** (bits - 1) - 1
    full = name.endswith("_full")  # the GPTQ reference's grid: -qmax - 1 .. qmax, scale amax / (qmax + 1/2)
    qmin, divisor = (-qmax - 1, f32(qmax + 0.5)) if full else (-qmax, f32(qmax))
    rows = x.float().numpy()
    k = rows.shape[-1]
    width = k if group is None else -(-k // group) * group
    padded = np.zeros((rows.shape[0], width), f32)
    padded[:, :k] = rows
    groups = padded.reshape(rows.shape[0], -1, width if group is None else group)
    scale = (np.abs(groups).max(-1) / divisor).astype(f32 if group is None else np.float16)
    s = scale.astype(f32)[..., None]
    q = np.where(s > 0, np.clip(np.round(groups / np.where(s > 0, s, f32(1))), qmin, qmax), f32(0))
    q = q + f32(0)  # an integer code has no -0
    codes = (q.astype(np.int32) & (2**bits - 1)).astype(np.uint8).reshape(padded.shape)
    out = (q * s).astype(f32).reshape(padded.shape)[:, :k]
    return codes, scale, torch.from_numpy(np.ascontiguousarray(out)).to(x.dtype)


# ---- hand-worked rows ------------------------------------------------------------------------------
def test_int8_row() -> None:
    """amax 127 -> scale 1: 63.5 -> 64 and 62.5 -> 62 (ties to even), -0.5 -> 0, -1.5 -> -2."""
    fmt = formats.get("int8")
    enc = fmt.encode(torch.tensor([[127.0, 63.5, 62.5, -0.5, -1.5, 0.2]]))
    assert enc.meta["scale"].tolist() == [[1.0]]
    assert enc.codes.tolist() == [[0x7F, 0x40, 0x3E, 0x00, 0xFE, 0x00]]
    assert fmt.decode(enc).tolist() == [[127.0, 64.0, 62.0, 0.0, -2.0, 0.0]]
    assert fmt.pack(enc).tolist() == [0x7F, 0x40, 0x3E, 0x00, 0xFE, 0x00, 0, 0, 0x80, 0x3F]


def test_int4_row_with_odd_length() -> None:
    fmt = formats.get("int4")
    enc = fmt.encode(torch.tensor([[7.0, 2.5, 3.5, -7.0, -0.5, 1.5, 5.0]]))
    assert enc.codes.tolist() == [[0x7, 0x2, 0x4, 0x9, 0x0, 0x2, 0x5]]
    assert fmt.decode(enc).tolist() == [[7.0, 2.0, 4.0, -7.0, 0.0, 2.0, 5.0]]
    data = fmt.pack(enc)
    assert data.tolist() == [0x27, 0x94, 0x20, 0x05, 0, 0, 0x80, 0x3F] and fmt.packed_nbytes(1, 7) == 8


def test_int4_full_range_row() -> None:
    """The GPTQ reference's grid: scale fp16(1 / 7.5); -amax -> -8 (code 0x8), +amax -> 7.5 -> 8 -> clamped to 7."""
    fmt = formats.get("int4_g64_full")
    x = torch.zeros(1, 64)
    x[0, :4] = torch.tensor([-1.0, 1.0, 0.5, -0.2])
    enc = fmt.encode(x)
    s = torch.tensor(1.0 / 7.5).half().float().item()
    assert enc.meta["scale"].float().item() == s
    assert enc.codes[0, :4].tolist() == [0x8, 0x7, 0x4, 0xE]  # -8, 7, 4 (0.5 / s = 3.75), -2 (-1.5 -> -2)
    assert fmt.decode(enc)[0, :4].tolist() == [-8 * s, 7 * s, 4 * s, -2 * s]
    assert fmt.pack(enc)[:2].tolist() == [0x78, 0xE4]
    assert fmt.bits_per_value == formats.get("int4_g64").bits_per_value == 4.25
    assert fmt.packed_nbytes(3, 100) == formats.get("int4_g64").packed_nbytes(3, 100)


def test_int4_full_range_has_less_error_than_plus_minus_7() -> None:
    """One more level for the same bits: about 0.4 dB less error on Gaussian weights (the peers' baseline)."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(11))

    def error_db(name: str) -> float:
        return 10 * math.log10(float((formats.get(name).quantize_dequantize(w) - w).square().sum() / w.square().sum()))

    assert 0.3 < error_db("int4_g64") - error_db("int4_g64_full") < 0.6


def test_groups_divide_by_the_rounded_fp16_scale() -> None:
    """A value exactly at a tie of x / fp16(scale) but not of x / fp32(scale) rounds as the fp16 one says."""
    fmt = formats.get("int8_g64")
    s32 = torch.tensor(1.0) / torch.tensor(127.0)
    s16 = s32.half().float()
    half_way = 2.5 if s16 > s32 else 3.5  # fp32 scale would give 3 either way
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1] = 1.0, half_way * s16
    enc = fmt.encode(x)
    assert enc.meta["scale"].dtype == torch.float16 and enc.meta["scale"].float().item() == s16.item()
    assert enc.codes[0, 1].item() == round(half_way)
    assert fmt.decode(enc)[0, 1].item() == round(half_way) * s16.item()
    scale_bits = enc.meta["scale"].view(torch.int16).item()
    assert fmt.pack(enc)[64:66].tolist() == list(scale_bits.to_bytes(2, "little"))


@pytest.mark.parametrize("name", NAMES)
def test_zero_and_underflowing_groups(name: str) -> None:
    fmt = formats.get(name)
    x = torch.zeros(2, 70)
    x[1] = -3 * 2.0**-149 if fmt.block_size is None else -1e-10  # amax / qmax rounds to 0 (fp32, fp16)
    enc = fmt.encode(x)
    assert enc.meta["scale"].eq(0).all() and enc.codes.eq(0).all()
    assert fmt.decode(enc).eq(0).all()


@pytest.mark.parametrize(("name", "big"), [("int8_g64", 1e7), ("int4_g64", 5e5), ("int4_g64_full", 5e5)])
def test_fp16_scale_overflow_is_an_error(name: str, big: float) -> None:
    x = torch.ones(2, 64)
    x[1, 7] = big
    with pytest.raises(ValueError, match=f"{name}.*fp16"):
        formats.get(name).encode(x)
    assert torch.isfinite(formats.get(name[:4]).quantize_dequantize(x)).all()  # fp32 per-channel scales cope


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_an_error(name: str, bad: float) -> None:
    x = torch.ones(2, 64)
    x[1, 0] = bad
    with pytest.raises(ValueError, match=name):
        formats.get(name).encode(x)


# ---- against the numpy oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_oracle(name: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(8)
    lo, hi = (-12, 10) if dtype == torch.float16 or name in GROUPED else (-60, 60)
    x = torch.randn(64, 100, generator=g) * torch.exp2(torch.randint(lo, hi, (64, 1), generator=g).float())
    x = x.to(dtype)
    x[4] = 0
    codes, scale, expected = int_oracle(x, name)
    fmt = formats.get(name)
    enc = fmt.encode(x)
    assert np.array_equal(enc.codes.numpy(), codes) and np.array_equal(enc.meta["scale"].numpy(), scale)
    assert_bits_equal(fmt.quantize_dequantize(x), expected)


# ---- properties ------------------------------------------------------------------------------------
@st.composite
def tame(draw: st.DrawFn, name: str) -> torch.Tensor:
    """Values 0 or +-[1, 256) times one power of two that keeps fp16 group scales normal and finite."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 140)))
    magnitude = st.one_of(st.just(0.0), st.floats(1, 256, exclude_max=True, width=32))
    sign = draw(arrays(f32, shape, elements=st.sampled_from([-1.0, 1.0])))
    values = draw(arrays(f32, shape, elements=magnitude)) * sign
    lo, hi = (-6, 6) if dtype == torch.float16 else (-6, 10) if name in GROUPED else (-60, 60)
    return torch.from_numpy(values * f32(2.0 ** draw(st.integers(lo, hi)))).to(dtype)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(NAMES))
def test_grid_error_and_idempotence(data: st.DataObject, name: str) -> None:
    """Per-channel fp32 scales may move an ulp on re-encoding fp32 input, so there the codes are compared."""
    fmt = formats.get(name)
    x = data.draw(tame(name))
    qmax = 2 ** (int(fmt.element[3:]) - 1) - 1
    full = name.endswith("_full")
    enc = fmt.encode(x)
    y = fmt.decode(enc)
    k = x.shape[-1]
    group = fmt.block_size or k
    s = enc.meta["scale"].float().repeat_interleave(group, dim=-1)[:, :k]
    q = torch.round(torch.where(s > 0, y.float() / s, 0.0))
    assert q.max() <= qmax and q.min() >= (-qmax - 1 if full else -qmax)
    assert_bits_equal((q * s).to(y.dtype), y)
    padded = torch.nn.functional.pad(x.float().abs(), (0, -k % group))
    amax = padded.reshape(x.shape[0], -1, group).amax(-1).repeat_interleave(group, dim=-1)[:, :k]
    # full range: +amax clamps to qmax s = amax (1 - 1 / 15) / (1 + d), d the fp16 scale's rounding (< 2^-11),
    # an error of amax / 15 (1 + 14 d) at most
    bound = amax * (0.5 / fmt.divisor) * (1 + (2.0**-6 if full else 2.0**-10)) + EPS[x.dtype] * y.float().abs()
    assert ((y.float() - x.float()).abs() <= bound).all()
    if full:  # a group at -amax decodes to -(qmax + 1) s: re-encoding takes a larger scale (not idempotent)
        return
    assert torch.equal(fmt.encode(y).codes, enc.codes)
    if x.dtype != torch.float32 or name in GROUPED:
        assert_bits_equal(fmt.quantize_dequantize(y), y)


@pytest.mark.parametrize("name", NAMES)
def test_tail_is_zero_padded(name: str) -> None:
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 29, 5, generator=g).to(torch.bfloat16)
    if fmt.block_size:
        rows = x.reshape(-1, 145)
        padded = torch.nn.functional.pad(rows, (0, 192 - 145))
        assert_bits_equal(fmt.quantize_dequantize(rows), fmt.quantize_dequantize(padded)[:, :145])
