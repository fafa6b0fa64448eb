"""Methods as registered units: a name, its recipe section (pydantic), what it needs, how it quantizes.

A method is a class in a module of `vidquant.ptq` decorated with ``@register_method("name")``; modules of this
package are discovered on first use, so adding a method is one new file here plus its YAML recipe (README:
"Adding a method"). A recipe selects it with ``method: name`` and configures it in a section of the same
name; the math it runs lives in `vidquant.methods` (tensors in, tensors out).
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor

if TYPE_CHECKING:
    from vidquant.calib.calibrate import CalibSettings
    from vidquant.calib.stats import CalibStats
    from vidquant.models import ModelAdapter
    from vidquant.recipes import Plan, Recipe
    from vidquant.state import LayerState


class NoOptions(BaseModel):
    """The recipe section of a method without options (it must be empty)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class QuantizeRun:
    """Everything a method's `Method.quantize` may use; ``masks`` are the recipe's smoothing masks per layer."""

    model: Any
    adapter: ModelAdapter
    recipe: Recipe
    plan: Plan
    stats: CalibStats | None
    masks: dict[str, Tensor | None]
    header: dict  # the state's recipe, base and plan (what a checkpoint must match)
    data: Any = None  # the calibration prompts or forward loop, for methods that run it again
    settings: CalibSettings | None = None
    progress: bool = False
    checkpoint: str | Path | None = None
    hessian_budget_bytes: int = 16 * 2**30


class Method(ABC):
    """A PTQ method: ``Options`` is its recipe section; `quantize` returns per layer a `LayerState`."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    needs_layer_inputs: ClassVar[bool] = False  # runs the calibration data again (Hessians, samples)
    # under torchrun every rank calls `quantize` and takes a share of the layers (exchanged through
    # ``run.checkpoint``); False: rank 0 alone quantizes, the others load what it saved
    deals_layers: ClassVar[bool] = False

    def check(self, recipe: Recipe) -> None:  # noqa: B027 (an optional hook: most methods have no such rule)
        """Cross-field rules of a recipe using this method (raise ValueError)."""

    def needs_stats(self, recipe: Recipe) -> bool:
        """Whether quantizing needs calibration statistics (masks, the calibration protocol)."""
        return recipe.smoothing.statistic != "none" or self.needs_layer_inputs or recipe.auto_protect

    @abstractmethod
    def quantize(self, run: QuantizeRun) -> tuple[dict[str, LayerState], dict[str, list[float]]]:
        """The `LayerState` of every layer of ``run.plan.quantized``, and the timestep-bin edges it used."""


_METHODS: dict[str, type[Method]] = {}
_DISCOVERED: list[bool] = []


def register_method(name: str):
    """Class decorator: register a `Method` under ``name`` (the recipe's ``method:``)."""

    def register(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method '{name}' is registered twice ({_METHODS[name].__name__}, {cls.__name__})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return register


def _discover() -> None:
    """Import every module of this package once, so their ``@register_method`` run."""
    if _DISCOVERED:
        return
    _DISCOVERED.append(True)
    package = importlib.import_module("vidquant.ptq")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"vidquant.ptq.{info.name}")


def method_names() -> list[str]:
    _discover()
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; a ValueError listing the known ones otherwise."""
    _discover()
    if name not in _METHODS:
        raise ValueError(f"unknown method '{name}'; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
