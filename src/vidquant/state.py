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
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from . import __version__, formats
from .atomic import atomic_path
from .checksum import check_seal, file_sha256, hash_tensor, seal, tensor_sha256
from .models import wan
from .nn import QuantLinear, swap
from .outputs import check_output
from .safeio import TensorSpec, read_safetensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: the manifest checksums itself; 2: low-rank, packed weights, bins (1 and 2 still load)
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
STATE_FILES = (MANIFEST, TENSORS)
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
        """Write the state into ``directory``: empty, new, or a state already (never anything else).

        Each file is written to a temporary name and renamed, the manifest last: it holds the tensors'
        checksum, so a reader sees the old state, the new one, or a checksum error, never a mix.
        """
        directory = check_output(directory, STATE_FILES, "PTQ state")
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{k}": v.detach().contiguous().cpu()
                   for name, s in self.layers.items() for k, v in s.tensors().items()}
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
            for key, tensor in sorted(self.layers[name].tensors().items()):
                digest.update(f"\n{name}.{key}".encode())
                hash_tensor(digest, tensor)
        return digest.hexdigest()


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
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_VERSIONS:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{manifest_file}: state format version {version} is not one "
                         f"this vidquant reads ({', '.join(map(str, READABLE_VERSIONS))})")
    if manifest["format_version"] >= 3:
        check_seal(manifest, manifest_file)
    if file_sha256(tensors_file) != manifest.get("tensors_sha256"):
        raise ValueError(f"{tensors_file}: checksum differs from the manifest's (truncated or modified)")
    expected = {f"{name}.{k}": TensorSpec() for name, info in manifest["layers"].items() for k in info["tensors"]}
    tensors, _ = read_safetensors(tensors_file, expected, what="PTQ state")  # names checked before allocation
    layers = {}
    for name, info in manifest["layers"].items():
        layers[name] = LayerState(info["weight_format"], info["act_format"], info["weight_sha256"],
                                  **{k: tensors[f"{name}.{k}"] for k in info["tensors"]})
    return PTQState(layers, manifest["recipe"], manifest["base"], manifest.get("plan", {}),
                    manifest["library_version"], manifest.get("timestep_bins", {}))


def verify(pipe, state: PTQState) -> list[tuple[nn.Module, str, nn.Linear, LayerState]]:
    """Check that ``pipe`` is the base checkpoint ``state`` was made for; return what `apply` swaps.

    The same configs, and for every layer a plain Linear with the same weight (sha256); the error names
    what differs. Cheap next to generation, so long jobs call it before any work.
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
        if tensor_sha256(module.weight) != layer.weight_sha256:
            raise ValueError(f"layer {name}: its weight differs from the one this state was made for "
                             "(another checkpoint, a fine-tune, or another dtype)")
        if layer.act_clip is not None and layer.act_clip.dim() == 1:
            edges = state.timestep_bins.get(expert)
            if edges is None or len(edges) - 1 != layer.act_clip.numel():
                raise ValueError(f"layer {name}: {layer.act_clip.numel()} per-bin clip ratios, but the state has "
                                 f"{'no' if edges is None else len(edges) - 1} timestep bins for {expert}")
        targets.append((experts[expert], module_name, module, layer))
    return targets


def apply(pipe, state: PTQState) -> None:
    """Quantize ``pipe`` in place under ``state``: every listed Linear becomes a `QuantLinear`.

    `verify` runs first, before any module changes.
    """
    targets = verify(pipe, state)
    for model, module_name, module, layer in targets:
        swap(model, module_name, quant_linear(module, layer))
    wan.publish_timestep_bins(pipe, state.timestep_bins)
    logger.info("applied a PTQ state: %d Linears quantized", len(targets))


def remove_state(directory: str | Path) -> None:
    """Delete a state folder written by `PTQState.save` (a checkpoint); refuse one holding anything else."""
    directory = check_output(directory, STATE_FILES, "PTQ state")
    if not directory.is_dir():
        return
    for entry in directory.iterdir():  # only our own files are left, `check_output` made sure
        entry.unlink()
    directory.rmdir()


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
