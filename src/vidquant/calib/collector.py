"""Hooks that feed observers of Linear inputs while the pipeline runs a normal generation call.

One forward pre-hook per expert reads the timestep (-> timestep bin) and tells the CFG branch apart;
one forward pre-hook per observed Linear input calls its observer with ``(x, bin, branch)``. Wan
pipelines call an expert once per branch at each timestep, conditional first, so the n-th call at an
unchanged timestep is branch n.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..models.wan import call_timestep, timestep_bin
from .stats import BRANCHES, CalibStats

Observer = Callable[[Tensor, int, int], None]  # (input, timestep bin, CFG branch)


@contextmanager
def observing(
    experts: dict[str, nn.Module], edges: dict[str, list[float]], observers: dict[str, dict[str, Observer]]
) -> Iterator[None]:
    """Within the block, ``observers[expert][layer](x, bin, branch)`` sees every input of that Linear."""
    state = {"t": None, "branch": 0, "bin": 0}
    handles = []

    def on_expert(expert_edges: list[float]):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            t = call_timestep(args, kwargs)
            same = state["t"] == t
            state["branch"] = min(state["branch"] + 1, len(BRANCHES) - 1) if same else 0
            state["t"], state["bin"] = t, timestep_bin(t, expert_edges)

        return hook

    def on_input(observer: Observer):
        def hook(_module: nn.Module, args: tuple) -> None:
            observer(args[0], state["bin"], state["branch"])

        return hook

    try:
        for name, layers in observers.items():
            model = experts[name]
            handles.append(model.register_forward_pre_hook(on_expert(edges[name]), with_kwargs=True))
            modules = dict(model.named_modules())
            for layer, observer in layers.items():
                handles.append(modules[layer].register_forward_pre_hook(on_input(observer)))
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def collecting(stats: CalibStats, experts: dict[str, nn.Module]) -> Iterator[None]:
    """Within the block, every forward of ``experts`` adds its target-Linear inputs to ``stats``."""
    edges = {name: stats.meta["experts"][name]["bin_edges"] for name in stats.inputs}
    observers = {name: {obs.layers[0]: obs.update for obs in inputs.values()} for name, inputs in stats.inputs.items()}
    with observing(experts, edges, observers):
        yield
