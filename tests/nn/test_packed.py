"""The packed runtime: weights kept in their format's bytes give the fake-quant outputs (bit for bit in one tile;
within fp32 accumulation-order rounding in several), and the dense weight is never kept."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import vidquant
from vidquant import formats
from vidquant.eval.probes import weight_bytes
from vidquant.models import tiny
from vidquant.nn import QuantLinear
from vidquant.nn.packed import PackedLinearWeight

WEIGHT_FORMATS = [f for f in formats.names() if formats.get(f).bits_per_value < 16]


def linear(dtype: torch.dtype, k: int = 96, n: int = 40) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, n).to(dtype)


def inputs(dtype: torch.dtype, k: int = 96) -> torch.Tensor:
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    x[..., :3] *= 30
    return x.to(dtype)


def parts(k: int = 96, n: int = 40) -> dict:
    g = torch.Generator().manual_seed(2)
    return {"mask": torch.rand(k, generator=g) + 0.5, "act_clip": torch.tensor([1.0, 0.7]),
            "lowrank": (torch.randn(3, k, generator=g) * 0.01, torch.randn(n, 3, generator=g) * 0.01)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_one_tile_is_the_fake_quant_layer_bit_for_bit(fmt: str, dtype: torch.dtype) -> None:
    base = linear(dtype)
    fake = QuantLinear(base, fmt, "hif4", **parts())
    packed = QuantLinear(base, fmt, "hif4", **parts(), runtime="packed")
    assert packed.weight is None and torch.equal(packed.dense_weight(), fake.weight)
    x = inputs(dtype)
    for b in (0, 1):
        fake.timestep_bin = packed.timestep_bin = b
        assert torch.equal(packed(x), fake(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", ["hif4", "nvfp4", "int4_g64", "hif8"])
def test_tiles_agree_within_accumulation_order_rounding(fmt: str, dtype: torch.dtype) -> None:
    """Each output is one dot product over K in fp32 either way; a narrower matrix may take another BLAS kernel
    that sums in another order. Two fp32 summation orders of n terms differ by at most 2 (n - 1) u sum|x_k w_k|
    (u = 2^-24; Higham's bound for each, added), and a bf16 output may then round to the neighbouring value:
    one more bf16 ulp of the result."""
    base = linear(dtype, k=160, n=50)
    fake = QuantLinear(base, fmt, None)
    tiled = QuantLinear(base, fmt, None, runtime="packed", tile_rows=7)
    assert len(tiled.packed.bounds) == 8 and tiled.packed.bounds[-1] == (49, 50)
    x = inputs(dtype, k=160)
    y, ref = tiled(x).double(), fake(x).double()
    magnitude = x.double().abs() @ fake.weight.double().abs().T
    bound = 2 * (160 - 1) * 2.0**-24 * magnitude
    if dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2.0**-7
    assert (y - ref).abs().le(bound + 1e-30).all()


def test_decoding_a_row_tile_is_exact() -> None:
    w = torch.randn(33, 130, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 2, 130)
    for name in WEIGHT_FORMATS:
        fmt = formats.get(name)
        enc = fmt.encode(w)
        packed = PackedLinearWeight(enc, tile_rows=5)
        assert torch.equal(packed.dense(), fmt.decode(enc)), name


def test_the_packed_runtime_holds_the_formats_bytes_not_a_dense_weight() -> None:
    pipe = tiny.build_tiny_pipeline()
    before = weight_bytes(pipe)
    state = vidquant.quantize(pipe, "rtn-hif4")
    vidquant.apply(pipe, state)  # "auto": packed for every format below 16 bits
    layers = [m for m in pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.packed is not None and m.weight is None for m in layers)
    held = sum(m.packed.nbytes() for m in layers)
    assert held == sum(formats.get("hif4").packed_nbytes(m.out_features, m.in_features) for m in layers)
    after = weight_bytes(pipe)
    assert after.bf16 == before.bf16 and after.stored < before.bf16
    with pytest.raises(ValueError, match="runtime"):
        vidquant.apply(tiny.build_tiny_pipeline(), state, runtime="dense")


def test_packed_runtime_errors() -> None:
    base = linear(torch.float32)
    with pytest.raises(ValueError, match="needs a weight format"):
        QuantLinear(base, None, None, runtime="packed")
    with pytest.raises(ValueError, match="not idempotent"):
        QuantLinear(base, "hif4", None, runtime="packed", quantized_weight=torch.zeros(40, 96))
    with pytest.raises(ValueError, match="tile_rows"):
        QuantLinear(base, "hif4", None, runtime="packed", tile_rows=0)


# ---- bad input: refused with the layer's name, nothing half-applied -----------------------------------------
DATA = Path(__file__).parents[1] / "data"


def test_a_packed_weight_that_does_not_fit_its_layer_is_refused_by_name_before_any_change() -> None:
    """Bytes one short, the bytes of another layer's shape, another format's name, another dtype: `apply` names the
    layer and the tensor, and the pipeline is left as it was (every layer is checked before the first swap)."""
    state = vidquant.load_state(DATA / "state-v2-svdquant-gptq-hif4")
    names = [n for n, layer in state.layers.items() if "weight_packed" in layer.tensors]
    name = names[-1]  # the last layer: a half-applying loop would have swapped all the others first
    other = next(n for n in names if state.layers[n].tensors["weight_packed"].numel()
                 != state.layers[name].tensors["weight_packed"].numel())
    good = state.layers[name]
    packed = good.tensors["weight_packed"]
    bad = {
        "one byte short": (good.weight_format, packed[:-1]),
        "another layer's shape": (good.weight_format, state.layers[other].tensors["weight_packed"]),
        "another format": ("nvfp4", packed),
        "another dtype": (good.weight_format, packed.view(torch.int8)),
    }
    for why, (weight_format, data) in bad.items():
        state.layers[name] = replace(good, weight_format=weight_format, tensors={**good.tensors, "weight_packed": data})
        pipe = tiny.build_tiny_pipeline()
        with pytest.raises(ValueError, match=rf"^layer {re.escape(name)}: weight_packed must hold \d+ uint8 bytes"):
            vidquant.apply(pipe, state, runtime="packed")
        assert not any(isinstance(m, QuantLinear) for m in pipe.transformer.modules()), why
        assert not any(isinstance(m, QuantLinear) for m in pipe.transformer_2.modules()), why


def test_an_encoding_whose_scale_tensors_do_not_match_its_format_is_refused() -> None:
    """A PackedLinearWeight (or a packed QuantLinear) built from an encoding: wrong codes width, a scale tensor of
    the wrong shape or dtype, a missing one: a ValueError that says which, before anything is packed."""
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(5))
    enc = formats.get("hif4").encode(w)
    cases = {
        "codes": replace(enc, codes=enc.codes[:, :64]),
        "scale tensor 'scale' must be torch.uint8": replace(enc, meta={**enc.meta, "scale": enc.meta["scale"][:, :1]}),
        "scale tensor 'eb' must be torch.uint8": replace(enc, meta={**enc.meta, "eb": enc.meta["eb"].float()}),
        "do not match the format's": replace(enc, meta={k: v for k, v in enc.meta.items() if k != "ec"}),
        "dtype": replace(enc, dtype=torch.int8),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            PackedLinearWeight(bad)
    nv = formats.get("nvfp4").encode(w)
    with pytest.raises(ValueError, match=re.escape("scale tensor 'tensor_scale' must be torch.float32 (8, 1)")):
        PackedLinearWeight(replace(nv, meta={**nv.meta, "tensor_scale": nv.meta["tensor_scale"][:1]}))
    with pytest.raises(ValueError, match="share one tensor scale"):  # rows of one weight under two tensor scales
        PackedLinearWeight(replace(nv, meta={**nv.meta, "tensor_scale": nv.meta["tensor_scale"] * torch.arange(
            1.0, 9.0).unsqueeze(1)}))
    with pytest.raises(ValueError, match="packed data has 575 bytes, expected 576"):
        PackedLinearWeight.from_bytes(formats.get("hif4").pack(enc)[:-1], "hif4", (8, 128), torch.float32)
