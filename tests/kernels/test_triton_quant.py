"""The Triton kernels (run in Triton's CPU interpreter) against the torch-ops path of `vidquant.formats`.

Activation quantize-dequantize must equal ``fmt.quantize_dequantize`` with ``VIDQUANT_NO_KERNELS=1`` bit for bit.
The GEMMs must equal ``qdq(x) @ decode(W)^T`` up to fp32 accumulation-order rounding, with this bound:

    The kernel sums the K products x_k * w_k in fp32 in some order (tiles of 64, tl.dot inside a tile). Every
    operand is exact in fp32 (x is converted exactly, w is the exact fp32 decode), so each output is a
    floating-point sum of K exact reals, each product rounded at most once (not at all inside an FMA) and each
    path through the summation tree holding at most K - 1 additions. The standard bound (Higham, Accuracy and
    Stability, 3.1/3.5) gives |out - sum_k x_k w_k| <= gamma_K * sum_k |x_k| |w_k|, gamma_K = K u / (1 - K u),
    u = 2^-24, for any summation order. The float64 reference adds at most gamma_K(2^-53) * sum |x_k||w_k|, so
    the tests allow (gamma_K(2^-24) + gamma_K(2^-53)) * sum_k |x_k| |w_k| per output. Products that fall into
    fp32's subnormal range (a row of W near 2^-126 below) round with an absolute error of up to 2^-150 each instead
    (sums of subnormals are exact), which adds (1 + gamma_K) * K * 2^-150. (A GPU whose tensor-core accumulator
    truncates instead of rounding to nearest needs u = 2^-23; the interpreter rounds to nearest.)

Decoding one weight element wrongly by one code step moves an output by about |x_k w_k| / 4, about 1/(4K) of
sum |x||w|, which is far above gamma_K for the K used here, so the bound does catch wrong dequantization.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("triton")

from vidquant import formats  # noqa: E402
from vidquant.formats import bits_equal  # noqa: E402
from vidquant.kernels import triton_quant as tq  # noqa: E402

NAMES = list(tq.SPECS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U32, U64 = 2.0**-24, 2.0**-53
UNDERFLOW = 2.0**-150  # half the smallest fp32 subnormal: the absolute error of a product that underflows

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on Inf arithmetic in the interpreter


@pytest.fixture(autouse=True, scope="module")
def _interpreter() -> Iterator[None]:
    """Triton's interpreter for this module; the flag must be set before the kernels are first wrapped (`_triton`)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The references below run the torch ops (the definition), not the numba kernels."""
    monkeypatch.setenv("VIDQUANT_NO_KERNELS", "1")


def planted(rows: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with an outlier, a zero unit, -0, tiny values and a row scaled far up and down (rows >= 5,
    k > 70)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * 2
    x[0, 3] = 300.0
    x[1, :64] = 0.0
    x[1, 70] = -0.0
    x[2, 5:9] = torch.tensor([1e-6, -3e-7, 2.5e-8, 0.0])
    x[3] *= 2.0**-20
    x[4] *= 2.0**12
    return x.to(dtype)


def reference(name: str, x: torch.Tensor) -> torch.Tensor:
    return formats.get(name).quantize_dequantize(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_qdq_bit_exact(name: str, dtype: torch.dtype, torch_path: None) -> None:
    x = planted(6, 200, dtype)  # 200: a tail that is no multiple of 16, 32 or 64
    assert tq.uses_kernel(x)
    out = tq.quantize_dequantize(x, name)
    assert out.shape == x.shape and out.dtype == dtype
    assert bits_equal(out, reference(name, x))


@pytest.mark.parametrize("name", NAMES)
def test_qdq_batched_shape(name: str, torch_path: None) -> None:
    x = planted(6, 96, torch.bfloat16, seed=1).reshape(2, 3, 96)
    assert bits_equal(tq.quantize_dequantize(x, name), reference(name, x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qdq_rounding_ties(dtype: torch.dtype, torch_path: None) -> None:
    """Values on grid midpoints under many per-row scales: the tie rules (RNE / away) decide them."""
    g = torch.Generator().manual_seed(2)
    scale = 2.0 ** torch.randint(-12, 12, (16, 1), generator=g).float()
    x = ((torch.randint(-64, 64, (16, 128), generator=g).float() / 8 + 1 / 16) * scale).to(dtype)
    for name in NAMES:
        assert bits_equal(tq.quantize_dequantize(x, name), reference(name, x)), name


def test_qdq_wide_fp32_range(torch_path: None) -> None:
    """fp32 values over the whole exponent range, fp32 subnormals included (not NVFP4: one tensor scale)."""
    g = torch.Generator().manual_seed(3)
    e = torch.randint(-149, 127, (32, 128), generator=g).float()
    x = (torch.rand(32, 128, generator=g) * 2 - 1) * 2.0**e
    tiny = torch.randint(-149, -118, (8, 128), generator=g).float()  # whole blocks near / below 2^-126:
    x[:8] = (torch.rand(8, 128, generator=g) * 2 - 1) * 2.0**tiny  # MX's scale clamps to 2^-127, HiF4's to 2^-48
    for name in ("hif4", "mxfp4", "mxfp4_sim", "hif8", "hif8_inf"):
        assert bits_equal(tq.quantize_dequantize(x, name), reference(name, x)), name


@pytest.mark.parametrize("scale", [2.0**-140, 2.0**-126, 2.0**-100, 1.0, 2.0**100])
def test_qdq_nvfp4_tensor_scale_extremes(scale: float, torch_path: None) -> None:
    x = torch.randn(4, 80, generator=torch.Generator().manual_seed(4)) * scale
    for name in ("nvfp4", "nvfp4_sim"):
        assert bits_equal(tq.quantize_dequantize(x, name), reference(name, x)), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_qdq_specials(dtype: torch.dtype, torch_path: None) -> None:
    """NaN / Inf: HiF4 units and MX blocks turn NaN, HiF8 maps them itself; NVFP4 raises like the torch path."""
    x = planted(6, 130, torch.float32, seed=5)
    x[0, 5], x[1, 64], x[2, 100] = float("nan"), float("inf"), -float("inf")
    x = x.to(dtype)
    for name in NAMES:
        if name.startswith("nvfp4"):
            with pytest.raises(ValueError, match="Inf or NaN"):
                reference(name, x)
            with pytest.raises(ValueError, match="Inf or NaN"):
                tq.quantize_dequantize(x, name)
        else:
            assert bits_equal(tq.quantize_dequantize(x, name), reference(name, x)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qdq_every_16_bit_pattern(dtype: torch.dtype, torch_path: None) -> None:
    """All 65536 bf16 / fp16 bit patterns (NaN, Inf, subnormals): in order for HiF8 (elementwise), and shuffled
    into units for HiF4 so that each pattern meets varied neighbours."""
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 256)
    for name in ("hif8", "hif8_inf"):
        assert bits_equal(tq.quantize_dequantize(patterns, name), reference(name, patterns)), name
    shuffled = patterns.reshape(-1)[torch.randperm(65536, generator=torch.Generator().manual_seed(6))].reshape(-1, 256)
    assert bits_equal(tq.quantize_dequantize(shuffled, "hif4"), reference("hif4", shuffled))


def test_qdq_accepts_format_objects_and_rejects_bad_arguments() -> None:
    x = planted(6, 130, torch.float32)
    assert bits_equal(tq.quantize_dequantize(x, formats.get("mxfp4")), tq.quantize_dequantize(x, "mxfp4"))
    with pytest.raises(ValueError, match="^fmt: "):
        tq.quantize_dequantize(x, "int8")
    with pytest.raises(ValueError, match="^x: "):
        tq.quantize_dequantize(x.double(), "hif4")
    with pytest.raises(ValueError, match="^x: "):
        tq.quantize_dequantize(torch.zeros(0, 64), "hif4")


# ---- GEMMs ------------------------------------------------------------------------------------------------------
def gemm_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(gamma_K(2^-24) + gamma_K(2^-53)) * sum_k |x_k| |w_k| (module docstring), float64 (M, N)."""
    k = x.shape[-1]
    gamma = k * U32 / (1 - k * U32) + k * U64 / (1 - k * U64)
    return gamma * (x.double().abs() @ w.double().abs().T) + (1 + gamma) * k * UNDERFLOW


def weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[1, 7] = 2.0  # an outlier unit
    w[2, :64] = 0.0  # an all-zero unit
    w[3] *= 2.0**-126  # a row of fp32 subnormals after rounding: MX's smallest E8M0 scale 2^-127 (code 0)
    return w


def check_gemm(out: torch.Tensor, xq: torch.Tensor, w: torch.Tensor) -> None:
    ref = xq.double() @ w.double().T
    err = (out.double() - ref).abs()
    bound = gemm_bound(xq, w)
    assert bool((err <= bound).all()), f"max err/bound {(err / bound.clamp(min=1e-300)).max().item()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_dequant_linear(name: str, dtype: torch.dtype, torch_path: None) -> None:
    fmt = formats.get(name)
    m, n, k = 20, 40, 150  # two row tiles of 16, a K tail of 22
    x = planted(m, k, dtype, seed=7)
    packed = fmt.pack(fmt.encode(weight(n, k, seed=8)))
    w = fmt.decode(fmt.unpack(packed, (n, k), dtype=torch.float32))
    out = tq.dequant_linear(x, packed, (n, k), name, out_dtype=torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    check_gemm(out, x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_qdq_linear(name: str, dtype: torch.dtype, torch_path: None) -> None:
    """W4A4 / W8A8 simulated: x is quantize-dequantized per token inside the kernel (its values in x's dtype)."""
    fmt = formats.get(name)
    m, n, k = 20, 40, 150
    x = planted(m, k, dtype, seed=9)
    packed = fmt.pack(fmt.encode(weight(n, k, seed=10)))
    w = fmt.decode(fmt.unpack(packed, (n, k), dtype=torch.float32))
    out = tq.qdq_linear(x, packed, (n, k), name, out_dtype=torch.float32)
    check_gemm(out, reference(name, x), w)


def test_qdq_linear_mixed_formats_and_output_dtypes(torch_path: None) -> None:
    """HiF4 weights with HiF8 activations; bf16 / fp16 outputs are the fp32 accumulator rounded to nearest even."""
    fmt = formats.get("hif4")
    x = planted(5, 130, torch.bfloat16, seed=11).reshape(5, 1, 130)
    packed = fmt.pack(fmt.encode(weight(24, 130, seed=12)))
    w = fmt.decode(fmt.unpack(packed, (24, 130), dtype=torch.float32))
    out32 = tq.qdq_linear(x, packed, (24, 130), "hif4", act="hif8", out_dtype=torch.float32)
    assert out32.shape == (5, 1, 24)
    check_gemm(out32.reshape(5, 24), reference("hif8", x).reshape(5, 130), w)
    for dtype in (torch.bfloat16, torch.float16):
        out = tq.qdq_linear(x, packed, (24, 130), "hif4", act="hif8", out_dtype=dtype)
        assert bits_equal(out, out32.to(dtype))
    assert tq.qdq_linear(x, packed, (24, 130), "hif4").dtype == torch.bfloat16  # default: x's dtype


def test_linear_rejects_bad_arguments() -> None:
    fmt = formats.get("hif4")
    x = torch.randn(3, 64)
    packed = fmt.pack(fmt.encode(torch.randn(8, 64)))
    with pytest.raises(ValueError, match="^x: last dim"):
        tq.dequant_linear(torch.randn(3, 32), packed, (8, 64), "hif4")
    with pytest.raises(ValueError, match="^packed: "):
        tq.dequant_linear(x, packed[:-1], (8, 64), "hif4")
    with pytest.raises(ValueError, match="^packed: "):
        tq.dequant_linear(x, packed.float(), (8, 64), "hif4")
    with pytest.raises(ValueError, match="^weight_shape: "):
        tq.dequant_linear(x, packed, (8, 64, 1), "hif4")
    with pytest.raises(ValueError, match="^fmt: "):
        tq.dequant_linear(x, packed, (8, 64), "fp8_e4m3")
    with pytest.raises(ValueError, match="^act: "):
        tq.qdq_linear(x, packed, (8, 64), "hif4", act="int4")
    with pytest.raises(ValueError, match="^out_dtype: "):
        tq.dequant_linear(x, packed, (8, 64), "hif4", out_dtype=torch.int32)


def test_cpu_without_interpreter_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch, torch_path: None) -> None:
    """On the CPU without TRITON_INTERPRET the same functions compute with torch ops (same results)."""
    fmt = formats.get("mxfp4")
    x = planted(6, 100, torch.float32, seed=13)
    packed = fmt.pack(fmt.encode(weight(16, 100, seed=14)))
    kernel_qdq = tq.quantize_dequantize(x, "mxfp4")
    kernel_out = tq.qdq_linear(x, packed, (16, 100), "mxfp4")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not tq.uses_kernel(x)
    assert bits_equal(tq.quantize_dequantize(x, "mxfp4"), kernel_qdq)
    w = fmt.decode(fmt.unpack(packed, (16, 100), dtype=torch.float32))
    fallback = tq.qdq_linear(x, packed, (16, 100), "mxfp4")
    assert bits_equal(fallback, reference("mxfp4", x) @ w.T)
    check_gemm(kernel_out, reference("mxfp4", x), w)
