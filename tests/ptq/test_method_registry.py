"""Adding a method is one registered class (a file in vidquant/ptq/ in the project) plus a recipe: nothing else.

This test defines a complete method here, as the README's "Adding a method" section does, and runs it through
the public API on a plain module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import vidquant
from vidquant.checksum import tensor_sha256
from vidquant.ptq import Method, QuantizeRun, method_names, register_method
from vidquant.recipes import load_recipe
from vidquant.state import LayerState


class ClipOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(0.9, gt=0, le=1)


@register_method("fixed-clip-example")
class FixedClip(Method):
    """Round-to-nearest weights and a fixed per-token activation clip, read from the recipe's own section."""

    Options = ClipOptions

    def quantize(self, run: QuantizeRun) -> tuple[dict[str, LayerState], dict[str, list[float]]]:
        clip = torch.tensor(run.recipe.options.ratio)
        return {name: LayerState(run.recipe.weights, run.recipe.activations,
                                 tensor_sha256(run.adapter.linear(name).weight), {"act_clip": clip})
                for name in run.plan.quantized}, {}


RECIPE = """\
name: fixed-clip-int8
method: fixed-clip-example
weights: int8
activations: int8
smoothing: {statistic: none}
fixed-clip-example:
  ratio: 0.8
"""


def test_a_method_defined_elsewhere_runs_through_the_api(tmp_path: Path) -> None:
    assert "fixed-clip-example" in method_names()
    (tmp_path / "r.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.options.ratio == 0.8 and recipe.to_dict()["fixed-clip-example"] == {"ratio": 0.8}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    state = vidquant.quantize(model, recipe)  # no statistics needed: no smoothing
    assert sorted(state.layers) == ["model.0", "model.2"]
    assert all(float(layer.tensors["act_clip"]) == pytest.approx(0.8) for layer in state.layers.values())
    state.save(tmp_path / "state")
    vidquant.apply(model, vidquant.load_state(tmp_path / "state"))
    assert "act_clip=0.8" in repr(model[0]) and model(torch.randn(4, 16)).shape == (4, 8)


def test_a_wrong_section_is_named(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE.replace("ratio: 0.8", "ratio: 2"))
    with pytest.raises(ValueError, match=r"fixed-clip-example.ratio: .*less than or equal to 1"):
        load_recipe(tmp_path / "r.yaml")
