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

import torch
from torch import Tensor, nn

from ..models import adapter_for
from .calibrate import CalibSettings
from .data import generate

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
