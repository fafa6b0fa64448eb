"""Routing policies: which precision each layer runs at, per expert, step range and block, and the escalation ladder.

A policy is data (YAML through `vidquant.safeyaml`, a pydantic schema; unknown keys are errors naming the key):

```yaml
name: expert-mix
precisions: {w4a4: states/hif4, w8a8: states/hif8, bf16: bf16}   # name -> PTQ state folder, or "bf16"
default: w4a4
rules:                                      # each rule: a precision and one or more conditions (all must hold)
  - {experts: [transformer], precision: w8a8}          # Wan2.2's high-noise expert: scene layout, identity
  - {steps: [0.0, 0.25], precision: bf16}              # fraction of the denoising steps, [start, end)
  - {step_indices: [-1], precision: w8a8}              # step indices, negative from the end
  - {blocks: [0, 1, -1], precision: bf16}              # block indices as in recipes' protect_blocks
escalation:
  ladder: [mixed, w8a8, bf16]               # "mixed": default + rules; else a precision, every layer at it
  critical: bf16                             # where prompts the prompt gate marks critical go (default: last rung)
  threshold: 0.8                             # draft identity_consistency below it -> next rung (null: never)
```

**Resolution order** (documented, tested): for a layer at an expert call, among the rules whose conditions
all hold, the one of the most specific kind wins: a rule with ``blocks`` (3) over one with ``steps`` /
``step_indices`` (2) over one with ``experts`` only (1); among rules of the same kind the later one in the file
wins; no rule: ``default``. Steps are counted over the whole generation (both Wan2.2 experts), step ``i`` of
``n`` lies at fraction ``i / n``. Relative state folders are read from the policy file's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..recipes.select import resolve_blocks
from ..safeyaml import bundled_names, load_named_mapping
from ..validation import describe
from .switch import BF16, RoutedModel, check_precision_name

logger = logging.getLogger(__name__)

MIXED = "mixed"  # the ladder rung that runs the policy's default + rules
_BUNDLED = resources.files(__package__) / "policies"
PRIORITY = {"blocks": 3, "steps": 2, "experts": 1}  # resolution order: block > step > expert > default


class Rule(BaseModel):
    """One routing rule: ``precision`` where every given condition holds."""

    model_config = ConfigDict(extra="forbid")

    precision: str
    experts: list[str] | None = Field(None, min_length=1)
    steps: tuple[float, float] | None = None  # [start, end) as fractions of the denoising steps
    step_indices: list[int] | None = Field(None, min_length=1)
    blocks: list[int] | None = Field(None, min_length=1)

    @field_validator("steps")
    @classmethod
    def _fraction(cls, span: tuple[float, float] | None) -> tuple[float, float] | None:
        if span is not None and not (0.0 <= span[0] < span[1] <= 1.0):
            raise ValueError("a step range [start, end) needs 0 <= start < end <= 1 (fractions of the steps)")
        return span

    @field_validator("step_indices", "blocks", mode="before")
    @classmethod
    def _integers(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError("indices are integers (negative: from the end)")
        return value

    @model_validator(mode="after")
    def _one_condition(self) -> Rule:
        if self.experts is None and self.steps is None and self.step_indices is None and self.blocks is None:
            raise ValueError("a rule needs a condition: experts, steps, step_indices or blocks")
        if self.steps is not None and self.step_indices is not None:
            raise ValueError("give steps (fractions) or step_indices, not both")
        return self

    @property
    def priority(self) -> int:
        if self.blocks is not None:
            return PRIORITY["blocks"]
        return PRIORITY["steps"] if self.steps is not None or self.step_indices is not None else PRIORITY["experts"]


class Escalation(BaseModel):
    """The draft-and-escalate ladder, where gate-critical prompts go, and the draft gate's threshold."""

    model_config = ConfigDict(extra="forbid")

    ladder: list[str] = Field([MIXED], min_length=1)
    critical: str | None = None  # default: the ladder's last rung
    threshold: float | None = Field(None, ge=0.0, le=1.0)  # the draft's signal below it: escalate
    # the draft gate's signal: "identity" (weight-free, `eval.identity.identity_consistency`) or "vbench" (VBench's
    # DINO subject consistency, from the optional VBench environment; `route.draft_scores`)
    signal: Literal["identity", "vbench"] = "identity"
    gate_rules: str | None = None  # the prompt gate's rules file (None: the bundled rules)
    # calibration: a draft is bad at identity_drift >= this vs BF16. 0.15 sits between what bench/identity.py measured
    # on synthetic clips that keep their subject (<= 0.07; heavy blur at 128 px 0.08-0.12) and ones that change it
    # (>= 0.19 at 16 px, 0.27-0.36 at 64 px); real drafts may want it re-set
    bad_drift: float = Field(0.15, gt=0.0, le=1.0)
    bad_psnr_db: float | None = Field(None, gt=0.0)  # ... or at PSNR vs BF16 below this

    @field_validator("ladder")
    @classmethod
    def _distinct(cls, ladder: list[str]) -> list[str]:
        if len(set(ladder)) != len(ladder):
            raise ValueError("a rung is listed twice")
        return ladder

    @property
    def critical_rung(self) -> str:
        return self.critical or self.ladder[-1]


class Policy(BaseModel):
    """A routing policy (see the module docstring); `load_policy` reads one."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("policy", min_length=1, max_length=80)
    description: str = ""
    precisions: dict[str, str] = Field(min_length=1)
    default: str
    rules: list[Rule] = []
    escalation: Escalation = Escalation()

    @field_validator("precisions")
    @classmethod
    def _names(cls, precisions: dict[str, str]) -> dict[str, str]:
        for name, path in precisions.items():
            check_precision_name(name)
            if name == MIXED:
                raise ValueError(f"'{MIXED}' is the ladder's name for the policy's mix; name the precision otherwise")
            if name == BF16 and path != BF16:
                raise ValueError(f"'{BF16}' is the base model's weights: its value must be '{BF16}', got {path!r}")
            if not path:
                raise ValueError(f"precision '{name}': empty state folder")
        return precisions

    @model_validator(mode="after")
    def _known(self) -> Policy:
        known = set(self.precisions) | {BF16}
        if self.default not in known:
            raise ValueError(f"default: unknown precision '{self.default}' (precisions: {', '.join(sorted(known))})")
        for i, rule in enumerate(self.rules):
            if rule.precision not in known:
                raise ValueError(f"rules.{i}.precision: unknown precision '{rule.precision}' "
                                 f"(precisions: {', '.join(sorted(known))})")
        for i, rung in enumerate(self.escalation.ladder):
            if rung != MIXED and rung not in known:
                raise ValueError(f"escalation.ladder.{i}: unknown rung '{rung}' ('{MIXED}' or one of "
                                 f"{', '.join(sorted(known))})")
        critical = self.escalation.critical
        if critical is not None and critical != MIXED and critical not in known:
            raise ValueError(f"escalation.critical: unknown rung '{critical}'")
        return self

    def fingerprint(self) -> str:
        """sha256 of what routes (precisions, default, rules, escalation), not the name or description."""
        data = self.model_dump(mode="json", exclude={"name", "description"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def mix_fingerprint(self) -> str:
        """sha256 of the mix alone (default and rules): the source of the ``mixed`` rung's videos."""
        data = {"default": self.default, "rules": [r.model_dump(mode="json") for r in self.rules]}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def used_precisions(self) -> list[str]:
        """The precisions the ladder, the critical rung and the mix can reach, in ``precisions`` order."""
        used = {rung for rung in (*self.escalation.ladder, self.escalation.critical_rung) if rung != MIXED}
        if MIXED in self.escalation.ladder or self.escalation.critical_rung == MIXED:
            used |= {self.default, *(r.precision for r in self.rules)}
        return [n for n in self.precisions if n in used] + ([BF16] if BF16 in used - set(self.precisions) else [])

    def state_paths(self, base_dir: Path | None, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """Precision -> state folder ("bf16" for the base): relative folders from ``base_dir``, ``overrides`` first."""
        overrides = dict(overrides or {})
        if unknown := sorted(set(overrides) - set(self.precisions)):
            raise ValueError(f"--state {unknown[0]}=...: the policy has no precision '{unknown[0]}' "
                             f"(it has {', '.join(self.precisions)})")
        paths = {}
        for name in self.used_precisions():
            value = overrides.get(name, self.precisions.get(name, BF16))
            if value == BF16:
                paths[name] = BF16
                continue
            path = Path(value).expanduser()
            if not path.is_absolute() and base_dir is not None and name not in overrides:
                path = base_dir / path
            paths[name] = str(path)
        return paths

    def plan(self, routed: RoutedModel) -> MixPlan:
        """The ``mixed`` rung on ``routed``: every rule's experts and blocks checked against the model."""
        return MixPlan.compile(self, routed)


def policy_names() -> list[str]:
    """The bundled example policies (``route/policies/*.yaml``), by name."""
    return bundled_names(_BUNDLED)


def load_policy(name_or_path: str | Path) -> tuple[Policy, Path | None]:
    """A bundled policy by name or a YAML file; returns it and the folder its relative state paths start from
    (None for a bundled one: give its states on the command line). Errors name the file and the key."""
    data, source, bundled = load_named_mapping(name_or_path, _BUNDLED, "routing policy")
    base_dir = None if bundled else Path(source).parent
    return parse_policy(data, str(source)), base_dir


def parse_policy(data: dict[str, Any], where: str = "policy") -> Policy:
    """Validate a policy mapping; the error names ``where`` and the offending key."""
    try:
        return Policy.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{where}: invalid routing policy: {describe(err)}") from None


@dataclass
class _Compiled:
    priority: int
    order: int
    rule: Rule
    layers: frozenset[str] | None  # expert-local layer names the block condition selects (None: every layer)


class MixPlan:
    """The policy's default + rules bound to one routed model: per expert call, each layer's precision.

    Block and expert conditions are resolved once (`compile`); a call only checks the step conditions, and the
    answer per (expert, step) is cached.
    """

    def __init__(self, policy: Policy, rules: dict[str, list[_Compiled]], layers: dict[str, list[str]]) -> None:
        self.policy = policy
        self._rules = rules
        self._layers = layers
        self._cache: dict[tuple[str, int, int | None], dict[str, str]] = {}

    @classmethod
    def compile(cls, policy: Policy, routed: RoutedModel) -> MixPlan:
        adapter = routed.adapter
        experts = list(adapter.experts())
        layers = {e: [local for local, _ in routed.layers_of(e)] for e in experts}
        rules: dict[str, list[_Compiled]] = {e: [] for e in experts}
        for i, rule in enumerate(policy.rules):
            if rule.experts is not None and (unknown := [e for e in rule.experts if e not in experts]):
                raise ValueError(f"rules.{i}.experts: no expert '{unknown[0]}' in this "
                                 f"{adapter.family} model (experts: {', '.join(experts)})")
            for expert in rule.experts or experts:
                selected = None
                if rule.blocks is not None:
                    count = len(adapter.blocks(expert))
                    if count == 0:
                        raise ValueError(f"rules.{i}.blocks: expert '{expert}' has no block structure")
                    try:
                        wanted = set(resolve_blocks(rule.blocks, expert, count))
                    except ValueError as err:
                        raise ValueError(f"rules.{i}.blocks: {str(err).removeprefix('protect_blocks: ')}") from None
                    index = adapter.block_indices(expert, layers[expert])
                    selected = frozenset(n for n, b in zip(layers[expert], index, strict=True) if b in wanted)
                rules[expert].append(_Compiled(rule.priority, i, rule, selected))
        return cls(policy, rules, layers)

    def at(self, expert: str, step: int, num_steps: int | None) -> dict[str, str]:
        key = (expert, step, num_steps)
        if key not in self._cache:
            self._cache[key] = self._resolve(expert, step, num_steps)
        return self._cache[key]

    def _resolve(self, expert: str, step: int, num_steps: int | None) -> dict[str, str]:
        live = [c for c in self._rules.get(expert, []) if self._step_holds(c, step, num_steps)]
        live.sort(key=lambda c: (c.priority, c.order))  # the last one that holds wins
        chosen = {}
        for name in self._layers.get(expert, []):
            precision = self.policy.default
            for c in live:
                if c.layers is None or name in c.layers:
                    precision = c.rule.precision
            chosen[name] = precision
        return chosen

    def _step_holds(self, c: _Compiled, step: int, num_steps: int | None) -> bool:
        rule = c.rule
        if rule.steps is None and rule.step_indices is None:
            return True
        if num_steps is None:
            raise ValueError(f"rules.{c.order}: a step condition needs the generation's step count "
                             "(RoutedModel.begin(steps) before the pipeline call)")
        if rule.steps is not None:
            fraction = step / num_steps
            start, end = rule.steps
            return start <= fraction < end
        return any(step == (i if i >= 0 else num_steps + i) for i in rule.step_indices or [])

    def summary(self, num_steps: int) -> dict[str, list[dict[str, int]]]:
        """Per expert and step, how many layers run at each precision (the report's picture of the mix)."""
        out: dict[str, list[dict[str, int]]] = {}
        for expert in self._layers:
            rows = []
            for step in range(num_steps):
                counts: dict[str, int] = {}
                for precision in self.at(expert, step, num_steps).values():
                    counts[precision] = counts.get(precision, 0) + 1
                rows.append(counts)
            out[expert] = rows
        return out
