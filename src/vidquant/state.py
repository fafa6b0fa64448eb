"""The compact PTQ state: what turns a base model into its quantized version, and nothing more.

A state is a directory: ``manifest.json`` (format version, library version, recipe, plan, the base
checkpoint's config fingerprint, timestep-bin edges, and per quantized layer its formats, the sha256 of the
base weight it was made for, the names of its tensors and optionally ``info``, what the method chose there and
on what evidence (svdquant-gptq: GPTQ damping or RTN by held-out error, tokens seen, warnings); sealed by its
own checksum) and
``tensors.safetensors`` (per layer a dict of named tensors, each name owned and validated by a `QuantLinear`
part: ``mask``, ``act_clip``, ``lowrank_down`` / ``lowrank_up``, ``weight_packed``). A smoothing recipe keeps
no copy of the weights: `apply` quantizes the base checkpoint's own weights under the restored parameters.
SVDQuant-GPTQ's rounding depends on calibration data, so its state carries the residual packed in the weight
format (e.g. HiF4's 4.5 bits per value) and the BF16 low-rank factors. Either way `apply` first checks that
the base weights are the ones the state was made for. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import save_file
from torch import Tensor, nn

from . import __version__, formats
from .atomic import atomic_path
from .checksum import check_seal, file_sha256, hash_tensor, seal, tensor_sha256
from .models import adapter_for, split_name
from .nn import QuantLinear, StepContext, check_tensors, swap
from .nn.quant_linear import RUNTIMES
from .outputs import check_output
from .recipes import Recipe
from .safeio import TensorSpec, read_safetensors
from .validation import BinEdges, describe

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: the manifest checksums itself; 2: low-rank, packed weights, bins (1 and 2 still load)
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
STATE_FILES = (MANIFEST, TENSORS)
CHECKPOINT = ".partial"  # inside a state folder: the layers a long quantize has finished, for a rerun
STATE_OWNED = (*STATE_FILES, CHECKPOINT, f"{CHECKPOINT}.rank*-of-*")  # + torchrun ranks' own (`dist.rank_path`)
_SHA256 = r"^[0-9a-f]{64}$"


@dataclass
class LayerState:
    """How one target Linear is quantized: formats, named tensors, and the sha256 of the base weight it fits."""

    weight_format: str
    act_format: str | None
    weight_sha256: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    # what the method chose for this layer and on what evidence, e.g. {"gptq": "damp=0.1 (+1.2 dB over rtn on
    # held-out)", "tokens": 75000}; written to the manifest only when not empty (older states have none)
    info: dict[str, str | int | float] = field(default_factory=dict)


@dataclass
class PTQState:
    """Per quantized layer ("expert.layer") its `LayerState`, plus the recipe, plan and base fingerprint."""

    layers: dict[str, LayerState]
    recipe: dict
    base: dict  # config_sha256, model / statistics fingerprints, transformer weight bytes
    plan: dict = field(default_factory=dict)
    library_version: str = __version__
    timestep_bins: dict[str, list[float]] = field(default_factory=dict)  # per expert, for per-bin act_clip
    # quantization-aware fine-tuning (`ptq.finetune`): settings, losses before / after, what was kept; written
    # to the manifest only when not empty (a plain PTQ state has none)
    qat: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of the state's tensors (the manifest adds a few kB)."""
        return sum(t.nbytes for layer in self.layers.values() for t in layer.tensors.values())

    def manifest(self, tensors_sha256: str) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "recipe": self.recipe,
            "base": self.base,
            "plan": self.plan,
            "timestep_bins": self.timestep_bins,
            "layers": {
                name: {"weight_format": s.weight_format, "act_format": s.act_format,
                       "weight_sha256": s.weight_sha256, "tensors": sorted(s.tensors),
                       **({"info": dict(s.info)} if s.info else {})}
                for name, s in self.layers.items()
            },
            "tensors_sha256": tensors_sha256,
            **({"qat": self.qat} if self.qat else {}),
        }

    def save(self, directory: str | Path) -> Path:
        """Write the state into ``directory``: empty, new, or a state already (never anything else).

        Each file is written to a temporary name and renamed, the manifest last: it holds the tensors'
        checksum, so a reader sees the old state, the new one, or a checksum error, never a mix.
        """
        directory = check_output(directory, STATE_OWNED, "PTQ state")
        directory.mkdir(parents=True, exist_ok=True)
        tensors, seen = {}, set()
        for name, layer in self.layers.items():
            for key, value in layer.tensors.items():
                t = value.detach().contiguous().cpu()
                if t.untyped_storage().data_ptr() in seen:  # one tensor shared by layers: safetensors stores copies
                    t = t.clone()
                seen.add(t.untyped_storage().data_ptr())
                tensors[f"{name}.{key}"] = t
        with atomic_path(directory / TENSORS) as tmp:
            save_file(tensors, tmp)
            tensors_sha256 = file_sha256(tmp)
        with atomic_path(directory / MANIFEST) as tmp:
            tmp.write_text(json.dumps(seal(self.manifest(tensors_sha256)), indent=1, sort_keys=True))
        return directory

    def fingerprint(self) -> str:
        """sha256 of what the state does (manifest fields and tensor bytes), independent of file layout."""
        digest = hashlib.sha256(json.dumps(self.manifest(""), sort_keys=True).encode())
        for name in sorted(self.layers):  # a loaded state lists its layers in the manifest's sorted order
            for key, tensor in sorted(self.layers[name].tensors.items()):
                digest.update(f"\n{name}.{key}".encode())
                hash_tensor(digest, tensor)
        return digest.hexdigest()


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    config_sha256: str = Field(pattern=_SHA256)
    transformer_bf16_bytes: int = Field(gt=0)
    stats_model_fingerprint: str | None = None
    stats_fingerprint: str | None = None


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight_format: str
    act_format: str | None
    weight_sha256: str = Field(pattern=_SHA256)
    tensors: list[str]
    info: dict[str, str | int | float] = {}  # optional: the method's per-layer choices (absent in older states)

    @field_validator("weight_format", "act_format")
    @classmethod
    def _known(cls, name: str | None) -> str | None:
        if name is not None and name not in formats.names():
            raise ValueError(f"unknown format '{name}'")
        return name

    @field_validator("tensors")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a tensor name is listed twice")
        return names


class Manifest(BaseModel):
    """The schema of ``manifest.json``: types, ranges and cross-checks before any tensor is read."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    library_version: str = Field(min_length=1)
    recipe: dict[str, Any]
    base: _Base
    plan: dict[str, Any] = {}
    timestep_bins: dict[str, BinEdges] = {}
    layers: dict[str, _Layer]
    tensors_sha256: str = Field(pattern=_SHA256)
    manifest_sha256: str | None = None
    qat: dict[str, Any] = {}  # optional: a fine-tuned state's QAT record (absent in PTQ states)

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, recipe: dict[str, Any]) -> dict[str, Any]:
        Recipe.model_validate(recipe)  # raises on an empty or edited recipe
        return recipe

    @field_validator("layers")
    @classmethod
    def _names(cls, layers: dict[str, _Layer]) -> dict[str, _Layer]:
        for name in layers:
            split_name(name)
        return layers


def load_state(directory: str | Path) -> PTQState:
    """Read a state written by `PTQState.save`, refusing malformed, truncated or tampered files."""
    directory = Path(directory)
    manifest_file, tensors_file = directory / MANIFEST, directory / TENSORS
    for f in (manifest_file, tensors_file):
        if not f.is_file():
            raise ValueError(f"{directory}: not a PTQ state (no {f.name}); create one with `vidquant quantize`")
    try:
        raw = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"{manifest_file}: unreadable manifest ({err})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ValueError(f"{manifest_file}: state format version {version} is not one "
                         f"this vidquant reads ({', '.join(map(str, READABLE_VERSIONS))})")
    if version >= 3:
        check_seal(raw, manifest_file)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"{manifest_file}: invalid manifest: {describe(err)}") from None
    if file_sha256(tensors_file) != manifest.tensors_sha256:
        raise ValueError(f"{tensors_file}: checksum differs from the manifest's (truncated or modified)")
    expected = {f"{name}.{k}": TensorSpec() for name, info in manifest.layers.items() for k in info.tensors}
    tensors, _ = read_safetensors(tensors_file, expected, what="PTQ state")  # names checked before allocation
    layers = {
        name: LayerState(info.weight_format, info.act_format, info.weight_sha256,
                         {k: tensors[f"{name}.{k}"] for k in info.tensors}, dict(info.info))
        for name, info in manifest.layers.items()
    }
    return PTQState(layers, manifest.recipe, manifest.base.model_dump(), manifest.plan, manifest.library_version,
                    manifest.timestep_bins, manifest.qat)


def verify(model: Any, state: PTQState) -> list[tuple[str, nn.Linear, LayerState]]:
    """Check that ``model`` is the base checkpoint ``state`` was made for; return what `apply` swaps.

    The same configs, and for every layer a plain Linear with the same weight (sha256) and tensors its parts
    accept; the error names what differs. Cheap next to generation, so long jobs call it before any work.
    """
    adapter = adapter_for(model)
    config = adapter.config_fingerprint()
    if config != state.base["config_sha256"]:
        raise ValueError(f"this state was made for another model: config fingerprint {state.base['config_sha256']}"
                         f" vs the model's {config} (class, routing or expert configs differ)")
    targets = []
    for name, layer in state.layers.items():
        expert, _ = split_name(name)
        try:
            module = adapter.linear(name)
        except ValueError as err:
            raise ValueError(f"{err}: expected a plain nn.Linear in the base model") from None
        if isinstance(module, QuantLinear):
            raise ValueError(f"layer {name}: expected a plain nn.Linear in the base model, found QuantLinear")
        if tensor_sha256(module.weight) != layer.weight_sha256:
            raise ValueError(f"layer {name}: its weight differs from the one this state was made for "
                             "(another checkpoint, a fine-tune, or another dtype)")
        check_tensors(layer.tensors, module.out_features, module.in_features, layer.weight_format, f"layer {name}")
        clip = layer.tensors.get("act_clip")
        if clip is not None and clip.dim() == 1:
            edges = state.timestep_bins.get(expert)
            if edges is None or len(edges) - 1 != clip.numel():
                raise ValueError(f"layer {name}: {clip.numel()} per-bin clip ratios, but the state has "
                                 f"{'no' if edges is None else len(edges) - 1} timestep bins for {expert}")
        targets.append((name, module, layer))
    return targets


def apply(model: Any, state: PTQState, runtime: str = "auto", tile_rows: int | None = None) -> None:
    """Quantize ``model`` in place under ``state``: every listed Linear becomes a `QuantLinear`.

    ``runtime``: "packed" keeps each weight in its format's bytes and decodes it per call (``tile_rows`` rows
    at a time; None: whole), so the process really holds fewer bytes; "fake" keeps the dense dequantized weight
    (the simulation); "auto" packs every weight format below 16 bits. The base Linears' weights are released
    as their layers are swapped. `verify` runs first, before any module changes; the model's adapter then
    publishes each expert call's timestep bin to that expert's quantized layers (per-bin clip ratios).
    """
    if runtime not in ("auto", *RUNTIMES):
        raise ValueError(f"runtime must be 'auto', {' or '.join(map(repr, RUNTIMES))}, got {runtime!r}")
    adapter = adapter_for(model)
    targets = verify(model, state)
    contexts = {expert: StepContext() for expert in adapter.experts()}
    experts = adapter.experts()
    for name, module, layer in targets:
        expert, module_name = split_name(name)
        chosen = runtime if runtime != "auto" else (
            "packed" if formats.get(layer.weight_format).bits_per_value < 16 else "fake")
        swap(experts[expert], module_name, quant_linear(module, layer, contexts[expert], name, chosen, tile_rows))
    adapter.publish_bins(state.timestep_bins, lambda expert, b: setattr(contexts[expert], "timestep_bin", b))
    logger.info("applied a PTQ state: %d Linears quantized", len(targets))


def quant_linear(module: nn.Linear, layer: LayerState, context: StepContext | None = None,
                 name: str = "layer", runtime: str = "fake", tile_rows: int | None = None) -> QuantLinear:
    """The `QuantLinear` that ``layer`` makes of the base Linear ``module`` (on its device)."""
    return QuantLinear.from_state(module, layer.weight_format, layer.act_format, layer.tensors, context=context,
                                  name=name, runtime=runtime, tile_rows=tile_rows)


def checkpoint_of(directory: str | Path) -> Path:
    """Where quantizing into ``directory`` keeps its finished layers (inside it: nothing escapes ``--out``)."""
    return Path(directory) / CHECKPOINT


def remove_state(directory: str | Path) -> None:
    """Delete a state folder written by `PTQState.save` (a checkpoint); refuse one holding anything else."""
    directory = check_output(directory, STATE_FILES, "PTQ state")
    if not directory.is_dir():
        return
    for entry in directory.iterdir():  # only our own files are left, `check_output` made sure
        if entry.is_dir():
            raise ValueError(f"{entry}: a folder inside a checkpoint; remove it by hand")
        entry.unlink()
    directory.rmdir()
