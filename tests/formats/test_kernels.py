"""Every format's fused CPU kernel against its torch-ops path (the reference), bit for bit.

The torch ops stay the definition (any device runs them); the numba kernels serve `quantize_dequantize` (and
`decode`) on the CPU. For every registered format they must agree on every input the torch path accepts, and
raise the same error where it raises, whatever the dtype, the dim, the tail and the number of threads.
"""

from __future__ import annotations

import re

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vidquant import formats
from vidquant.formats import bits_equal
from vidquant.formats.kernels import SEGMENT

ALL = formats.names()
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# the formats whose torch path raises on Inf/NaN (MX marks the block NaN, HiF4 the unit, HiF8 the value)
RAISING = {n for n in ALL if n.startswith(("nvfp4", "fp8", "int"))}
f32 = np.float32


def torch_ops(fmt: formats.Format, x: torch.Tensor, dim: int) -> torch.Tensor:
    with pytest.MonkeyPatch.context() as m:
        m.setenv("VIDQUANT_NO_KERNELS", "1")
        return fmt.quantize_dequantize(x, dim)


def assert_same(fmt: formats.Format, x: torch.Tensor, dim: int) -> None:
    """The kernel's result equals the torch path's bit for bit, or both raise the same ValueError."""
    try:
        expected = torch_ops(fmt, x, dim)
    except ValueError as e:
        with pytest.raises(ValueError, match=f"^{re.escape(str(e))}$"):
            fmt.quantize_dequantize(x, dim)
        return
    got = fmt.quantize_dequantize(x, dim)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert bits_equal(got, expected), f"{fmt.name} {x.dtype} dim={dim}: {(got != expected).sum()} values differ"


# ---- 16-bit patterns -----------------------------------------------------------------------------------
def some_patterns(dtype: torch.dtype, finite: bool, seed: int, rows: int = 16) -> torch.Tensor:
    """``rows`` x 96 distinct bf16 / fp16 bit patterns, drawn at random from all 65536 (whole blocks of 16, 32 and
    32 + a tail of 32). The torch path is slow on them (fp32 subnormal arithmetic), so each case draws its own."""
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    if finite:
        v = v[torch.isfinite(v)]
    v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(seed))]
    return v[: rows * 96].reshape(rows, 96)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ALL)
def test_16_bit_patterns(name: str, dtype: torch.dtype) -> None:
    """Patterns next to random block-mates, then next to one large outlier per 7 (ties, subnormals, zeros)."""
    fmt = formats.get(name)
    x = some_patterns(dtype, finite=name in RAISING, seed=ALL.index(name) + 100 * DTYPES.index(dtype))
    assert_same(fmt, x, -1)
    spiked = x.clone()
    spiked[:, ::7] = torch.tensor(1000.0 if dtype == torch.float16 else 3e9, dtype=dtype)
    assert_same(fmt, spiked, -1)
    assert_same(fmt, spiked[:, :45], -1)  # tails


def test_random_fp32_bit_patterns() -> None:
    """fp32 inputs: uniformly random bit patterns (every exponent, subnormals) and their finite part."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, size=(16, 200), dtype=np.uint32)
    x = torch.from_numpy(bits.view(f32))
    finite = torch.where(torch.isfinite(x), x, 0.0)
    for name in ALL:
        fmt = formats.get(name)
        assert_same(fmt, x, -1)
        assert_same(fmt, finite, -1)
        assert_same(fmt, finite * 2.0**-100, 0)  # fp32-subnormal scales and amaxes


# ---- ties ----------------------------------------------------------------------------------------------
def unit_scale_anchor(fmt: formats.Format) -> tuple[float, float]:
    """(anchor, unit): a block amax that makes the scale exactly ``unit``, so that ``x / scale`` is ``x / unit``."""
    if fmt.name.startswith("int"):
        return float(fmt.qmax), 1.0  # s = qmax / qmax
    if fmt.name == "nvfp4":
        return 6.0 * 448.0, 448.0  # g = 1, b = 448
    if fmt.name == "nvfp4_sim":
        return 6.0, 1.0
    return fmt.grid.max_value, 1.0  # MX: X = 2^(emax - emax); FP8: amax / max


@pytest.mark.parametrize("name", [n for n in ALL if not n.startswith("hif")])
def test_ties_and_their_neighbours(name: str) -> None:
    """Every bf16 magnitude up to the anchor (all grid midpoints among them) and its fp32 neighbours, both signs,
    under a unit scale: ties to even / away (`mxfp4_sim`'s floor(v + 0.5) in fp32) exactly as the torch path."""
    fmt = formats.get(name)
    anchor, unit = unit_scale_anchor(fmt)
    v = torch.arange(0x3A80, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()  # 2^-10 up
    v = v[v <= anchor / unit] * unit
    v = torch.cat([v, torch.nextafter(v, torch.zeros(())), torch.nextafter(v, torch.full((), 1e30))])
    v = torch.cat([v, -v])
    v = torch.nn.functional.pad(v, (0, -v.numel() % 60)).reshape(-1, 15)
    x = torch.cat([torch.full((v.shape[0], 1), anchor), v], 1).reshape(-1, 64)  # an anchor in each 16
    assert_same(fmt, x, -1)
    assert_same(fmt, x.to(torch.bfloat16), -1)


# ---- hypothesis: mixed inputs --------------------------------------------------------------------------
RANGE = {torch.bfloat16: (-133, 120), torch.float16: (-24, 14), torch.float32: (-149, 120)}


@st.composite
def inputs(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """A small tensor and a dim: Gaussian and dyadic values (exact ties for power-of-two scales) under per-row
    powers of two over the dtype's whole range (subnormals included), with zeros, -0, outliers, Inf and NaN."""
    dtype = draw(st.sampled_from(DTYPES))
    lo, hi = RANGE[dtype]
    k = draw(st.integers(1, 140))
    rows = draw(st.integers(1, 4))
    dim = draw(st.sampled_from([0, -1]))
    shape = (rows, k)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal(shape)
    dyadic = rng.integers(-64, 65, shape) / 8.0  # multiples of 1/8: the ties of E2M1/E4M3/INT grids and more
    values = np.where(rng.random(shape) < draw(st.floats(0, 1)), dyadic, gauss)
    values *= np.exp2(rng.integers(lo + 10, hi - 6, (rows, 1)))
    special = draw(arrays(np.int8, shape, elements=st.integers(0, 20)))
    values = np.where(special == 1, 0.0, values)
    values = np.where(special == 2, -0.0, values)
    values = np.where(special == 3, np.exp2(rng.integers(lo, lo + 10, shape)) * gauss, values)  # subnormal range
    values = np.where(special == 4, np.exp2(hi) * gauss, values)  # outliers
    if draw(st.booleans()):
        values = np.where(special == 5, draw(st.sampled_from([np.inf, -np.inf, np.nan])), values)
    x = torch.from_numpy(values.astype(f32)).to(dtype)
    if dim == 0:
        x = x.T.contiguous()
    return x, dim


@settings(max_examples=150, deadline=None)
@given(data=inputs(), name=st.sampled_from(ALL))
def test_kernel_equals_torch_ops(data: tuple[torch.Tensor, int], name: str) -> None:
    x, dim = data
    assert_same(formats.get(name), x, dim)


DECODED = [n for n in ALL if not n.startswith("hif8")]  # HiF8 decodes by a table look-up in torch


@settings(max_examples=100, deadline=None)
@given(data=inputs(), name=st.sampled_from(DECODED), seed=st.integers(0, 2**32 - 1))
def test_decode_kernel_equals_torch_ops(data: tuple[torch.Tensor, int], name: str, seed: int) -> None:
    """`decode` of real encodings, and of random code and scale bytes (NaN/Inf codes, out-of-range nibbles)."""
    x, dim = data
    fmt = formats.get(name)
    try:
        enc = fmt.encode(x, dim)
    except ValueError:  # Inf/NaN for the formats that cannot encode them
        return
    rng = np.random.default_rng(seed)

    def random_bytes(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(rng.integers(0, 256, tuple(t.shape), dtype=np.uint8)) if t.dtype == torch.uint8 else t

    noise = formats.Encoded(enc.format, random_bytes(enc.codes), {key: random_bytes(v) for key, v in enc.meta.items()},
                            enc.shape, enc.dim, enc.dtype)
    for e in (enc, noise):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("VIDQUANT_NO_KERNELS", "1")
            expected = fmt.decode(e)
        assert bits_equal(fmt.decode(e), expected)


@pytest.mark.parametrize("name", ALL)
def test_other_layouts(name: str) -> None:
    """A 3-D tensor along each of its dims, and a non-contiguous view."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 70, 5, generator=g) * torch.exp2(torch.randint(-8, 8, (3, 1, 5), generator=g))).half()
    fmt = formats.get(name)
    for dim in (0, 1, 2, -1):
        assert_same(fmt, x, dim)
    assert_same(fmt, x.float().transpose(0, 2)[:, ::2], 1)


# ---- determinism ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_independent_of_the_thread_count(name: str) -> None:
    """Rows longer than a task's segment and more tasks than threads: one thread gives the same bits."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 2 * SEGMENT + 100, generator=g) * torch.exp2(torch.randint(-10, 10, (9, 1), generator=g))
    x = x.to(torch.bfloat16)
    fmt = formats.get(name)
    default = fmt.quantize_dequantize(x)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = fmt.quantize_dequantize(x)
    finally:
        numba.set_num_threads(threads)
    assert bits_equal(single, default)
