"""The adapter for any ``nn.Module``: what quanto / torchao / ModelOpt users expect in three lines.

One expert named ``model``; every ``nn.Linear`` is a target (the recipe's include / protect patterns choose
among them, e.g. ``include: ["model.encoder.*"]``); no timestep, so one timestep bin and one CFG branch;
calibration and GPTQ's Hessians come from the user's own forward loop. Blocks, for block protection and
per-block reports, are the items of the largest ``nn.ModuleList`` of modules holding Linears (a
transformer's layer stack), found by inspection.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vidquant.models.base import ModelAdapter, register_fallback

EXPERT = "model"


@register_fallback
class GenericAdapter(ModelAdapter):
    """Any ``nn.Module``: all Linears are targets, the largest stack of Linear-holding modules are its blocks."""

    family = "generic"

    @classmethod
    def accepts(cls, obj: Any) -> bool:
        return isinstance(obj, nn.Module)

    def experts(self) -> dict[str, nn.Module]:
        return {EXPERT: self.obj}

    def target_linears(self, expert: str) -> dict[str, nn.Linear]:
        return {n: m for n, m in self.experts()[expert].named_modules() if isinstance(m, nn.Linear) and n}

    def blocks(self, expert: str) -> list[str]:
        best: tuple[int, list[str]] = (0, [])
        for name, module in self.experts()[expert].named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 1:
                linears = sum(isinstance(m, nn.Linear) for m in module.modules())
                if linears > best[0]:
                    best = (linears, [f"{name}.{i}" if name else str(i) for i in range(len(module))])
        return best[1]
