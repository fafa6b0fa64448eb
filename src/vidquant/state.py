"""The compact PTQ state: what turns a base pipeline into its quantized version, and nothing more.

A state is a directory: ``manifest.json`` (format version, library version, recipe, plan, the base
checkpoint's config fingerprint, timestep-bin edges, and per quantized layer its formats and the sha256 of
the base weight it was made for) and ``tensors.safetensors`` (masks, clip ratios, low-rank factors, packed
weights). A smoothing recipe keeps no copy of the weights: `apply` quantizes the base checkpoint's own
weights under the restored parameters. SVDQuant-GPTQ's rounding depends on calibration data, so its state
carries the residual packed in the weight format (``weight_packed``, e.g. HiF4's 4.5 bits per value) and the
BF16 low-rank factors. Either way `apply` first checks that the base weights are the ones the state was
made for. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import __version__, formats
from .models import wan
from .nn import QuantLinear, swap

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: low-rank factors, packed weights, timestep bins (version 1 states still load)
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
LAYER_TENSORS = ("mask", "act_clip", "lowrank_down", "lowrank_up", "weight_packed")


@dataclass
class LayerState:
    """How one target Linear is quantized; ``weight_sha256`` names the base weight it was made for."""

    weight_format: str
    act_format: str | None
    weight_sha256: str
    mask: Tensor | None = None
    act_clip: Tensor | None = None  # a scalar, or one ratio per timestep bin of the layer's expert
    lowrank_down: Tensor | None = None  # (rank, in_features)
    lowrank_up: Tensor | None = None  # (out_features, rank)
    weight_packed: Tensor | None = None  # uint8: `weight_format.pack` of the quantized residual (along in_features)

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in LAYER_TENSORS if getattr(self, k) is not None}


@dataclass
class PTQState:
    """Per quantized layer ("expert.layer") its `LayerState`, plus the recipe, plan and base fingerprint."""

    layers: dict[str, LayerState]
    recipe: dict
    base: dict  # config_sha256, stats model fingerprint, transformer weight bytes
    plan: dict = field(default_factory=dict)
    library_version: str = __version__
    timestep_bins: dict[str, list[float]] = field(default_factory=dict)  # per expert, for per-bin act_clip

    def nbytes(self) -> int:
        """Bytes of the state's tensors (the manifest adds a few kB)."""
        return sum(t.nbytes for layer in self.layers.values() for t in layer.tensors().values())

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
                       "weight_sha256": s.weight_sha256, "tensors": sorted(s.tensors())}
                for name, s in self.layers.items()
            },
            "tensors_sha256": tensors_sha256,
        }

    def save(self, directory: str | Path) -> Path:
        """Write the state to ``directory`` atomically (a complete old state stays until the new one is)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            tensors = {f"{name}.{k}": v.detach().contiguous().cpu()
                       for name, s in self.layers.items() for k, v in s.tensors().items()}
            save_file(tensors, tmp / TENSORS)
            manifest = self.manifest(_file_sha256(tmp / TENSORS))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            old = None
            if directory.exists():
                old = directory.with_name(tmp.name + ".old")
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return directory


def load_state(directory: str | Path) -> PTQState:
    """Read a state written by `PTQState.save`, refusing truncated or tampered files."""
    directory = Path(directory)
    manifest_file, tensors_file = directory / MANIFEST, directory / TENSORS
    for f in (manifest_file, tensors_file):
        if not f.is_file():
            raise ValueError(f"{directory}: not a PTQ state (no {f.name}); create one with `vidquant quantize`")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_file}: unreadable manifest ({err})") from err
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{manifest_file}: state format version {manifest.get('format_version')} is not one "
                         f"this vidquant reads ({', '.join(map(str, READABLE_VERSIONS))})")
    if _file_sha256(tensors_file) != manifest.get("tensors_sha256"):
        raise ValueError(f"{tensors_file}: checksum differs from the manifest's (truncated or modified)")
    try:
        tensors = load_file(tensors_file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{tensors_file}: unreadable ({err})") from err
    layers = {}
    for name, info in manifest["layers"].items():
        missing = [k for k in info["tensors"] if f"{name}.{k}" not in tensors]
        if missing:
            raise ValueError(f"{tensors_file}: layer {name} lacks its tensors {missing}")
        layers[name] = LayerState(info["weight_format"], info["act_format"], info["weight_sha256"],
                                  **{k: tensors[f"{name}.{k}"] for k in info["tensors"]})
    return PTQState(layers, manifest["recipe"], manifest["base"], manifest.get("plan", {}),
                    manifest["library_version"], manifest.get("timestep_bins", {}))


def apply(pipe, state: PTQState) -> None:
    """Quantize ``pipe`` in place under ``state``: every listed Linear becomes a `QuantLinear`.

    Checks first, before any module changes, that ``pipe`` is the base checkpoint the state was made for:
    the same configs, and for every layer the same weight (sha256); the error names what differs.
    """
    config = wan.config_fingerprint(pipe)
    if config != state.base["config_sha256"]:
        raise ValueError(f"this state was made for another model: config fingerprint {state.base['config_sha256']}"
                         f" vs the pipeline's {config} (pipeline class, boundary ratio or expert configs differ)")
    experts = wan.experts(pipe)
    targets = []
    for name, layer in state.layers.items():
        expert, module_name = name.split(".", 1)
        module = _submodule(experts.get(expert), module_name)
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            kind = "missing" if module is None else type(module).__name__
            raise ValueError(f"layer {name}: expected a plain nn.Linear in the base pipeline, found {kind}")
        if wan.tensor_sha256(module.weight) != layer.weight_sha256:
            raise ValueError(f"layer {name}: its weight differs from the one this state was made for "
                             "(another checkpoint, a fine-tune, or another dtype)")
        if layer.act_clip is not None and layer.act_clip.dim() == 1:
            edges = state.timestep_bins.get(expert)
            if edges is None or len(edges) - 1 != layer.act_clip.numel():
                raise ValueError(f"layer {name}: {layer.act_clip.numel()} per-bin clip ratios, but the state has "
                                 f"{'no' if edges is None else len(edges) - 1} timestep bins for {expert}")
        targets.append((experts[expert], module_name, module, layer))
    for model, module_name, module, layer in targets:
        swap(model, module_name, quant_linear(module, layer))
    wan.publish_timestep_bins(pipe, state.timestep_bins)
    logger.info("applied a PTQ state: %d Linears quantized", len(targets))


def quant_linear(module: nn.Linear, layer: LayerState) -> QuantLinear:
    """The `QuantLinear` that ``layer`` makes of the base Linear ``module`` (on its device)."""
    device = module.weight.device
    to = {k: None if v is None else v.to(device) for k, v in layer.tensors().items()}
    lowrank = None if layer.lowrank_down is None else (to["lowrank_down"], to["lowrank_up"])
    quantized = None
    if layer.weight_packed is not None:
        fmt = formats.get(layer.weight_format)
        encoded = fmt.unpack(to["weight_packed"], tuple(module.weight.shape), -1, module.weight.dtype)
        quantized = fmt.decode(encoded)
    return QuantLinear(module, layer.weight_format, layer.act_format, mask=to.get("mask"),
                       act_clip=to.get("act_clip"), lowrank=lowrank, quantized_weight=quantized)


def _submodule(model: nn.Module | None, name: str) -> nn.Module | None:
    try:
        return None if model is None else model.get_submodule(name)
    except AttributeError:
        return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
