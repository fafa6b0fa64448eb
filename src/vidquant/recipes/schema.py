"""The recipe schema: what to quantize, to which formats, and how to build the masks (data, not code).

Unknown keys are errors (``extra="forbid"``), so a typo in a YAML file cannot silently fall back to a
default. The smoothing defaults live here only; bundled recipes inherit them instead of repeating them.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidquant import formats
from vidquant.methods.lowrank import DEFAULT_ITERS as DEFAULT_LOWRANK_ITERS
from vidquant.methods.smoothing import DEFAULT_EPS
from vidquant.patterns import compile_pattern
from vidquant.safeyaml import load_yaml

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

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


class LowRank(BaseModel):
    """SVDQuant's low-rank branch: ``W/m ≈ up · down`` of rank r kept in BF16, the residual quantized.

    The rank is capped at ``max_fraction · min(N, K)`` so that on a narrow layer the branch stays a small
    correction instead of a full-precision copy of the weight (at Wan's 5120 the cap is 640, far above 32).
    ``iters``: refinement rounds (re-SVD of what rounding leaves, keep the best; 0: the plain SVD branch).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rank: int = Field(32, ge=0)  # 0: no branch
    max_fraction: float = Field(0.125, gt=0.0, le=1.0)
    iters: int = Field(DEFAULT_LOWRANK_ITERS, ge=0)  # methods.lowrank's default

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The rank used for an ``(out_features, in_features)`` weight."""
        return min(self.rank, int(self.max_fraction * min(out_features, in_features)))


class GPTQ(BaseModel):
    """GPTQ on the residual (Frantar et al.): damping relative to mean(diag H), lazy block size, act order."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0.0)
    act_order: bool = False


class ClipSearch(BaseModel):
    """Per layer, expert and timestep bin, the activation clip ratio of ``grid`` with the least output MSE.

    ``bins`` equal timestep bins over each expert's share of the schedule; ``max_tokens`` calibration rows
    are kept per bin and layer input to score the grid.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    bins: int = Field(4, ge=1)
    grid: list[float] = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0]
    max_tokens: int = Field(256, ge=1)

    @field_validator("grid")
    @classmethod
    def _ratios(cls, grid: list[float]) -> list[float]:
        if not grid or not all(0.0 < c <= 1.0 for c in grid):
            raise ValueError("clip ratios must be in (0, 1]")
        if 1.0 not in grid:
            raise ValueError("the grid must hold 1.0 (no clipping), so the search can never do worse than none")
        return sorted(set(grid))


SVDQUANT_ONLY = ("lowrank", "gptq", "clip_search", "sequential_experts")


class Recipe(BaseModel):
    """A quantization recipe; layer rules are patterns over qualified names ``"{expert}.{layer}"``.

    Patterns are shell patterns matched against the whole name (``fnmatch.fnmatchcase``; ``*`` crosses
    dots) or, with the ``re:`` prefix, regular expressions that must match the whole name.
    ``protect_blocks`` keeps whole blocks in high precision in every expert (negative indices count from
    the end); ``max_protected_blocks`` caps the (expert, block) pairs that this protects over all experts.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(min_length=1)
    description: str = ""
    method: Literal["smoothquant", "svdquant-gptq"] = "smoothquant"
    weights: str
    activations: str | None
    include: list[str] = ["*"]
    protect: list[str] = []
    protect_blocks: list[int] = []
    max_protected_blocks: int | None = Field(None, ge=0)
    smoothing: Smoothing = Smoothing()
    act_clip: float | None = Field(None, gt=0.0, le=1.0)
    # method svdquant-gptq (timestep-aware SVDQuant-GPTQ, arXiv 2605.27003) only:
    lowrank: LowRank = LowRank()
    gptq: GPTQ = GPTQ()
    clip_search: ClipSearch = ClipSearch()
    sequential_experts: bool = False  # calibrate transformer_2 on inputs made with transformer quantized

    @model_validator(mode="after")
    def _method_keys(self) -> Recipe:
        if self.method == "smoothquant":
            if given := [k for k in SVDQUANT_ONLY if getattr(self, k) != type(self).model_fields[k].default]:
                raise ValueError(f"{', '.join(given)}: only with method svdquant-gptq")
        elif self.act_clip is not None and self.clip_search.enabled:
            raise ValueError("act_clip: a fixed clip ratio and clip_search exclude each other (disable clip_search)")
        return self

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
        return self.model_dump(mode="json", exclude=set(SVDQUANT_ONLY) if self.method == "smoothquant" else None)


def recipe_names() -> list[str]:
    """The bundled recipes (YAML files shipped in this package), by name."""
    return sorted(entry.name.removesuffix(".yaml") for entry in _BUNDLED.iterdir() if entry.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A bundled recipe by name ("tail-aware-hif4") or a user's YAML file; errors name the file and the key.

    A file without a ``name`` key takes its file name (without suffix) as the recipe's name.
    """
    if isinstance(name_or_path, str) and name_or_path in recipe_names():
        source: Traversable | Path = _BUNDLED / f"{name_or_path}.yaml"
    else:
        source = Path(name_or_path).expanduser()
        if not source.is_file():
            raise ValueError(f"{name_or_path}: neither a bundled recipe ({', '.join(recipe_names())}) nor a file")
    try:
        text = source.read_bytes()
    except OSError as err:
        raise ValueError(f"{source}: unreadable ({err.strerror or err})") from None
    data = load_yaml(text, source=str(source))  # safe, bounded (size, depth, aliases), no duplicate keys
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a recipe must be a YAML mapping of keys to values, got {type(data).__name__}")
    data.setdefault("name", source.name.removesuffix(".yaml").removesuffix(".yml"))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{source}: invalid recipe: " + "; ".join(_describe(e) for e in err.errors())) from None
    logger.debug("loaded recipe '%s' from %s", recipe.name, source)
    return recipe


def _describe(error: Any) -> str:
    """One pydantic error as "key: what is wrong (got value)", with the key's dotted path."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if error["type"] == "missing":
        return f"missing key '{key}'"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{key}: {message} (got {error['input']!r})"
