"""Hooks that feed observers of Linear inputs while the model runs a normal call (generation or forward loop).

The model's adapter says, before each expert call, its timestep (-> timestep bin) and CFG branch
(`CallInfo`); one forward pre-hook per observed Linear input calls its observer with ``(x, bin, branch)``.
When a pipeline stacks both CFG branches in one batch, the rows of each branch are observed apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..models import CallInfo, ModelAdapter, timestep_bin
from .stats import CalibStats

Observer = Callable[[Tensor, int, int], None]  # (input, timestep bin, CFG branch)


@contextmanager
def observing(
    adapter: ModelAdapter, edges: dict[str, list[float]], observers: dict[str, dict[str, Observer]]
) -> Iterator[None]:
    """Within the block, ``observers[expert][layer](x, bin, branch)`` sees every input of that Linear."""
    current: dict[str, tuple[int, int | tuple[int, ...]]] = {expert: (0, 0) for expert in observers}

    def on_call(expert: str, info: CallInfo) -> None:
        current[expert] = (timestep_bin(info.timestep, edges[expert]), info.branch)

    def on_input(expert: str, observer: Observer):
        def hook(_module: nn.Module, args: tuple) -> None:
            bin_, branch = current[expert]
            x = args[0]
            if isinstance(branch, int):
                observer(x, bin_, branch)
            elif x.dim() >= 2 and x.shape[0] == len(branch):
                rows = torch.tensor(branch, device=x.device)
                for b in sorted(set(branch)):
                    observer(x[rows == b], bin_, b)
            else:  # not batch-major: the rows cannot be told apart
                observer(x, bin_, branch[-1])

        return hook

    handles = []
    experts = adapter.experts()
    try:
        for expert, layers in observers.items():
            modules = dict(experts[expert].named_modules())
            for layer, observer in layers.items():
                handles.append(modules[layer].register_forward_pre_hook(on_input(expert, observer)))
        with adapter.watching_calls(on_call, list(observers)), torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def collecting(stats: CalibStats, adapter: ModelAdapter) -> Iterator[None]:
    """Within the block, every forward of the adapter's experts adds its target-Linear inputs to ``stats``."""
    edges = {name: stats.meta["experts"][name]["bin_edges"] for name in stats.inputs}
    observers = {name: {obs.layers[0]: obs.update for obs in inputs.values()} for name, inputs in stats.inputs.items()}
    with observing(adapter, edges, observers):
        yield
