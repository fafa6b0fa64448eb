"""The model-adapter interface: the one place a model family is known, and the registry that picks one.

Everything outside ``vidquant.models`` works through `adapter_for(obj)` and never imports a concrete adapter:
a new model family is one adapter file here (`register_adapter`), nothing else. An adapter is bound to one
object (a diffusers pipeline, or any ``nn.Module``) and says

- its **experts** (denoisers: Wan2.2 has two, routed by timestep) and, per expert, the **target Linears**
  (quantized unless a recipe protects them), the **boundary Linears** (always high precision) and the
  ordered **blocks** (for block protection and per-block reports);
- for each expert call, its **timestep and CFG branch** (`CallInfo`), which calibration keys statistics by
  and which quantized layers read their per-timestep-bin parameters from (`publish_bins`);
- the **fingerprint** of the base weights that states and statistics record;
- for pipelines, how a **generation protocol** turns into pipeline-call arguments.

Layers are named ``"{expert}.{layer}"`` everywhere (`qualify` / `split_name`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vidquant.checksum import hash_tensor

logger = logging.getLogger(__name__)

BRANCHES = ("cond", "uncond")  # classifier-free guidance branches, as statistics key them


@dataclass(frozen=True)
class CallInfo:
    """What one expert call is: its timestep (None: the model has none) and CFG branch.

    ``branch`` is one index into `BRANCHES` for the whole call, or one per batch row when the pipeline
    stacks both branches in one batch (CogVideoX, LTX: ``cat([uncond, cond])``).
    """

    timestep: float | None
    branch: int | tuple[int, ...] = 0
    repeat: int = 0  # consecutive calls at this timestep before this one (any expert)


def qualify(expert: str, layer: str) -> str:
    """The qualified name ``"{expert}.{layer}"`` of a Linear (expert names hold no dot)."""
    return f"{expert}.{layer}"


def split_name(name: str) -> tuple[str, str]:
    """``"{expert}.{layer}"`` -> ``(expert, layer)``; the one parser of qualified names."""
    expert, dot, layer = name.partition(".")
    if not dot or not expert or not layer:
        raise ValueError(f"'{name}' is not a qualified layer name (expert.layer)")
    return expert, layer


def timestep_bin(t: float | None, edges: list[float]) -> int:
    """Index of the bin of ``edges`` holding timestep ``t`` (the ends are closed; no timestep: bin 0)."""
    if t is None:
        return 0
    for i in range(len(edges) - 2, -1, -1):
        if t >= edges[i]:
            return i
    return 0


def bin_edges(lo: float, hi: float, bins: int) -> list[float]:
    """Edges of ``bins`` equal timestep bins over ``[lo, hi]``."""
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


class ModelAdapter(ABC):
    """One model family's answers to what vidquant asks of a model; bound to one object (``self.obj``)."""

    family: ClassVar[str]
    is_pipeline: ClassVar[bool] = False  # runs a generation protocol from prompts
    pipeline_classes: ClassVar[dict[str, type]] = {}  # diffusers classes `loading.load_pipeline` loads for it

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    @classmethod
    @abstractmethod
    def accepts(cls, obj: Any) -> bool:
        """Whether this adapter understands ``obj``."""

    @classmethod
    def check_kind(cls, where: str, class_name: str, i2v: bool | None) -> None:
        """Raise when a saved ``class_name`` is not what the caller asked for (``i2v``: image-to-video)."""
        if i2v:
            raise ValueError(f"{where}: holds a {class_name}; image-to-video is not supported for {cls.family}")

    # ---- structure ---------------------------------------------------------------------------------
    @abstractmethod
    def experts(self) -> dict[str, nn.Module]:
        """The denoisers, in call order (names hold no dot)."""

    @abstractmethod
    def target_linears(self, expert: str) -> dict[str, nn.Linear]:
        """The Linears of ``expert`` a recipe may quantize, in model order."""

    def boundary_linears(self, expert: str) -> dict[str, nn.Linear]:
        """Linears of ``expert`` that are never quantized (embedders, output projections, modulation)."""
        targets = self.target_linears(expert)
        return {n: m for n, m in self.experts()[expert].named_modules()
                if isinstance(m, nn.Linear) and n not in targets}

    def blocks(self, expert: str) -> list[str]:
        """Module-name prefixes of ``expert``'s blocks in depth order (empty: no block structure)."""
        return []

    def block_indices(self, expert: str, layers: Iterable[str]) -> list[int | None]:
        """Depth index of the block holding each of ``layers`` (None: outside every block); `blocks` asked once."""
        index = {prefix: i for i, prefix in enumerate(self.blocks(expert))}
        out = []
        for layer in layers:
            parts = layer.split(".")
            prefixes = (".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1))
            out.append(next((index[p] for p in prefixes if p in index), None))
        return out

    def block_index(self, expert: str, layer: str) -> int | None:
        """Depth index of the block holding ``layer`` (None: outside every block)."""
        return self.block_indices(expert, [layer])[0]

    def input_groups(self, expert: str) -> list[list[str]]:
        """Target Linears grouped by the input tensor they share (default: one group each)."""
        return [[name] for name in self.target_linears(expert)]

    def linear(self, name: str) -> nn.Linear:
        """The target Linear of a qualified name, with an error naming it when there is none."""
        expert, layer = split_name(name)
        experts = self.experts()
        if expert not in experts:
            raise ValueError(f"layer {name}: no expert '{expert}' (this {self.family} model has {', '.join(experts)})")
        try:
            module = experts[expert].get_submodule(layer)
        except AttributeError:
            raise ValueError(f"layer {name}: no such module in expert '{expert}'") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer {name}: expected an nn.Linear, found {type(module).__name__}")
        return module

    def device(self) -> torch.device:
        return next(next(iter(self.experts().values())).parameters()).device

    # ---- calls: timestep bins and CFG branches ------------------------------------------------------
    def timestep_range(self, expert: str) -> tuple[float, float] | None:
        """The share ``[lo, hi]`` of the schedule ``expert`` denoises (None: the model has no timestep)."""
        return None

    def bin_edges(self, bins: int) -> dict[str, list[float]]:
        """Per expert, ``bins`` equal timestep bins over its share of the schedule (one bin without timesteps)."""
        edges = {}
        for expert in self.experts():
            span = self.timestep_range(expert)
            edges[expert] = [0.0, 1.0] if span is None else bin_edges(*span, bins)
        return edges

    def call_info(self, expert: str, args: tuple, kwargs: dict, previous: CallInfo | None) -> CallInfo:
        """The timestep and CFG branch of one call of ``expert`` (``previous``: its last call's)."""
        return CallInfo(None, 0)

    @contextmanager
    def watching_calls(self, on_call: Callable[[str, CallInfo], None],
                       experts: list[str] | None = None) -> Iterator[None]:
        """Within the block, ``on_call(expert, info)`` runs before every call of each expert."""
        last: list[CallInfo | None] = [None]  # shared by the experts: the pipeline's previous call, whichever
        handles = [model.register_forward_pre_hook(self._call_hook(name, on_call, last), with_kwargs=True)
                   for name, model in self.experts().items() if experts is None or name in experts]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def publish_bins(self, edges: dict[str, list[float]], set_bin: Callable[[str, int], None] | None) -> None:
        """Keep calling ``set_bin(expert, timestep bin)`` before every expert call (None: stop).

        How quantized layers follow the denoising step (per-bin clip ratios); calling it again replaces
        the hook instead of adding one.
        """
        last: list[CallInfo | None] = [None]
        for name, model in self.experts().items():
            old = model.__dict__.pop("_vidquant_bin_hook", None)
            if old is not None:
                old.remove()
            if set_bin is None or name not in edges:
                continue

            def on_call(expert: str, info: CallInfo, expert_edges=edges[name]) -> None:
                set_bin(expert, timestep_bin(info.timestep, expert_edges))

            model.__dict__["_vidquant_bin_hook"] = model.register_forward_pre_hook(
                self._call_hook(name, on_call, last), with_kwargs=True)

    def _call_hook(self, expert: str, on_call: Callable[[str, CallInfo], None], last: list[CallInfo | None]):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            last[0] = self.call_info(expert, args, kwargs, last[0])
            on_call(expert, last[0])

        return hook

    # ---- identity ---------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What the weights do not say (class, configs), JSON-ready, without volatile keys."""
        return {"class": type(self.obj).__name__,
                "experts": {name: _config_of(model) for name, model in self.experts().items()}}

    def config_fingerprint(self) -> str:
        """sha256 of `config`: states check it before applying."""
        return hashlib.sha256(json.dumps(self.config(), sort_keys=True, default=str).encode()).hexdigest()

    def fingerprint(self) -> str:
        """sha256 of `config_fingerprint` and every expert tensor (name, shape, dtype, bytes), one at a time."""
        digest = hashlib.sha256(self.config_fingerprint().encode())
        for name, model in self.experts().items():
            for key, tensor in sorted(model.state_dict().items()):
                digest.update(f"\n{name}.{key}".encode())
                hash_tensor(digest, tensor)
        return digest.hexdigest()

    # ---- generation (pipelines) -------------------------------------------------------------------
    def check_protocol(self, protocol: Any) -> None:
        """Raise a ValueError when the model cannot generate under ``protocol`` (sizes off its grid)."""
        self._need_pipeline("generate videos")

    def check_calibration(self, protocol: Any) -> None:  # noqa: B027 (optional: most families need no check)
        """Raise a ValueError when calibrating under ``protocol`` would leave an expert without inputs."""

    def call_kwargs(self, protocol: Any, prompt: str, seed: int) -> dict[str, Any]:
        """The pipeline-call arguments for ``prompt`` under ``protocol`` (calibration and generation alike)."""
        self._need_pipeline("generate videos")
        return {}

    def _need_pipeline(self, what: str) -> None:
        if not self.is_pipeline:
            raise ValueError(f"a {type(self.obj).__name__} ({self.family} adapter) cannot {what}: that needs a video "
                             "pipeline; calibrate it with a forward loop instead")


def _config_of(model: nn.Module) -> Any:
    """A module's config as plain data: diffusers/transformers configs, or the parameter shapes."""
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, dict):
        return {k: v for k, v in config.items() if not str(k).startswith("_")
                and k not in ("transformers_version", "diffusers_version", "name_or_path")}
    return {"class": type(model).__name__,
            "parameters": {n: [list(p.shape), str(p.dtype)] for n, p in model.named_parameters()}}


_ADAPTERS: list[type[ModelAdapter]] = []  # family adapters, asked in registration order
_FALLBACK: list[type[ModelAdapter]] = []  # asked last: the generic nn.Module adapter


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``cls`` known to `adapter_for`."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def register_fallback(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: the adapter for what no family adapter claims (asked after all of them)."""
    _FALLBACK[:] = [cls]
    return cls


def adapter_for(obj: Any) -> ModelAdapter:
    """The adapter of ``obj``: the first family adapter that accepts it, else the fallback (any nn.Module)."""
    if isinstance(obj, ModelAdapter):
        return obj
    for cls in (*_ADAPTERS, *_FALLBACK):
        if cls.accepts(obj):
            return cls(obj)
    raise ValueError(f"vidquant has no adapter for a {type(obj).__name__} (families: {', '.join(adapter_families())}):"
                     " pass a supported diffusers pipeline or an nn.Module (e.g. pipe.transformer) with a forward loop")


def adapter_families() -> list[str]:
    """The registered model families (the fallback last)."""
    return [c.family for c in (*_ADAPTERS, *_FALLBACK)]


@register_adapter
class ExpertMapAdapter(ModelAdapter):
    """A mapping of expert names to modules (e.g. ``{"transformer": t1, "transformer_2": t2}``), each described by
    its own module-level adapter: plan a model's layers without building its pipeline (meta-device A14B)."""

    family = "experts"

    @classmethod
    def accepts(cls, obj: Any) -> bool:
        return isinstance(obj, dict) and all(isinstance(m, nn.Module) for m in obj.values())

    def experts(self) -> dict[str, nn.Module]:
        if dotted := [name for name in self.obj if "." in name]:
            raise ValueError(f"expert names cannot contain '.' (they prefix qualified layer names): {dotted}")
        return dict(self.obj)

    def _inner(self, expert: str) -> tuple[ModelAdapter, str]:
        inner = adapter_for(self.obj[expert])
        return inner, next(iter(inner.experts()))

    def target_linears(self, expert: str) -> dict[str, nn.Linear]:
        inner, name = self._inner(expert)
        return inner.target_linears(name)

    def boundary_linears(self, expert: str) -> dict[str, nn.Linear]:
        inner, name = self._inner(expert)
        return inner.boundary_linears(name)

    def blocks(self, expert: str) -> list[str]:
        inner, name = self._inner(expert)
        return inner.blocks(name)

    def input_groups(self, expert: str) -> list[list[str]]:
        inner, name = self._inner(expert)
        return inner.input_groups(name)
