"""One model, several precisions: the base weights once, one packed `QuantLinear` per PTQ state, switched per call.

The operator review of the HiF4 paper asks for a pipeline that drafts in W4A4 and escalates to W8A8 or BF16 where
identity matters, without reloading weights. `RoutedModel.build` verifies every state against the base model
(`state.verify`, the error names the state's folder), then swaps each target Linear for a `RoutedLinear` that
keeps the base Linear (the ``"bf16"`` precision: the base checkpoint in its own dtype) and, per state, the
`QuantLinear` that `state.quant_linear` makes of it (packed runtime for formats under 16 bits, as `apply`). A
layer a state leaves unquantized (protected blocks) runs the base Linear under that precision, as `apply` would.

Switching precision sets each layer's ``active`` key: nothing is copied or loaded. Per expert call a forward
pre-hook (`ModelAdapter.watching_calls`) publishes each state's own timestep bin to that state's layers (the
per-bin clip ratios of `apply`'s `publish_bins`, kept per state since states may have different bin edges), counts
denoising steps, and, when a mixed plan is set (`route.policy`), activates the precision each layer has at that
expert and step.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from .. import formats
from ..models import CallInfo, adapter_for, split_name, timestep_bin
from ..nn import QuantLinear, StepContext, swap
from ..state import PTQState, quant_linear, verify

logger = logging.getLogger(__name__)

BF16 = "bf16"  # the reserved precision name of the base weights
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


def check_precision_name(name: str, where: str = "precision") -> str:
    """A precision name: letters, digits, '_' and '-', at most 40 (it names a module key and an output folder)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: precision name {name!r} must be 1-40 letters, digits, '_' or '-' "
                         "(starting with a letter or digit)")
    return name


class RoutedLinear(nn.Module):
    """A target Linear at several precisions: the base Linear plus one `QuantLinear` per state, ``active`` picks.

    The variants share the base's bias; under the packed runtime they hold only the format's bytes, masks and
    low-rank factors, so each precision costs its state's deployed size, not another copy of the weights.
    """

    def __init__(self, base: nn.Linear, name: str) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"layer {name}: a RoutedLinear wraps an nn.Linear, found {type(base).__name__}")
        self.base = base
        self.variants = nn.ModuleDict()
        self.active = BF16
        self.layer_name = name

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:  # what callers reading ``.weight`` (dtype, device) of a Linear expect
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def add(self, precision: str, layer: QuantLinear) -> None:
        if precision == BF16 or precision in self.variants:
            raise ValueError(f"layer {self.layer_name}: precision '{precision}' is already there")
        self.variants[precision] = layer

    def forward(self, x: Tensor) -> Tensor:
        variant = self.variants._modules.get(self.active)  # a precision without this layer: the base
        return self.base(x) if variant is None else variant(x)

    def extra_nbytes(self, precision: str) -> int:
        """Bytes that precision's variant holds beyond the base Linear (0 for the base or a layer it leaves)."""
        if precision not in self.variants:
            return 0
        shared = {t.untyped_storage().data_ptr() for t in self.base.parameters()}
        seen, total = set(shared), 0
        for t in (*self.variants[precision].parameters(), *self.variants[precision].buffers()):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total

    def extra_repr(self) -> str:
        return f"{self.layer_name}, precisions=[{BF16}, {', '.join(self.variants)}], active={self.active}"


class Plan(Protocol):
    """What `RoutedModel.route` follows: each layer's precision at an expert call (`route.policy.MixPlan`)."""

    def at(self, expert: str, step: int, num_steps: int | None) -> dict[str, str]:
        """Layer (expert-local name) -> precision for this call of ``expert`` at denoising ``step``."""


@dataclass(frozen=True)
class PrecisionCost:
    """What a precision adds to the routed model: resident bytes held, and its state's tensor bytes."""

    name: str
    layers: int  # layers it quantizes
    resident_bytes: int  # bytes of the variants' own tensors (measured: what this process holds for it)
    state_bytes: int  # `PTQState.nbytes` (0 for the base)


class RoutedModel:
    """A pipeline (or module) whose target Linears are `RoutedLinear`s: several precisions, one base.

    Use `build`; `use(name)` switches every layer at once, `route(plan)` follows a mixed plan per expert call,
    `begin(steps)` marks the start of a generation (steps are counted from the expert calls; a new generation is
    also recognised when the timestep goes up). `close` removes the hooks (the wrapped layers stay).
    """

    def __init__(self, model: Any, precisions: dict[str, PTQState | None], layers: dict[str, RoutedLinear],
                 contexts: dict[str, dict[str, StepContext]], base_fingerprint: str) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self.states = {name: state for name, state in precisions.items() if state is not None}
        self.precisions = list(precisions)
        self.layers = layers
        self._contexts = contexts
        self.base_fingerprint = base_fingerprint
        self._by_expert: dict[str, list[tuple[str, RoutedLinear]]] = {}
        for name, layer in layers.items():
            expert, local = split_name(name)
            self._by_expert.setdefault(expert, []).append((local, layer))
        self.active: str | None = BF16  # None while a mixed plan routes the layers
        self.plan: Plan | None = None
        self.step = -1
        self.num_steps: int | None = None
        self.calls: list[tuple[str, int, float | None]] = []  # (expert, step, timestep) of the generation's calls
        self.switch_seconds = 0.0  # time spent choosing precisions since `begin` (`use`, `route`, the per-call hook)
        self._last_t: float | None = None
        self._hooks = ExitStack()
        self._hooks.enter_context(self.adapter.watching_calls(self._on_call))

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def build(cls, model: Any, precisions: Mapping[str, PTQState | None], *, paths: Mapping[str, str] | None = None,
              runtime: str = "auto", tile_rows: int | None = None,
              model_fingerprint: str | None = None) -> RoutedModel:
        """Wrap ``model``'s target Linears for ``precisions`` (name -> state; None or the name "bf16": the base).

        Every state is verified against the base model before any layer changes; a refusal names the state's
        folder from ``paths`` (else its precision name). ``model_fingerprint``: the base's, when the caller knows
        it (else hashed here, before the swap: the videos' sources record it).
        """
        if not precisions:
            raise ValueError("a routed model needs at least one precision")
        paths = dict(paths or {})
        for name, state in precisions.items():
            check_precision_name(name)
            if name == BF16 and state is not None:
                raise ValueError(f"precision '{BF16}' is the base model's own weights; give the state another name")
        adapter = adapter_for(model)
        if any(isinstance(m, RoutedLinear) for e in adapter.experts().values() for m in e.modules()):
            raise ValueError("this model is routed already (it has RoutedLinear layers); load a fresh base model")
        fingerprint = model_fingerprint or adapter.fingerprint()
        targets: dict[str, list] = {}
        for name, state in precisions.items():
            if state is None:
                continue
            try:
                targets[name] = verify(model, state)
            except ValueError as err:
                raise ValueError(f"state '{name}' ({paths.get(name, 'in memory')}): {err}") from None
        experts = adapter.experts()
        contexts = {name: {expert: StepContext() for expert in experts} for name in targets}
        routed: dict[str, RoutedLinear] = {}
        for name, entries in targets.items():  # every QuantLinear is made from the base Linear, which stays
            for layer_name, module, layer in entries:
                expert, _ = split_name(layer_name)
                chosen = runtime if runtime != "auto" else (
                    "packed" if formats.get(layer.weight_format).bits_per_value < 16 else "fake")
                wrapper = routed.get(layer_name)
                if wrapper is None:
                    wrapper = routed[layer_name] = RoutedLinear(module, layer_name)
                wrapper.add(name, quant_linear(module, layer, contexts[name][expert], layer_name, chosen, tile_rows))
        for layer_name, wrapper in routed.items():
            expert, local = split_name(layer_name)
            swap(experts[expert], local, wrapper)
        logger.info("routed model: %d Linears, precisions %s", len(routed), ", ".join(precisions))
        return cls(model, dict(precisions), routed, contexts, fingerprint)

    @classmethod
    def load(cls, model: Any, precisions: Mapping[str, str | Path | None], **kwargs: Any) -> RoutedModel:
        """`build` from state folders (name -> folder; None or "bf16": the base), errors naming the folder."""
        from ..state import load_state

        states: dict[str, PTQState | None] = {}
        for name, path in precisions.items():
            if path is None or str(path) == BF16:
                states[name] = None
                continue
            try:
                states[name] = load_state(path)
            except ValueError as err:
                raise ValueError(f"precision '{name}': {err}") from None
        return cls.build(model, states, paths={n: str(p) for n, p in precisions.items() if p is not None}, **kwargs)

    # ---- switching -----------------------------------------------------------------------------------
    def use(self, precision: str) -> None:
        """Run every layer at ``precision`` from the next call on (no copy, no reload)."""
        if precision not in self.precisions and precision != BF16:
            raise ValueError(f"unknown precision '{precision}' (this routed model has {', '.join(self.precisions)})")
        start = time.perf_counter()
        self.plan = None
        self.active = precision
        for layer in self.layers.values():
            layer.__dict__["active"] = precision  # a plain attribute: skips nn.Module.__setattr__'s checks
        self.switch_seconds += time.perf_counter() - start

    def route(self, plan: Plan) -> None:
        """Follow ``plan``: before each expert call, its layers take the precision the plan gives them there."""
        self.plan = plan
        self.active = None

    def begin(self, num_steps: int | None) -> None:
        """A generation of ``num_steps`` denoising steps starts (step-range rules need the count)."""
        self.step, self.num_steps, self._last_t, self.calls, self.switch_seconds = -1, num_steps, None, [], 0.0

    def close(self) -> None:
        """Remove the per-call hooks (the model keeps its routed layers, at their current precision)."""
        self._hooks.close()

    def __enter__(self) -> RoutedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def layers_of(self, expert: str) -> list[tuple[str, RoutedLinear]]:
        """(expert-local name, layer) of ``expert``'s routed layers, in model order."""
        return self._by_expert.get(expert, [])

    def _on_call(self, expert: str, info: CallInfo) -> None:
        start = time.perf_counter()
        t = info.timestep
        if t is not None and self._last_t is not None and t > self._last_t:
            self.step = -1  # the timestep went up: a new generation (without `begin`)
        if info.repeat == 0:
            self.step += 1
        self._last_t = t if t is not None else self._last_t
        self.calls.append((expert, self.step, t))
        for name, state in self.states.items():
            edges = state.timestep_bins.get(expert)
            if edges is not None:
                self._contexts[name][expert].timestep_bin = timestep_bin(t, edges)
        if self.plan is not None:
            chosen = self.plan.at(expert, self.step, self.num_steps)
            for local, layer in self.layers_of(expert):
                layer.__dict__["active"] = chosen.get(local, BF16)
        self.switch_seconds += time.perf_counter() - start

    # ---- accounting ----------------------------------------------------------------------------------
    def cost(self, precision: str) -> PrecisionCost:
        """Layers, resident bytes and state bytes ``precision`` adds to the base model."""
        if precision == BF16:
            return PrecisionCost(BF16, 0, 0, 0)
        if precision not in self.states:
            raise ValueError(f"unknown precision '{precision}' (this routed model has {', '.join(self.precisions)})")
        held = [layer.extra_nbytes(precision) for layer in self.layers.values() if precision in layer.variants]
        return PrecisionCost(precision, len(held), sum(held), self.states[precision].nbytes())

    def source(self, key: str) -> str:
        """Fingerprint of what makes videos under ``key`` (a precision, or any mix label): base and states."""
        if key == BF16:
            return self.base_fingerprint
        state = self.states.get(key)
        extra = state.fingerprint() if state is not None else key + "\n" + "\n".join(
            f"{n}={s.fingerprint()}" for n, s in sorted(self.states.items()))
        return hashlib.sha256(f"{self.base_fingerprint}\n{extra}".encode()).hexdigest()
