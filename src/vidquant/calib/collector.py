"""Hooks that feed `CalibStats` while the pipeline runs a normal generation call.

One forward pre-hook per expert reads the timestep (-> timestep bin) and tells the CFG branch apart;
one forward pre-hook per distinct Linear input (the first Linear of each input group) updates that
input's statistics. Wan pipelines call an expert once per branch at each timestep, conditional first,
so the n-th call at an unchanged timestep is branch n.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .stats import BRANCHES, CalibStats


def bin_edges(lo: float, hi: float, bins: int) -> list[float]:
    """Edges of ``bins`` equal timestep bins over an expert's share [lo, hi] of the schedule."""
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


def timestep_bin(t: float, edges: list[float]) -> int:
    """Index of the bin of ``edges`` holding timestep ``t`` (the ends are closed)."""
    for i in range(len(edges) - 2, -1, -1):
        if t >= edges[i]:
            return i
    return 0


@contextmanager
def collecting(stats: CalibStats, experts: dict[str, nn.Module]) -> Iterator[None]:
    """Within the block, every forward of ``experts`` adds its target-Linear inputs to ``stats``."""
    state = {"t": None, "branch": 0, "bin": 0}
    handles = []

    def on_expert(edges: list[float]):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            t = float(torch.as_tensor(timestep).flatten()[0])
            same = state["t"] == t
            state["branch"] = min(state["branch"] + 1, len(BRANCHES) - 1) if same else 0
            state["t"], state["bin"] = t, timestep_bin(t, edges)

        return hook

    def on_input(obs):
        def hook(_module: nn.Module, args: tuple) -> None:
            obs.update(args[0], state["bin"], state["branch"])

        return hook

    try:
        for name, model in experts.items():
            edges = stats.meta["experts"][name]["bin_edges"]
            handles.append(model.register_forward_pre_hook(on_expert(edges), with_kwargs=True))
            modules = dict(model.named_modules())
            for obs in stats.inputs[name].values():
                handles.append(modules[obs.layers[0]].register_forward_pre_hook(on_input(obs)))
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
