"""The public contract every registered format keeps (shape, dtype, round trips, clear errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vidquant import formats
from vidquant.formats import bits_equal

ALL = formats.names()
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(8) * 30).to(dtype)


def test_names_and_lookup() -> None:
    expected = {"hif8", "hif4", "mxfp4", "nvfp4", "mxfp8", "fp8_e4m3", "fp8_e5m2", "int8", "int4"}
    assert expected <= set(ALL)
    assert all(formats.get(n).name == n for n in ALL)
    with pytest.raises(ValueError, match="unknown format 'hif5'.*hif4"):
        formats.get("hif5")


def test_bits_per_value() -> None:
    bits = {n: formats.get(n).bits_per_value for n in ALL}
    assert (bits["hif4"], bits["hif8"], bits["mxfp4"], bits["nvfp4"]) == (4.5, 8, 4.25, 4.5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_contract(name: str, dtype: torch.dtype) -> None:
    fmt = formats.get(name)
    x = sample((2, 3, 100), dtype)
    for dim in (-1, 0, 1):
        y = fmt.quantize_dequantize(x, dim=dim)
        assert y.shape == x.shape and y.dtype == x.dtype
        enc = fmt.encode(x, dim=dim)
        assert torch.equal(fmt.decode(enc).view(INT_VIEW[dtype]), y.view(INT_VIEW[dtype]))
        data = fmt.pack(enc)
        assert data.dtype == torch.uint8 and data.dim() == 1
        back = fmt.unpack(data, tuple(x.shape), dim, dtype)
        assert torch.equal(fmt.decode(back).view(INT_VIEW[dtype]), y.view(INT_VIEW[dtype]))
    assert (y.float() - x.float()).norm() < 0.5 * x.float().norm()


@pytest.mark.parametrize("name", ALL)
def test_bad_input_is_a_clear_error(name: str) -> None:
    fmt = formats.get(name)
    with pytest.raises(ValueError, match="dtype"):
        fmt.quantize_dequantize(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        fmt.quantize_dequantize(torch.ones(0, 64))
    with pytest.raises(ValueError, match="out of range"):
        fmt.encode(torch.ones(4, 64), dim=2)
    with pytest.raises(ValueError, match="0-d"):
        fmt.quantize_dequantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match="bytes"):
        fmt.unpack(torch.zeros(3, dtype=torch.uint8), (4, 64))
    other = formats.get("hif8" if name != "hif8" else "hif4")
    with pytest.raises(ValueError, match="cannot decode"):
        fmt.decode(other.encode(torch.ones(4, 64)))


def _finite(name: str, dtype: torch.dtype) -> st.SearchStrategy[float]:
    """Any finite value the format accepts: fp16's range, and fp16 group scales (amax / qmax) must not overflow."""
    limit = 60000.0 if dtype == torch.float16 else 4e5 if "_g64" in name else float(np.float32(1e38))
    return st.floats(-limit, limit, width=32)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), name=st.sampled_from(ALL), dtype=st.sampled_from(list(INT_VIEW)))
def test_codes_round_trip(data: st.DataObject, name: str, dtype: torch.dtype) -> None:
    """Every format: decode(encode(x)) == qdq(x) bit for bit, sign symmetry, and pack / unpack round trips."""
    fmt = formats.get(name)
    shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 80)))
    x = torch.from_numpy(data.draw(arrays(np.float32, shape, elements=_finite(name, dtype)))).to(dtype)
    enc = fmt.encode(x)
    y = fmt.quantize_dequantize(x)
    assert bits_equal(fmt.decode(enc), y)
    if not getattr(fmt, "full_range", False):  # int4_g64_full's -8..7 grid is asymmetric by design
        assert torch.equal(fmt.quantize_dequantize(-x), -y)  # by value: integer and HiF8 grids have no -0
    packed = fmt.pack(enc)
    assert packed.numel() == fmt.packed_nbytes(*x.shape)
    back = fmt.unpack(packed, tuple(x.shape), -1, x.dtype)
    assert torch.equal(back.codes, enc.codes) and back.meta.keys() == enc.meta.keys()
    assert all(torch.equal(back.meta[k], enc.meta[k]) and back.meta[k].dtype == enc.meta[k].dtype for k in enc.meta)


def test_cli_prints_the_table() -> None:
    from typer.testing import CliRunner

    from vidquant.cli import app

    result = CliRunner().invoke(app, ["formats"])
    assert result.exit_code == 0
    assert "hif4" in result.stdout and "4.5" in result.stdout and "E6M2" in result.stdout
