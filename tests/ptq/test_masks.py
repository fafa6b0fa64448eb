"""The per-layer transforms of a recipe (`ptq.masks`): the Hadamard rotation's tensors and what the fits see."""

from __future__ import annotations

import torch
from torch import nn

from vidquant import formats
from vidquant.methods.rotation import dense_rotation, random_signs, rotate
from vidquant.ptq.masks import layer_rotation, rotate_fit
from vidquant.ptq.svdquant_gptq import quantize_layer
from vidquant.recipes import Recipe, load_recipe


def rotated(name: str, block: int | str = 32, **section) -> Recipe:
    data = load_recipe(name).to_dict()
    data["rotation"] = {"block": block, "seed": 3}
    if section:
        data[data["method"]] = {**data[data["method"]], **section}
    return Recipe.model_validate(data)


def test_layer_rotation_follows_the_recipe() -> None:
    linear = nn.Linear(128, 8)
    assert layer_rotation(load_recipe("tail-aware-hif4"), "model.fc", linear) == {}
    t = layer_rotation(rotated("tail-aware-hif4", "full"), "model.fc", linear)
    assert int(t["rotation_block"]) == 128 and int(t["rotation_seed"]) == 3
    assert torch.equal(t["rotation_signs"], random_signs(128, 3))


def test_rotate_fit_gives_the_rotated_weight_hessian_and_rows() -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 64, generator=g, dtype=torch.float64), torch.randn(40, 64, generator=g, dtype=torch.float64)
    t = layer_rotation(rotated("tail-aware-hif4", 16), "m.l", nn.Linear(64, 6))
    wr, hr, xr = rotate_fit(t, w, x.T @ x, x)
    r = dense_rotation(t["rotation_signs"], 16)
    torch.testing.assert_close(wr, w @ r)
    torch.testing.assert_close(xr, x @ r)
    torch.testing.assert_close(hr, r.T @ (x.T @ x) @ r)
    assert rotate_fit({}, w, x.T @ x, x)[0] is w


def test_svdquant_gptq_fits_the_rotated_weight() -> None:
    """The branch and the packed residual live in the rotated basis: up·down + Q(residual) ≈ (W/m) R, not W/m;
    and the held-out GPTQ rule scores rotated rows (a mismatch would pick from wrong outputs)."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 20
    mask = torch.exp(torch.randn(128, generator=g) * 0.3)
    recipe = rotated("svdquant-gptq-hif4", 64, lowrank={"rank": 4, "iters": 1},
                     clip_search={"enabled": False})
    state = quantize_layer(linear, recipe, mask, x[:256].T @ x[:256] / 256, [None], "model.fc",
                           held_out=[x[256:]], tokens=256)
    t = state.tensors
    assert int(t["rotation_block"]) == 64 and torch.equal(t["rotation_signs"], random_signs(128, 3))
    fmt = formats.get("hif4")
    approx = t["lowrank_up"].float() @ t["lowrank_down"].float() + fmt.decode(
        fmt.unpack(t["weight_packed"], (48, 128), -1, torch.float32))
    target = rotate(linear.weight.detach() / mask, t["rotation_signs"], 64)
    err_rotated = float((approx - target).norm() / target.norm())
    err_plain = float((approx - linear.weight.detach() / mask).norm() / target.norm())
    assert err_rotated < 0.2 < err_plain
