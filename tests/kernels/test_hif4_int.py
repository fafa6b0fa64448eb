"""HiF4 on integers (vidquant.kernels.hif4_int): the int8 form decodes exactly, the unit dots are exact, the W4A4
GEMM meets its rounding bound, and the Triton kernel (interpreter) equals the CPU reference bit for bit.

Tolerance of the GEMM (derived in hif4_int's docstring): every unit term T_u = D_u * qx_u * qw_u is exact in fp32
(|D_u| <= 50176 has <= 16 significant bits, each scale 3), so the only rounding is the fp32 sum over the U units:
|out - sum_u T_u| <= gamma_{U-1} * sum_u |T_u| <= gamma_{U-1} * sum_k |qdq(x)_k| |qdq(W)_k|, gamma_n = n u/(1 - n u),
u = 2^-24. The float64 reference adds gamma_K(2^-53) * sum_k |qdq(x)_k| |qdq(W)_k| at most. One unit: exact.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from vidquant import formats
from vidquant.formats import Encoded, bits_equal
from vidquant.kernels import hif4_int

FMT = formats.get("hif4")
U32, U64 = 2.0**-24, 2.0**-53


@pytest.fixture(autouse=True)
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """decode / quantize_dequantize as the torch ops define them (not the numba kernels)."""
    monkeypatch.setenv("VIDQUANT_NO_KERNELS", "1")


def activations(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[0, 3] = 40.0
    x[1, :64] = 0.0
    x[2, 10:20] = -1e-4  # rounds to -0 codes next to a large value
    x[2, 21] = 900.0
    x[3] *= 2.0**-30
    return x


def as_fp32(enc: Encoded) -> Encoded:
    return dataclasses.replace(enc, dtype=torch.float32)


def test_operands_reproduce_decode_exactly() -> None:
    x = activations(6, 150, seed=0)
    enc = FMT.encode(x)
    n, q = hif4_int.hif4_int_operands(enc)
    assert n.dtype == torch.int8 and n.shape == (6, 192) and q.dtype == torch.float32 and q.shape == (6, 3)
    assert int(n.abs().max()) <= 28
    values = hif4_int.hif4_int_values(n, q, 150)
    decoded = FMT.decode(as_fp32(enc))
    assert torch.equal(values, decoded)  # as numbers
    negative_zero = (decoded == 0) & torch.signbit(decoded)
    assert int(negative_zero.sum()) > 0  # the test data has -0 codes ...
    assert bits_equal(torch.where(negative_zero, -values, values), decoded)  # ... the only bit difference
    assert torch.equal(values.to(torch.bfloat16), FMT.decode(enc))  # HiF4 values are bf16 values


def test_every_scale_byte_code_and_sub_exponent() -> None:
    """All 255 E6M2 bytes (and 0xFF: NaN) x all 16 element codes x every Eb/Ec pair: n * q == decode."""
    rows = 256
    codes = torch.arange(16, dtype=torch.uint8).repeat(rows, 4)  # each code at every position mod 16
    g = torch.Generator().manual_seed(1)
    eb = torch.randint(0, 2, (rows, 1, 8), generator=g, dtype=torch.uint8)
    ec = torch.randint(0, 2, (rows, 1, 16), generator=g, dtype=torch.uint8)
    scale = torch.arange(256, dtype=torch.uint8).reshape(rows, 1)
    enc = Encoded("hif4", codes, {"scale": scale, "eb": eb, "ec": ec}, (rows, 64), 1, torch.float32)
    n, q = hif4_int.hif4_int_operands(enc)
    assert int(n.abs().max()) == 28
    values, decoded = hif4_int.hif4_int_values(n, q), FMT.decode(enc)
    assert torch.isnan(values[255]).all() and torch.isnan(decoded[255]).all()
    assert torch.equal(values[:255], decoded[:255])


def test_nan_unit() -> None:
    x = activations(6, 130, seed=2)
    x[4, 70] = float("nan")
    n, q = hif4_int.hif4_int_operands(FMT.encode(x))
    assert torch.isnan(q[4, 1]) and not torch.isnan(q[4, 0])
    values = hif4_int.hif4_int_values(n, q, 130)
    assert bits_equal(values, torch.where(values == 0, 0.0, FMT.decode(as_fp32(FMT.encode(x)))))


def test_unit_dots_are_exact() -> None:
    """int32 per-unit dots against Python integers; the extreme |D| = 64 * 28 * 28 included."""
    x, w = activations(7, 200, seed=3), torch.randn(5, 200, generator=torch.Generator().manual_seed(4))
    nx, _ = hif4_int.hif4_int_operands(FMT.encode(x))
    nw, _ = hif4_int.hif4_int_operands(FMT.encode(w))
    dots = hif4_int.hif4_unit_dots(nx, nw)
    assert dots.dtype == torch.int32 and dots.shape == (4, 7, 5)
    xs, ws = nx.tolist(), nw.tolist()
    for u in range(4):
        for i in range(7):
            for j in range(5):
                assert dots[u, i, j] == sum(a * b for a, b in zip(xs[i][64 * u:64 * u + 64], ws[j][64 * u:64 * u + 64],
                                                                   strict=True))
    extreme = torch.full((1, 64), -28, dtype=torch.int8)
    assert int(hif4_int.hif4_unit_dots(extreme, extreme)[0, 0, 0]) == 64 * 28 * 28


def reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qdq(x) @ qdq(W)^T in float64 and sum_k |qdq(x)_k| |qdq(W)_k|."""
    xq, wq = FMT.quantize_dequantize(x).double(), FMT.quantize_dequantize(w).double()
    return xq @ wq.T, xq.abs() @ wq.abs().T


@pytest.mark.parametrize("k", [64, 40, 640, 1000])
def test_gemm_within_its_bound(k: int) -> None:
    """Units of W scaled by 2^-12 .. 2^11 so that the fp32 sum over units has to round (with similar units it is
    usually exact: the terms have few significant bits)."""
    units = -(-k // 64)
    g = torch.Generator().manual_seed(6)
    x = activations(9, k, seed=5).reshape(3, 3, k)
    w = torch.randn(12, k, generator=g) * 0.02
    w = w * (2.0 ** torch.randint(-12, 12, (units,), generator=g).float()).repeat_interleave(64)[:k]
    out, dots = hif4_int.hif4_w4a4_gemm(FMT.encode(x), FMT.encode(w), return_unit_dots=True)
    assert out.shape == (3, 3, 12) and out.dtype == torch.float32
    ref, magnitude = reference(x.reshape(9, k), w)
    err = (out.reshape(9, 12).double() - ref).abs()
    if units == 1:  # one exact term: the fp32 output is the exact value, rounded once (not at all, in fact)
        exact = (dots[0].double() * hif4_int.hif4_int_operands(FMT.encode(x))[1][:, :1].double()
                 * hif4_int.hif4_int_operands(FMT.encode(w))[1][:, 0].double())
        assert torch.equal(out.reshape(9, 12), exact.float())
    else:
        assert bool((err > 0).any())  # the bound below is exercised, not met trivially
    gamma = (units - 1) * U32 / (1 - (units - 1) * U32) + k * U64 / (1 - k * U64)
    assert bool((err <= gamma * magnitude).all())


def test_gemm_rejects_bad_arguments() -> None:
    x = FMT.encode(torch.randn(3, 64))
    with pytest.raises(ValueError, match="^w_enc: K"):
        hif4_int.hif4_w4a4_gemm(x, FMT.encode(torch.randn(4, 128)))
    with pytest.raises(ValueError, match="^x_enc: "):
        hif4_int.hif4_w4a4_gemm(formats.get("mxfp4").encode(torch.randn(3, 64)), FMT.encode(torch.randn(4, 64)))
    with pytest.raises(ValueError, match="^w_enc: expected a 2-D"):
        hif4_int.hif4_w4a4_gemm(x, FMT.encode(torch.randn(2, 4, 64)))
    bad = dataclasses.replace(x, meta={**x.meta, "eb": x.meta["eb"] + 2})
    with pytest.raises(ValueError, match="^enc: Eb/Ec"):
        hif4_int.hif4_int_operands(bad)


# ---- the Triton kernel (interpreter) ------------------------------------------------------------------------------
@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_equals_cpu_reference(dtype: torch.dtype, interpreter: None) -> None:
    m, n, k = 20, 70, 150  # two row tiles, two column tiles, a K tail
    x = activations(m, k, seed=7).to(dtype)
    x[5, 100] = float("inf")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(8)) * 0.05
    w_enc = FMT.encode(w)
    out, dots = hif4_int.hif4_w4a4_gemm_triton(x, FMT.pack(w_enc), (n, k), return_unit_dots=True)
    ref_out, ref_dots = hif4_int.hif4_w4a4_gemm(FMT.encode(x), w_enc, return_unit_dots=True)
    assert torch.equal(dots, ref_dots)
    assert bits_equal(out, ref_out)
    ref, magnitude = reference(x.float(), w)
    gamma = 2 * U32 / (1 - 2 * U32) + k * U64 / (1 - k * U64)
    assert bool(((out.double() - ref).abs() <= gamma * magnitude).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_nan_rows_and_batch_shape(interpreter: None) -> None:
    x = activations(6, 64, seed=9).reshape(2, 3, 64)
    x[1, 2, 7] = float("nan")
    w_enc = FMT.encode(torch.randn(16, 64, generator=torch.Generator().manual_seed(10)))
    out = hif4_int.hif4_w4a4_gemm_triton(x, FMT.pack(w_enc), (16, 64))
    assert out.shape == (2, 3, 16)
    assert bits_equal(out, hif4_int.hif4_w4a4_gemm(FMT.encode(x), w_enc))
    assert torch.isnan(out[1, 2]).all() and not torch.isnan(out[0]).any()


def test_importable_and_usable_without_triton() -> None:
    """With triton unimportable: the package imports, the CPU path runs, and a kernel request says what is missing."""
    code = (
        "import os, sys\n"
        "sys.modules['triton'] = None\n"  # import triton -> ImportError
        "import torch\n"
        "from vidquant import formats, kernels\n"
        "assert not kernels.available()\n"
        "fmt = formats.get('hif4')\n"
        "x, w = torch.randn(3, 64), torch.randn(4, 64)\n"
        "packed = fmt.pack(fmt.encode(w))\n"
        "out = kernels.hif4_int_linear(x, packed, (4, 64))\n"
        "assert torch.equal(out, kernels.hif4_w4a4_gemm(fmt.encode(x), fmt.encode(w)))\n"
        "assert kernels.quantize_dequantize(x, 'hif4').shape == x.shape\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    kernels.quantize_dequantize(x, 'hif4')\n"
        "except RuntimeError as err:\n"
        "    assert 'triton>=3' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
