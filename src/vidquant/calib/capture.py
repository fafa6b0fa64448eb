"""Held-out layer inputs: a bounded, deterministic sample of real activations for error measurement.

Statistics (`calibrate`) say how wide each input channel is; measuring how well a quantized Linear
reproduces its output needs the inputs themselves. `capture_inputs` runs the pipeline on held-out
prompts, with seeds disjoint from calibration's, and keeps per expert and distinct Linear input a
uniform sample of at most ``max_tokens`` rows of everything the Linear saw over all calls, steps and
CFG branches: each row draws a key from a seeded generator and the rows with the smallest keys are
kept (bottom-k sampling), so memory stays at ``max_tokens`` rows and the same run keeps the same rows.
Rows holding NaN/Inf are never kept. Linears that always receive the same tensor (the adapter's
`input_groups`) share one captured tensor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models import CallInfo, adapter_for
from .calibrate import CalibSettings
from .data import ForwardLoop, generate, is_prompts, run_loop

logger = logging.getLogger(__name__)


class Reservoir:
    """The ``k`` rows with the smallest random keys of a stream of ``(n, C)`` batches, kept on the CPU.

    Slots start with key +inf; a batch's candidates (keys below the largest kept one) only compete with
    as many of the largest kept keys, so a call costs O(k) scans plus work on its own rows.
    """

    def __init__(self, k: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.full((k,), math.inf, dtype=torch.float64)
        self.positions = torch.zeros(k, dtype=torch.int64)
        self.rows: Tensor | None = None
        self.seen = 0

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        n, k = rows.shape[0], len(self.keys)
        if self.rows is None:
            self.rows = torch.zeros(k, rows.shape[1], dtype=rows.dtype)
        keys = torch.rand(n, generator=self.generator, dtype=torch.float64)
        candidates = (torch.isfinite(rows).all(dim=-1).cpu() & (keys < self.keys.max())).nonzero().squeeze(1)
        if len(candidates) > k:
            candidates = candidates[keys[candidates].topk(k, largest=False).indices]
        if len(candidates):
            worst = self.keys.topk(len(candidates))  # the kept rows the candidates may displace
            won = torch.cat([worst.values, keys[candidates]]).topk(len(candidates), largest=False).indices
            incoming = candidates[won[won >= len(candidates)] - len(candidates)]
            slots = worst.indices[~torch.isin(torch.arange(len(candidates)), won)]
            self.rows[slots] = rows[incoming.to(rows.device)].cpu()
            self.keys[slots] = keys[incoming]
            self.positions[slots] = incoming + self.seen
        self.seen += n

    def sample(self) -> Tensor:
        """The kept rows in stream order."""
        filled = torch.isfinite(self.keys)
        if self.rows is None or not filled.any():
            raise RuntimeError("no finite input reached this layer while capturing")
        order = self.positions[filled].argsort()
        return self.rows[filled][order]


def capture_inputs(
    pipe,
    prompts: list[str],
    settings: CalibSettings,
    layers: dict[str, list[str]] | None = None,
    max_tokens: int = 512,
    seed_offset: int = 10_000,
) -> dict[str, dict[str, Tensor]]:
    """Sampled input rows ``(≤ max_tokens, in_features)`` of target Linears, per expert and layer (model order).

    Every prompt is generated once under ``settings`` (``num_prompts`` is ignored: all ``prompts`` run)
    with seed ``settings.seed + seed_offset + i``; ``seed_offset`` must keep these clear of the
    calibration seeds ``settings.seed + 0 .. num_prompts - 1``. ``layers`` picks target Linears per
    expert (default: every target Linear of every expert). Rows keep the activations' dtype.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not prompts:
        raise ValueError("capture_inputs needs at least one held-out prompt")
    if seed_offset < settings.num_prompts and seed_offset + len(prompts) > 0:
        raise ValueError(
            f"seed_offset {seed_offset} reuses calibration seeds (seed + 0 .. {settings.num_prompts - 1}); "
            f"use seed_offset >= {settings.num_prompts}"
        )
    adapter = adapter_for(pipe)
    experts = adapter.experts()
    wanted = layers if layers is not None else {name: list(adapter.target_linears(name)) for name in experts}
    plan: dict[str, list[tuple[list[str], Reservoir]]] = {}
    handles = []
    try:
        for e_index, (expert, names) in enumerate(wanted.items()):
            if expert not in experts:
                raise ValueError(f"unknown expert '{expert}'; the pipeline has {', '.join(experts)}")
            model = experts[expert]
            unknown = set(names) - set(adapter.target_linears(expert))
            if unknown:
                raise ValueError(f"{expert}: not target Linears: {', '.join(sorted(unknown))}")
            modules = dict(model.named_modules())
            plan[expert] = []
            for g_index, group in enumerate(adapter.input_groups(expert)):
                picked = [name for name in group if name in names]
                if not picked:
                    continue
                reservoir = Reservoir(max_tokens, seed=settings.seed + seed_offset + 1000 * e_index + g_index)
                plan[expert].append((picked, reservoir))
                handles.append(modules[picked[0]].register_forward_pre_hook(_hook(reservoir)))
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                logger.info("capturing inputs, prompt %d/%d: %s", i + 1, len(prompts), prompt[:80])
                generate(pipe, prompt, settings, seed=settings.seed_for(seed_offset + i))
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, dict[str, Tensor]] = {}
    for expert, groups in plan.items():
        samples: dict[str, Tensor] = {}
        for picked, reservoir in groups:
            sample = reservoir.sample()
            samples.update(dict.fromkeys(picked, sample))
            logger.debug("%s %s: kept %d of %d rows", expert, picked[0], len(sample), reservoir.seen)
        out[expert] = {name: samples[name] for name in adapter.target_linears(expert) if name in samples}
    return out


def _hook(reservoir: Reservoir):
    def hook(_module: nn.Module, args: tuple) -> None:
        reservoir.add(args[0])

    return hook


@dataclass
class ExpertCall:
    """One recorded expert call: what it was (`CallInfo`) and its inputs, detached on the CPU, to replay."""

    info: CallInfo
    args: tuple
    kwargs: dict[str, Any]

    def replay(self, model: nn.Module) -> Tensor:
        """Run ``model`` on these inputs (moved to its device); the denoiser's output tensor."""
        device = next(model.parameters()).device
        out = model(*_to(self.args, device), **_to(self.kwargs, device))
        return first_tensor(out)


def capture_calls(
    model: Any,
    data: list[str] | ForwardLoop,
    settings: CalibSettings | None,
    max_calls: int = 8,
    seed_offset: int = 10_000,
) -> dict[str, list[ExpertCall]]:
    """Up to ``max_calls`` recorded calls of every expert of ``model``, in call order, to replay cheaply.

    Prompts run through the pipeline under ``settings`` with the held-out seeds ``settings.seed +
    seed_offset + i`` (clear of calibration's); a forward loop runs as given (its own batches: nothing is
    held out). Calls are kept by the smallest keys of a seeded generator (bottom-k), so memory stays at
    ``max_calls`` inputs per expert (a Wan call's inputs are latents and the text context: ~25 MB at 720p)
    and every timestep is as likely to be kept.
    """
    if max_calls < 1:
        raise ValueError(f"max_calls must be >= 1, got {max_calls}")
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(seed_offset if settings is None else settings.seed + seed_offset)
    kept: dict[str, list[tuple[float, int, ExpertCall]]] = {name: [] for name in adapter.experts()}
    counter = [0]

    def record(expert: str, info: CallInfo, args: tuple, kwargs: dict) -> None:
        key = float(torch.rand((), generator=generator, dtype=torch.float64))
        calls = kept[expert]
        counter[0] += 1
        if len(calls) < max_calls or key < calls[-1][0]:
            calls.append((key, counter[0], ExpertCall(info, _to(args, "cpu"), _to(kwargs, "cpu"))))
            calls.sort(key=lambda c: c[0])
            del calls[max_calls:]

    with torch.no_grad(), _recording(adapter, record):
        if is_prompts(data):
            if settings is None:
                raise ValueError("capturing calls from prompts needs the calibration protocol (settings)")
            model.set_progress_bar_config(disable=True)
            for i, prompt in enumerate(data):
                logger.info("capturing expert calls, prompt %d/%d: %s", i + 1, len(data), prompt[:80])
                generate(model, prompt, settings, seed=settings.seed_for(seed_offset + i))
        else:
            run_loop(model, data)
    result = {expert: [call for _, _, call in sorted(calls, key=lambda c: c[1])] for expert, calls in kept.items()}
    if empty := [expert for expert, calls in result.items() if not calls]:
        raise ValueError(f"no call of expert {', '.join(empty)} was seen while capturing (check the step count)")
    return result


@contextmanager
def _recording(adapter: Any, record: Any) -> Iterator[None]:
    """Within the block, ``record(expert, info, args, kwargs)`` sees every expert call (its `CallInfo` from the
    adapter's `watching_calls`, whose hook runs first)."""
    current: dict[str, CallInfo] = {}
    handles = []
    with adapter.watching_calls(current.__setitem__):
        for name, expert in adapter.experts().items():
            def hook(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                record(name, current[name], args, kwargs)

            handles.append(expert.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _to(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) detached and moved to ``device``."""
    if isinstance(value, Tensor):
        return value.detach().to(device, copy=str(device) == "cpu")
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def first_tensor(out: Any) -> Tensor:
    """The main output inside a model's return value: a tensor, a tuple's first item, or the first field of a
    diffusers / transformers output object (``.sample``, ``.last_hidden_state``)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "to_tuple"):  # diffusers BaseOutput and transformers ModelOutput: fields in order, None left out
        out = out.to_tuple()
    if isinstance(out, tuple | list) and out:
        return first_tensor(out[0])
    raise ValueError(f"cannot find the output tensor in a {type(out).__name__}")
