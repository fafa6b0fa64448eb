"""The recipe schema: what to quantize, to which formats, and how to build the masks (data, not code).

Unknown keys are errors (``extra="forbid"``), so a typo in a YAML file cannot silently fall back to a
default. The smoothing defaults live here only; bundled recipes inherit them instead of repeating them.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidquant import formats
from vidquant.methods.smoothing import DEFAULT_EPS
from vidquant.patterns import compile_pattern
from vidquant.safeyaml import bundled_names, load_named_mapping
from vidquant.validation import describe

logger = logging.getLogger(__name__)

# Defaults of the mask construction m_i = w_i^alpha / (a_i + eps)^(1 - alpha) (paper Eq. 8), a_i the
# per-channel p-th percentile of |x| (Eq. 6). Chosen by the search of bench/smoothing.py (README: alpha 0.4,
# p99.9 and the a_max / 4 guard were best for hif4 on the tiny pipeline's held-out layer outputs).
DEFAULT_PERCENTILE = 99.9
DEFAULT_ALPHA = 0.4
DEFAULT_MAX_RATIO = 4.0

_BUNDLED = resources.files("vidquant.recipes")  # the bundled *.yaml recipes sit next to this module


class Smoothing(BaseModel):
    """SmoothQuant-style channel balancing: the activation statistic a_i and the mask's alpha / eps.

    ``statistic``: "percentile" (Eq. 6, the paper's tail-aware variant), "max" (Eq. 5, the conservative
    one) or "none" (no mask: plain round-to-nearest).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    statistic: Literal["none", "max", "percentile"] = "percentile"
    percentile: float = Field(DEFAULT_PERCENTILE, ge=90.0, le=100.0)
    alpha: float = Field(DEFAULT_ALPHA, ge=0.0, le=1.0)
    eps: float = Field(DEFAULT_EPS, gt=0.0)
    # Guard: a_i = max(a_i^p, a_i^max / max_ratio), so a channel silent in more than (100 - p) % of tokens
    # keeps a range; without it its rare spikes flush the weight column (bench/smoothing.py). None: off.
    max_ratio: float | None = Field(DEFAULT_MAX_RATIO, ge=1.0)


class Rotation(BaseModel):
    """An online randomized Hadamard rotation of every quantized Linear's input, folded into its weight.

    ``x W^T = (x R)(W R)^T``, ``R = D H / sqrt(n)`` (`methods.rotation`), applied after the smoothing mask
    (smooth, then rotate). ``block``: "full" (the widest power of two tiling K: K itself, 1024 at K = 5120) or a
    quantization unit (64 HiF4, 32 MX, 16 NVFP4); ``seed``: the random signs D (stored in the state).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["hadamard"] = "hadamard"
    block: Literal["full", 64, 32, 16] = "full"
    seed: int = Field(0, ge=0, lt=2**63)


class Recipe(BaseModel):
    """A quantization recipe; layer rules are patterns over qualified names ``"{expert}.{layer}"``.

    Patterns are shell patterns matched against the whole name (``fnmatch.fnmatchcase``; ``*`` crosses
    dots) or, with the ``re:`` prefix, regular expressions that must match the whole name.
    ``protect_blocks`` keeps whole blocks in high precision in every expert (negative indices count from
    the end, so ``[0, 1, -3, -2, -1]`` is "first 2 and last 3" at any depth); ``max_protected_blocks`` caps the
    (expert, block) pairs that this protects over all experts. ``protect_blocks: auto`` lets quantizing
    choose up to ``max_protected_blocks`` pairs by measured sensitivity, each at least ``auto_stand_out`` times
    the median block's (0: always spend the whole budget; `recipes.select.choose_blocks`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(min_length=1)
    description: str = ""
    method: str = "smoothquant"  # a registered method (`ptq.registry`); its options: the section of that name
    weights: str
    activations: str | None
    include: list[str] = ["*"]
    protect: list[str] = []
    protect_blocks: list[int] | Literal["auto"] = []
    max_protected_blocks: int | None = Field(None, ge=0)
    auto_stand_out: float = Field(2.0, ge=0.0)  # auto: keep a block only at >= this x the median sensitivity
    # auto: "call", each block's output error on replayed expert calls (cheap), or "trajectory", the final latents'
    # error over short held-out denoising runs with only that block quantized (sees the error compound over steps;
    # one run per candidate block and prompt: `eval.blocks.trajectory_sensitivity`)
    auto_sensitivity: Literal["call", "trajectory"] = "call"
    smoothing: Smoothing = Smoothing()
    act_clip: float | None = Field(None, gt=0.0, le=1.0)
    rotation: Rotation | None = None  # a Hadamard rotation after the mask (None: none)
    options: Any = None  # the method's validated section (its `Options` model); YAML key: the method's name

    @model_validator(mode="before")
    @classmethod
    def _method_section(cls, data: Any) -> Any:
        """Take the section named after the method and validate it with the method's own schema."""
        if not isinstance(data, dict):
            return data
        data = _migrate(dict(data))
        method = data.get("method", "smoothquant")
        if not isinstance(method, str):
            raise ValueError(f"method: a method name is expected, got {method!r}")
        options_cls = _method(method).Options
        section = data.pop(method, None)
        if "options" in data:
            if section is not None:
                raise ValueError(f"give the options of method '{method}' once (under '{method}')")
            section = data.pop("options")
        if isinstance(section, options_cls):
            data["options"] = section
            return data
        try:
            data["options"] = options_cls.model_validate(section or {})
        except ValidationError as err:
            raise ValueError(describe(err, method, limit=10)) from None
        return data

    @model_validator(mode="after")
    def _method_rules(self) -> Recipe:
        if self.protect_blocks == "auto" and self.max_protected_blocks is None:
            raise ValueError("protect_blocks: auto needs max_protected_blocks (how many blocks it may keep)")
        _method(self.method)().check(self)
        return self

    @property
    def auto_protect(self) -> bool:
        """Whether the protected blocks are chosen by measured sensitivity when quantizing."""
        return self.protect_blocks == "auto"

    @field_validator("protect_blocks", mode="before")
    @classmethod
    def _blocks_or_auto(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"a list of block indices or 'auto', got {value!r}")
        if isinstance(value, list):
            for item in value:
                if isinstance(item, bool) or not isinstance(item, int):
                    raise ValueError(f"block indices are integers (negative: from the end), got {item!r}")
        return value

    @field_validator("weights", "activations")
    @classmethod
    def _known_format(cls, name: str | None) -> str | None:
        if name is not None and name not in formats.names():
            raise ValueError(f"unknown format '{name}'; known formats: {', '.join(formats.names())}")
        return name

    @field_validator("include", "protect")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not pattern:
                raise ValueError("empty pattern")
            compile_pattern(pattern)  # RE2 for regexes: no catastrophic backtracking
        return patterns

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (for manifests); ``Recipe.model_validate`` turns it back into the recipe."""
        # keys of features a recipe does not use are left out, so manifests (and fingerprints) of recipes without
        # them stay as they were: no rotation, no auto protection
        unused = {"rotation"} if self.rotation is None else set()
        unused |= set() if self.auto_protect else {"auto_stand_out"}
        unused |= set() if self.auto_protect and self.auto_sensitivity != "call" else {"auto_sensitivity"}
        data = self.model_dump(mode="json", exclude={"options"} | unused)
        if self.options is not None and type(self.options).model_fields:
            data[self.method] = self.options.model_dump(mode="json")
        return data


def recipe_names() -> list[str]:
    """The bundled recipes (YAML files shipped in this package), by name."""
    return bundled_names(_BUNDLED)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A bundled recipe by name ("tail-aware-hif4") or a user's YAML file; errors name the file and the key.

    A file without a ``name`` key takes its file name (without suffix) as the recipe's name.
    """
    data, source, _ = load_named_mapping(name_or_path, _BUNDLED, "recipe")  # safe, bounded YAML, no duplicate keys
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{source}: invalid recipe: {describe(err, limit=10)}") from None
    logger.debug("loaded recipe '%s' from %s", recipe.name, source)
    return recipe


# Keys of the svdquant-gptq section that recipes and states of vidquant <= 0.1 (state format 2) kept at the top.
_LEGACY_SECTIONS = {"svdquant-gptq": ("lowrank", "gptq", "clip_search", "sequential_experts")}


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Move a method's options written at the top level (the old layout) into its section."""
    method = data.get("method", "smoothquant")
    for owner, keys in _LEGACY_SECTIONS.items():
        if found := [k for k in keys if k in data]:
            if method != owner:
                raise ValueError(f"{', '.join(found)}: only with method {owner}")
            section = dict(data.get(owner) or {})
            for key in found:
                section.setdefault(key, data.pop(key))
            data[owner] = section
    return data


def _method(name: str) -> Any:
    from vidquant.ptq.registry import method_class  # the registry imports the methods, which import recipes

    return method_class(name)
