"""QuantLinear against hand-computed F.linear(Q_a(x·m), Q_w(W/m)), bit for bit, plus its contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidquant import formats
from vidquant.nn import QuantLinear, swap

FORMATS = ["hif4", "mxfp4", "nvfp4", "int4_g64"]
DTYPES = [torch.bfloat16, torch.float32]


def make_linear(
    in_features: int = 96, out_features: int = 24, dtype: torch.dtype = torch.float32, bias: bool = True
) -> nn.Linear:
    """96 inputs: one and a half HiF4/INT units and three MX blocks, so padded tails are exercised."""
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def heavy_input(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Activations with a few heavy channels, as a DiT has."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    x[..., :3] *= 40.0
    return x.to(dtype)


def wide_mask(n: int) -> torch.Tensor:
    return torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(2)) * 2)


def test_no_mask_no_formats_is_the_linear_exactly() -> None:
    linear = make_linear()
    x = heavy_input((2, 5, 96), torch.float32)
    q = QuantLinear(linear, None, None)
    assert torch.equal(q(x), linear(x))
    assert (q.in_features, q.out_features) == (96, 24)
    assert q.bias is linear.bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mask_folding_is_exact_before_quantization(dtype: torch.dtype) -> None:
    """Eq. 3/9: (x diag(m)) (W diag(m)^-1)^T == x W^T, up to rounding, for a mask spanning e^±6."""
    linear = make_linear(dtype=dtype)
    x = heavy_input((4, 7, 96), dtype)
    q = QuantLinear(linear, None, None, mask=wide_mask(96))
    reference = linear(x).detach()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(q(x), reference, rtol=tol, atol=tol * float(reference.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORMATS)
def test_forward_is_hand_computed_quantized_linear_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    linear = make_linear(dtype=dtype)
    mask = wide_mask(96)
    x = heavy_input((2, 5, 96), dtype)
    fmt = formats.get(name)
    # folded, scaled and quantized in fp32, then cast back once
    folded = linear.weight.detach().float() / mask
    w_hat = fmt.quantize_dequantize(folded, dim=-1).to(dtype)
    assert not torch.equal(w_hat, folded.to(dtype))
    x_hat = fmt.quantize_dequantize(x.float() * mask, dim=-1).to(dtype)
    expected = F.linear(x_hat, w_hat, linear.bias)
    q = QuantLinear(linear, name, name, mask=mask)
    assert torch.equal(q.weight, w_hat)
    out = q(x)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_weight_is_quantized_once_and_not_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = type(formats.get("hif4")).quantize_dequantize

    def counting(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        calls.append(self.name)
        return original(self, x, dim)

    monkeypatch.setattr(type(formats.get("hif4")), "quantize_dequantize", counting)
    linear = make_linear()
    q = QuantLinear(linear, "hif4", None, mask=wide_mask(96))
    assert calls == ["hif4"]
    stored = q.weight.detach().clone()
    for _ in range(3):
        q(heavy_input((3, 96), torch.float32))
    assert calls == ["hif4"]
    assert torch.equal(q.weight, stored)


def test_original_weight_is_not_kept() -> None:
    linear = make_linear(dtype=torch.bfloat16)
    q = QuantLinear(linear, "hif4", "hif4", mask=wide_mask(96))
    storages = {t.untyped_storage().data_ptr() for t in (*q.parameters(), *q.buffers())}
    assert linear.weight.untyped_storage().data_ptr() not in storages
    assert [name for name, _ in q.named_parameters()] == ["weight", "bias"]
    assert not q.weight.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_act_clip_per_timestep_bin(dtype: torch.dtype) -> None:
    linear = make_linear(dtype=dtype)
    mask = wide_mask(96)
    x = heavy_input((2, 5, 96), dtype)
    ratios = torch.tensor([1.0, 0.5, 0.25])
    q = QuantLinear(linear, "hif4", "hif4", mask=mask, act_clip=ratios)
    unclipped = QuantLinear(linear, "hif4", "hif4", mask=mask)
    xm = x * mask.to(dtype)
    outputs = []
    for b, ratio in enumerate(ratios):
        q.timestep_bin = b
        bound = (xm.abs().amax(dim=-1, keepdim=True).float() * ratio).to(dtype)
        x_hat = formats.get("hif4").quantize_dequantize(torch.clamp(xm, -bound, bound), dim=-1)
        outputs.append(q(x))
        assert torch.equal(outputs[-1], F.linear(x_hat, q.weight, q.bias))
    assert torch.equal(outputs[0], unclipped(x))  # a ratio of 1 clips nothing
    assert not torch.equal(outputs[1], outputs[2])
    q.timestep_bin = 3
    with pytest.raises(ValueError, match="timestep_bin 3 is out of range for 3"):
        q(x)


def test_scalar_act_clip_ignores_the_bin() -> None:
    linear = make_linear()
    x = heavy_input((4, 96), torch.float32)
    q = QuantLinear(linear, None, None, act_clip=0.5)
    q.timestep_bin = 7
    bound = x.abs().amax(dim=-1, keepdim=True) * 0.5
    assert torch.equal(q(x), linear(torch.clamp(x, -bound, bound)))


def test_lowrank_branch_keeps_the_layer_and_quantizes_the_residual() -> None:
    """SVDQuant's split W/m = up·down + R: unquantized, the module is still the Linear; quantized, only R is."""
    linear = make_linear(dtype=torch.float64)
    mask = wide_mask(96).double()
    down, up = torch.randn(4, 96, dtype=torch.float64), torch.randn(24, 4, dtype=torch.float64)
    x = heavy_input((3, 5, 96), torch.float64)
    q = QuantLinear(linear, None, None, mask=mask, lowrank=(down, up))
    torch.testing.assert_close(q(x), linear(x), rtol=1e-12, atol=1e-10)

    linear = make_linear(dtype=torch.bfloat16)
    mask, down, up = mask.float(), down.float(), up.float()
    x = x.to(torch.bfloat16)
    fmt = formats.get("hif4")
    down16, up16 = down.to(torch.bfloat16), up.to(torch.bfloat16)  # the factors as the module keeps them
    residual = (linear.weight.detach().float() / mask) - up16.float() @ down16.float()
    w_hat = fmt.quantize_dequantize(residual).to(torch.bfloat16)  # in fp32, cast back once
    x_hat = fmt.quantize_dequantize(x.float() * mask, dim=-1).to(torch.bfloat16)
    branch = ((x * mask.to(torch.bfloat16)) @ down16.T) @ up16.T
    expected = F.linear(x_hat, w_hat, linear.bias) + branch
    q = QuantLinear(linear, "hif4", "hif4", mask=mask, lowrank=(down, up))
    assert q.lowrank_down.dtype == torch.bfloat16
    assert torch.equal(q(x), expected)


def test_dtype_and_device_are_preserved() -> None:
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        linear = make_linear(dtype=torch.bfloat16).to(device)
        q = QuantLinear(linear, "nvfp4", "hif4", mask=wide_mask(96), act_clip=[0.9, 0.8], lowrank=(
            torch.randn(2, 96), torch.randn(24, 2)))  # fmt: skip
        for tensor in (q.weight, q.bias, q.mask, q.act_clip, q.lowrank_down, q.lowrank_up):
            assert tensor.device.type == device
        assert q.weight.dtype == q.lowrank_up.dtype == torch.bfloat16
        out = q(heavy_input((3, 96), torch.bfloat16).to(device))
        assert (out.dtype, out.device.type, out.shape) == (torch.bfloat16, device, (3, 24))


def test_no_bias_and_repr() -> None:
    q = QuantLinear(make_linear(bias=False), "hif4", None, mask=wide_mask(96), act_clip=[0.9, 0.8], lowrank=(
        torch.randn(2, 96), torch.randn(24, 2)))  # fmt: skip
    assert q.bias is None
    assert q(heavy_input((3, 96), torch.float32)).shape == (3, 24)
    text = repr(q)
    for part in ("weight_format=hif4", "act_format=None", "mask=yes", "act_clip=[0.9, 0.8]", "rank=2", "bias=False"):
        assert part in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_format": "hif5"}, "weight_format: unknown format 'hif5'"),
        ({"act_format": "fp3"}, "act_format: unknown format 'fp3'"),
        ({"mask": torch.ones(95)}, r"mask must have shape \(96,\)"),
        ({"mask": torch.ones(96, dtype=torch.int32)}, "floating-point"),
        ({"mask": torch.ones(96).index_fill(0, torch.tensor([5]), 0.0)}, "positive, found 1"),
        ({"mask": -torch.ones(96)}, "positive"),
        ({"mask": torch.ones(96).index_fill(0, torch.tensor([5]), float("nan"))}, "non-finite"),
        ({"mask": torch.ones(96).index_fill(0, torch.tensor([5]), float("inf"))}, "non-finite"),
        ({"act_clip": 0.0}, r"in \(0, 1\]"),
        ({"act_clip": 1.5}, r"in \(0, 1\]"),
        ({"act_clip": float("nan")}, r"in \(0, 1\]"),
        ({"act_clip": torch.ones(2, 2)}, "1-D"),
        ({"act_clip": torch.ones(0)}, "non-empty"),
        ({"lowrank": (torch.ones(2, 95), torch.ones(24, 2))}, r"down must have shape \(rank, 96\)"),
        ({"lowrank": (torch.ones(2, 96), torch.ones(24, 3))}, r"up must have shape \(24, 2\)"),
        ({"lowrank": (torch.ones(0, 96), torch.ones(24, 0))}, "down must have shape"),
        ({"lowrank": torch.ones(2, 96)}, "pair of tensors"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs: dict, message: str) -> None:
    args = {"weight_format": "hif4", "act_format": "hif4", **kwargs}
    with pytest.raises(ValueError, match=message):
        QuantLinear(make_linear(), args.pop("weight_format"), args.pop("act_format"), **args)


def test_only_a_linear_can_be_replaced() -> None:
    with pytest.raises(ValueError, match="replaces an nn.Linear, got Conv1d"):
        QuantLinear(nn.Conv1d(4, 4, 1), "hif4", "hif4")


def test_swap_replaces_by_qualified_name() -> None:
    model = nn.Sequential(nn.ModuleDict({"proj": nn.Linear(96, 24), "out": nn.ModuleList([nn.Linear(24, 96)])}))
    x = heavy_input((3, 96), torch.float32)
    inner = model[0]
    reference = inner["out"][0](inner["proj"](x))
    old = swap(model, "0.proj", QuantLinear(inner["proj"], None, None, mask=wide_mask(96)))
    assert isinstance(old, nn.Linear) and isinstance(inner["proj"], QuantLinear)
    swap(model, "0.out.0", QuantLinear(inner["out"][0], None, None))
    torch.testing.assert_close(inner["out"][0](inner["proj"](x)), reference)
    with pytest.raises(ValueError, match="no submodule '0.nope'"):
        swap(model, "0.nope", nn.Identity())
    with pytest.raises(ValueError, match="empty"):
        swap(model, "", nn.Identity())


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_weight_is_used_as_is(dtype: torch.dtype) -> None:
    linear = make_linear(dtype=dtype)
    mask = torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.5
    down, up = torch.randn(2, 96) * 0.01, torch.randn(24, 2) * 0.01
    rounded = formats.get("hif4").quantize_dequantize(torch.randn(24, 96).to(dtype))  # any grid point
    q = QuantLinear(linear, "hif4", "hif4", mask=mask, lowrank=(down, up), quantized_weight=rounded)
    assert torch.equal(q.weight, rounded)  # not quantized again (HiF4's rounding is not idempotent)
    x = heavy_input((5, 96), dtype)
    xm = x * mask.to(dtype)
    expected = F.linear(formats.get("hif4").quantize_dequantize((x.float() * mask).to(dtype) if dtype == torch.float32
                                                                else (x.float() * mask)).to(dtype), rounded,
                        linear.bias) + (xm @ down.to(dtype).T) @ up.to(dtype).T
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)


def test_quantized_weight_errors() -> None:
    linear = make_linear()
    with pytest.raises(ValueError, match="needs the weight_format"):
        QuantLinear(linear, None, None, quantized_weight=torch.zeros(24, 96))
    with pytest.raises(ValueError, match=r"weight's shape \(24, 96\), got \(96, 24\)"):
        QuantLinear(linear, "hif4", None, quantized_weight=torch.zeros(96, 24))
