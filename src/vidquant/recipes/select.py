"""Layer selection: which target Linears a recipe quantizes and which it keeps in high precision, and why.

Decided from names alone, before anything changes weights (protection first, as torchao's FqnToConfig and
quanto's include/exclude do). Names are qualified by expert: ``"{expert}.{layer}"``, for example
``"transformer_2.blocks.3.attn1.to_q"``.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from vidquant.models import adapter_for, qualify, split_name
from vidquant.patterns import matches
from vidquant.recipes.schema import Recipe

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a recipe does to each Linear of each expert.

    ``quantized``: qualified names to quantize, in model order. ``protected``: target Linears kept in high
    precision, with the reason. ``boundary``: Linears outside the blocks, never quantized.
    ``protected_blocks``: the blocks that ``protect_blocks`` resolves to, per expert. ``sensitivity``: with
    ``protect_blocks: auto``, the measured sensitivity of every block per expert that the choice was made from.
    """

    experts: list[str]
    quantized: list[str] = field(default_factory=list)
    protected: dict[str, str] = field(default_factory=dict)
    boundary: list[str] = field(default_factory=list)
    protected_blocks: dict[str, list[int]] = field(default_factory=dict)
    sensitivity: dict[str, list[float]] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Quantized / protected / boundary Linears per expert, and their "total"."""
        groups = {"quantized": self.quantized, "protected": list(self.protected), "boundary": self.boundary}
        result = {expert: dict.fromkeys(groups, 0) for expert in [*self.experts, "total"]}
        for group, names in groups.items():
            for name in names:
                result[split_name(name)[0]][group] += 1
                result["total"][group] += 1
        return result

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data for manifests: the fields plus `counts`."""
        return {**asdict(self), "counts": self.counts()}

    def summary(self) -> str:
        """A few human-readable lines: counts per expert, then each protection reason with its layer count."""
        lines = [
            f"{expert}: {c['quantized']} quantized, {c['protected']} protected, "
            f"{c['boundary']} boundary (high precision)"
            for expert, c in self.counts().items()
        ]
        reasons: dict[str, int] = {}
        for reason in self.protected.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines += [f"  {count} protected: {reason}" for reason, count in reasons.items()]
        return "\n".join(lines)


def plan(model: Any, recipe: Recipe, *, sensitivity: dict[str, list[float]] | None = None) -> Plan:
    """Decide quantize / protect for every target Linear of every expert of ``model``.

    ``model``: anything `models.adapter_for` takes (a pipeline, an nn.Module, a mapping of expert name to
    expert, or an adapter). Reasons, first that applies: "protected block i", "protect pattern '…'", "not
    included". Raises ValueError for a block index out of range of an expert or over the
    ``max_protected_blocks`` budget; patterns that match nothing are logged. With ``protect_blocks: auto``
    the blocks are chosen from ``sensitivity`` (`choose_blocks`); without it, none are (the candidate plan
    whose blocks' sensitivity `ptq.quantize` measures).
    """
    adapter = adapter_for(model)
    models = adapter.experts()
    if not models:
        raise ValueError(f"{type(model).__name__} has no experts to quantize")
    if dotted := [expert for expert in models if "." in expert]:
        raise ValueError(f"expert names cannot contain '.' (they prefix qualified layer names): {dotted}")
    result = Plan(experts=list(models), sensitivity=dict(sensitivity or {}))
    chosen = (choose_blocks(sensitivity or {}, recipe.max_protected_blocks or 0, recipe.auto_stand_out)
              if recipe.auto_protect else None)
    targets: list[tuple[str, int | None]] = []
    for expert in models:
        layers = adapter.target_linears(expert)
        blocks = adapter.block_indices(expert, layers)
        count = len(adapter.blocks(expert))
        if chosen is None:
            result.protected_blocks[expert] = resolve_blocks(recipe.protect_blocks, expert, count)
        else:
            result.protected_blocks[expert] = chosen.get(expert, [])
            if len(result.sensitivity.get(expert, [])) not in (0, count):
                raise ValueError(f"sensitivity of {len(result.sensitivity[expert])} blocks for expert '{expert}', "
                                 f"which has {count}")
        targets += [(qualify(expert, layer), block) for layer, block in zip(layers, blocks, strict=True)]
        result.boundary += [qualify(expert, layer) for layer in adapter.boundary_linears(expert)]
    _check_budget(result.protected_blocks, recipe.max_protected_blocks)
    _warn_unmatched(recipe, [name for name, _ in targets])
    for name, block in targets:
        expert = split_name(name)[0]
        reason = _protection(name, block, result.protected_blocks[expert], recipe, result.sensitivity.get(expert))
        if reason is None:
            result.quantized.append(name)
        else:
            result.protected[name] = reason
    logger.info("plan for recipe '%s':\n%s", recipe.name, result.summary())
    return result


def choose_blocks(sensitivity: dict[str, list[float]], budget: int, stand_out: float = 2.0) -> dict[str, list[int]]:
    """`protect_blocks: auto`: at most ``budget`` (expert, block) pairs, the most sensitive first, each only if
    its sensitivity is at least ``stand_out`` times the median over all pairs.

    Sensitivity is the end-to-end output error when only that block is quantized (`eval.blocks`). Keeping a
    block whose error is typical buys little for its bytes, so with no block standing out none is kept
    (the HiF4 track's "best 0-2"); ties go to the earlier expert and block, so the choice is deterministic.
    """
    pairs = [(value, expert, block) for expert, values in sensitivity.items() for block, value in enumerate(values)]
    if not pairs or budget <= 0:
        return {}
    median = statistics.median(value for value, _, _ in pairs)
    ranked = sorted(pairs, key=lambda p: -p[0])  # stable: model order among equals
    chosen: dict[str, list[int]] = {}
    for value, expert, block in ranked[:budget]:
        if value > 0 and value >= stand_out * median:
            chosen.setdefault(expert, []).append(block)
    return {expert: sorted(blocks) for expert, blocks in chosen.items()}


def _protection(name: str, block: int | None, protected_blocks: list[int], recipe: Recipe,
                sensitivity: list[float] | None = None) -> str | None:
    if block is not None and block in protected_blocks:
        if recipe.auto_protect and sensitivity:
            share = sensitivity[block] / (sum(sensitivity) or 1.0)
            return f"protected block {block} (auto: {share:.0%} of this expert's summed block sensitivity)"
        return f"protected block {block}"
    for pattern in recipe.protect:
        if matches(pattern, name):
            return f"protect pattern '{pattern}'"
    if not any(matches(pattern, name) for pattern in recipe.include):
        return "not included"
    return None


def resolve_blocks(indices: list[int], expert: str, num_blocks: int) -> list[int]:
    """Block indices as non-negative positions in ``expert`` (-1 = its last block)."""
    for index in indices:
        if not -num_blocks <= index < num_blocks:
            raise ValueError(
                f"protect_blocks: block {index} is out of range for expert '{expert}', which has {num_blocks} blocks"
            )
    return sorted({index % num_blocks for index in indices})


def _check_budget(protected_blocks: dict[str, list[int]], budget: int | None) -> None:
    used = sum(len(blocks) for blocks in protected_blocks.values())
    if budget is not None and used > budget:
        pairs = ", ".join(f"{expert} {blocks}" for expert, blocks in protected_blocks.items() if blocks)
        raise ValueError(
            f"protect_blocks keeps {used} (expert, block) pairs in high precision ({pairs}), "
            f"over the budget max_protected_blocks={budget}"
        )


def _warn_unmatched(recipe: Recipe, names: list[str]) -> None:
    for key in ("include", "protect"):
        for pattern in getattr(recipe, key):
            if not any(matches(pattern, name) for name in names):
                logger.warning("recipe '%s': %s pattern '%s' matches no target Linear", recipe.name, key, pattern)
