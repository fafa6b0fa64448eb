"""Shared fixtures of the routing tests: fresh tiny pipelines and two small states with per-bin clips."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import vidquant
from vidquant.models import adapter_for, load_model, split_name
from vidquant.state import LayerState, PTQState

STEPS, SIZE, FRAMES = 2, 16, 5


def fresh(model: str = "tiny"):
    """A new tiny pipeline (same weights every time), progress bars off."""
    pipe = load_model(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt: str = "a red car with a licence plate", seed: int = 0, callback=None) -> bytes:
    """The final latents of one 16x16, 2-step generation, as bytes (bit-exact comparisons)."""
    out = pipe(prompt=prompt, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS,
               guidance_scale=3.5, generator=torch.Generator().manual_seed(seed), output_type="latent",
               callback_on_step_end=callback)
    return out.frames.float().numpy().tobytes()


def with_bin_clips(pipe, recipe: str, clips: list[float]) -> PTQState:
    """An RTN state of ``recipe`` plus one activation clip ratio per timestep bin (len(clips) bins per expert),
    so that a wrong timestep bin changes the output."""
    state = vidquant.quantize(pipe, recipe, None)
    state.timestep_bins = adapter_for(pipe).bin_edges(len(clips))
    for layer in state.layers.values():
        layer.tensors["act_clip"] = torch.tensor(clips)
    return state


def subset(states: dict[str, PTQState], pick: Callable[[str], str | None]) -> PTQState:
    """A state made of other states' layers: ``pick(layer name)`` names the state each layer comes from (None:
    left in BF16), i.e. a mixed precision applied by hand."""
    layers: dict[str, LayerState] = {}
    bins: dict[str, list[float]] = {}
    first = next(iter(states.values()))
    for name in first.layers:
        chosen = pick(name)
        if chosen is None:
            continue
        layers[name] = states[chosen].layers[name]
        expert, _ = split_name(name)
        edges = states[chosen].timestep_bins.get(expert)
        if edges is not None and bins.setdefault(expert, edges) != edges:
            raise AssertionError(f"expert {expert} would mix bin edges")
    return PTQState(layers, first.recipe, first.base, first.plan, timestep_bins=bins)


@pytest.fixture(scope="session")
def states() -> dict[str, PTQState]:
    """W4A4 (RTN HiF4, 2 bins) and W8A8 (HiF8, 3 bins) states of the tiny Wan2.2."""
    pipe = fresh()
    return {"w4a4": with_bin_clips(pipe, "rtn-hif4", [0.95, 0.6]),
            "w8a8": with_bin_clips(pipe, "hif8", [0.9, 0.7, 0.5])}


@pytest.fixture(scope="session")
def states21() -> dict[str, PTQState]:
    """W4A4 and W8A8 states of the tiny Wan2.1 (one expert, 8 blocks), both with 2 bins: a state mixing their
    layers within the expert can then be applied by hand."""
    pipe = fresh("tiny-wan21")
    return {"w4a4": with_bin_clips(pipe, "rtn-hif4", [0.95, 0.6]), "w8a8": with_bin_clips(pipe, "hif8", [0.8, 0.5])}
