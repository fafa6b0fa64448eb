"""SmoothQuant-style W4A4 (tail-aware HiFloat4, arXiv 2605.26628 Algorithm 1, and its max / RTN baselines).

Per quantized Linear: the recipe's channel mask (none for ``rtn-*``), its Hadamard rotation (``rotation:``,
none by default) and an optional fixed activation clip;
`apply` quantizes the base weights themselves, so the state stores no weight.
"""

from __future__ import annotations

import torch

from ..checksum import tensor_sha256
from ..progress import progress_bar
from ..state import LayerState
from .masks import layer_rotation
from .registry import Method, QuantizeRun, register_method


@register_method("smoothquant")
class SmoothQuant(Method):
    """Masks from the statistics (`ptq.masks`), a fixed clip ratio from the recipe; nothing else to fit."""

    def quantize(self, run: QuantizeRun) -> tuple[dict[str, LayerState], dict[str, list[float]]]:
        recipe = run.recipe
        clip = None if recipe.act_clip is None else torch.tensor(recipe.act_clip, dtype=torch.float32)
        layers = {}
        with progress_bar(run.progress) as bar:
            for name in bar.track(run.plan.quantized, description="quantizing"):
                linear = run.adapter.linear(name)
                weight = linear.weight
                tensors = {"mask": run.masks[name], "act_clip": clip, **layer_rotation(recipe, name, linear)}
                layers[name] = LayerState(recipe.weights, recipe.activations, tensor_sha256(weight),
                                          {k: v for k, v in tensors.items() if v is not None})
        return layers, {}
