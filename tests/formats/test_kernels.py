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


@settings(max_examples=100, deadline=None)
@given(data=inputs(), name=st.sampled_from(ALL), seed=st.integers(0, 2**32 - 1))
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


# ---- packed decode: bytes -> dense rows ------------------------------------------------------------------
def reference_decode(fmt: formats.Format, data: torch.Tensor, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The definition of `decode_packed`: ``decode(unpack(...))`` in torch ops."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("VIDQUANT_NO_KERNELS", "1")
        return fmt.decode(fmt.unpack(data, (n, k), -1, dtype))


def assert_packed_bits(got: torch.Tensor, expected: torch.Tensor, whole_blocks: bool) -> None:
    """Every bit, NaN included: the kernels gather bit patterns that torch's own ``Tensor.to`` wrote, and FP8 / INT
    hand a NaN product back to the torch path. One exception, torch's own: converting a *strided* tensor, which the
    reference does when it drops a row's padded tail (``[:, :k]``), writes the bf16 NaN 0x7FC0 where a contiguous
    one gets 0xFFFF (and fp16 drops a NaN's payload, keeping its sign). With whole blocks nothing is relaxed."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    int_view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[got.dtype]
    a, b = got.view(int_view), expected.view(int_view)
    if whole_blocks or got.dtype == torch.float32:
        assert torch.equal(a, b), f"{(a != b).sum()} patterns differ"
        return
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(a[~nan], b[~nan])
    if got.dtype == torch.float16:
        assert torch.equal(got[nan].signbit(), expected[nan].signbit())


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(ALL), dtype=st.sampled_from(DTYPES), rows=st.integers(1, 5), k=st.integers(1, 200),
       real=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_decode_packed_equals_decode_of_unpack(name: str, dtype: torch.dtype, rows: int, k: int, real: bool,
                                               seed: int) -> None:
    """Random bytes (every code, NaN/Inf scales and codes, out-of-range nibbles) and real encodings, any shape."""
    fmt = formats.get(name)
    rng = np.random.default_rng(seed)
    if real:
        x = torch.from_numpy(rng.standard_normal((rows, k)).astype(f32) * np.exp2(rng.integers(-8, 8, (rows, 1))))
        data = fmt.pack(fmt.encode(x.to(dtype)))
    else:
        data = torch.from_numpy(rng.integers(0, 256, fmt.packed_nbytes(rows, k), dtype=np.uint8))
    got = fmt.decode_packed(data, rows, k, dtype)
    assert_packed_bits(got, reference_decode(fmt, data, rows, k, dtype), k == fmt.padded(k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ALL)
def test_decode_packed_every_scale_and_code(name: str, dtype: torch.dtype) -> None:
    """Rows of random bytes, whole blocks, long enough to span several kernel tasks, with every byte value in
    every position of a block (each scale byte with every code), bit for bit; and one thread gives the same."""
    fmt = formats.get(name)
    k = 2 * SEGMENT + 128
    data = torch.from_numpy(np.random.default_rng(ALL.index(name)).integers(0, 256, fmt.packed_nbytes(64, k),
                                                                            dtype=np.uint8))
    if name == "nvfp4":
        data[-4:] = torch.tensor([0, 0, 0x80, 0x3F], dtype=torch.uint8)  # a tensor scale of 1; random ones below
    got = fmt.decode_packed(data, 64, k, dtype)
    assert_packed_bits(got, reference_decode(fmt, data, 64, k, dtype), whole_blocks=True)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = fmt.decode_packed(data, 64, k, dtype)
    finally:
        numba.set_num_threads(threads)
    assert torch.equal(single, got) or bits_equal(single, got)


def test_decode_packed_nan_and_inf_codes_keep_their_bits() -> None:
    """The codes whose decode is NaN or Inf: HiF8 0x80 / 0x6F / 0xEF, a HiF4 unit with the NaN scale (both signs of
    its elements), FP8's NaN bytes and a NaN fp32 scale, in every dtype, against the torch path's exact bits."""
    cases = {"hif8": torch.tensor([0x80, 0x6F, 0xEF, 0x00, 0x01] * 64, dtype=torch.uint8)}
    hif4 = torch.zeros(36 * 2, dtype=torch.uint8)
    hif4[:32] = torch.arange(32, dtype=torch.uint8) * 8 + 0x87  # both nibble signs
    hif4[32], hif4[36 + 32] = 0xFF, 0x3C  # unit 0: the NaN scale; unit 1: a finite one
    cases["hif4"] = hif4
    fp8 = torch.tensor([0x7F, 0xFF, 0x01, 0x80] * 16 + [0, 0, 0xC0, 0x7F], dtype=torch.uint8)  # NaN codes, scale 1.5
    cases["fp8_e4m3"] = fp8
    nan_scale = fp8.clone()
    nan_scale[-4:] = torch.tensor([1, 0, 0xC0, 0xFF], dtype=torch.uint8)  # a negative NaN scale with a payload
    cases["fp8_e5m2"] = nan_scale
    for name, data in cases.items():
        fmt = formats.get(name)
        k = 64 if name != "hif8" else 320
        for dtype in DTYPES:
            got = fmt.decode_packed(data, data.numel() // fmt.packed_nbytes(1, k), k, dtype)
            expected = reference_decode(fmt, data, got.shape[0], k, dtype)
            assert torch.isnan(expected).any()
            assert_packed_bits(got, expected, whole_blocks=True)


def test_decode_packed_refuses_bad_input() -> None:
    fmt = formats.get("hif4")
    data = fmt.pack(fmt.encode(torch.randn(4, 128)))
    with pytest.raises(ValueError, match=r"hif4: packed data has 287 bytes, expected 288 for 4 rows of 128"):
        fmt.decode_packed(data[:-1], 4, 128)
    with pytest.raises(ValueError, match="expected 216 for 3 rows of 128"):
        fmt.decode_packed(data, 3, 128)
    with pytest.raises(ValueError, match="flat uint8"):
        fmt.decode_packed(data.view(torch.int8), 4, 128)
    with pytest.raises(ValueError, match="at least one row"):
        fmt.decode_packed(data, 0, 128)
    with pytest.raises(ValueError, match="dtype"):
        fmt.decode_packed(data, 4, 128, torch.float64)
