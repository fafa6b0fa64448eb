"""A self-contained quantized checkpoint: ship the packed model without its BF16 base.

``export(pipe, state, out)`` writes

    out/export.json                 what it is (family, pipeline class, per expert its class, config and
                                    dtype, the base and state fingerprints, library version), sealed
    out/pipeline/                   the pipeline's other components, as diffusers saves them (no experts)
    out/experts/{name}.safetensors  each expert's weights that are not quantized (embedders, norms, biases)
    out/state/                      a PTQ state whose every layer carries its packed weight (`weight_packed`)

and ``load_quantized(out)`` rebuilds the pipeline: the experts are built on the meta device (no memory), their
quantized Linears become packed `QuantLinear` layers from the state, and the other weights are loaded in place
(``assign``), so no BF16 copy of a quantized weight ever exists. Same integrity rules as states: checksums and a
sealed manifest, files checked before any allocation, nothing unpickled, errors that name the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import init_empty_weights
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_path
from .checksum import check_seal, seal
from .models import adapter_for, split_name
from .models.loading import load_pipeline
from .nn import QuantLinear, StepContext, swap
from .outputs import locked_output
from .safeio import TensorSpec, read_header, read_safetensors
from .state import LayerState, PTQState, apply, load_state, verify
from .validation import describe

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "export.json"
EXPORT_OWNED = (MANIFEST, "pipeline", "experts", "state")
DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


class _Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class_name: str
    config: dict[str, Any]
    dtype: str


class ExportManifest(BaseModel):
    """The schema of ``export.json``."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern=r"^vidquant\.export$")
    format_version: int
    library_version: str
    family: str
    pipeline: str
    experts: dict[str, _Expert] = Field(min_length=1)
    base_fingerprint: str
    state_fingerprint: str  # of out/state (the source state plus every packed weight)
    source_state_fingerprint: str  # of the state given to `export`
    manifest_sha256: str


def export(pipe: Any, state: PTQState, out: str | Path) -> Path:
    """Write the self-contained quantized checkpoint of ``pipe`` under ``state`` into ``out`` (see the module).

    ``pipe`` is quantized in place (packed runtime) on the way: export it from a freshly loaded base.
    """
    adapter = adapter_for(pipe)
    if not adapter.is_pipeline:
        raise ValueError(f"export writes a video pipeline; a {type(pipe).__name__} ({adapter.family}) is not one: "
                         "save its state and apply it to the base instead")
    verify(pipe, state)
    base_fingerprint = adapter.fingerprint()
    with locked_output(out, EXPORT_OWNED, "vidquant export") as out:
        apply(pipe, state, runtime="packed")
        experts = adapter.experts()
        layers: dict[str, LayerState] = {}
        for name, layer in state.layers.items():
            expert, module_name = split_name(name)
            module = experts[expert].get_submodule(module_name)
            assert isinstance(module, QuantLinear) and module.packed is not None
            tensors = {k: v for k, v in layer.tensors.items() if k != "weight_packed"}
            (tile,) = module.packed.tiles()  # one tile: the format's bytes of the whole weight
            layers[name] = dataclasses.replace(layer, tensors={**tensors, "weight_packed": tile})
        packed = dataclasses.replace(state, layers=layers)  # recipe, base, plan, bins and any QAT record kept
        packed.save(out / "state")
        (out / "experts").mkdir(exist_ok=True)
        info = {}
        for name, model in experts.items():
            rest = {k: v.detach().contiguous().cpu() for k, v in _unquantized(model).items()}
            with atomic_path(out / "experts" / f"{name}.safetensors") as tmp:
                save_file(rest, tmp)
            info[name] = {"class_name": type(model).__name__, "dtype": str(_dtype(model)),
                          "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")}}
        removed = {name: getattr(pipe, name) for name in experts}
        try:
            pipe.register_modules(**dict.fromkeys(experts))
            pipe.save_pretrained(out / "pipeline")
        finally:
            pipe.register_modules(**removed)
        manifest = {"kind": "vidquant.export", "format_version": FORMAT_VERSION, "library_version": __version__,
                    "family": adapter.family, "pipeline": type(pipe).__name__, "experts": info,
                    "base_fingerprint": base_fingerprint, "state_fingerprint": packed.fingerprint(),
                    "source_state_fingerprint": state.fingerprint()}
        with atomic_path(out / MANIFEST) as tmp:  # last: a complete export has its manifest
            tmp.write_text(json.dumps(seal(manifest), indent=1, sort_keys=True, default=str))
    logger.info("exported %d packed layers to %s", len(layers), out)
    return Path(out)


def load_quantized(directory: str | Path, *, device: str | None = None) -> Any:
    """The quantized pipeline of an `export` folder, without its BF16 base; packed weights, ready to generate."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    state = load_state(directory / "state")
    if state.fingerprint() != manifest.state_fingerprint:
        raise ValueError(f"{directory / 'state'}: not the state this export was made with (fingerprint differs)")
    for component in sorted((directory / "pipeline").rglob("*.safetensors")):
        read_header(component)  # a truncated component is refused by name before anything is loaded
    pipe = load_pipeline(directory / "pipeline", device=device)
    contexts: dict[str, StepContext] = {}
    for name, info in manifest.experts.items():
        model = _packed_expert(directory, name, info, state, device, contexts.setdefault(name, StepContext()))
        pipe.register_modules(**{name: model})
    adapter = adapter_for(pipe)
    adapter.publish_bins(state.timestep_bins, lambda expert, b: setattr(contexts[expert], "timestep_bin", b))
    logger.info("loaded a quantized %s from %s", manifest.pipeline, directory)
    return pipe


def _packed_expert(directory: Path, name: str, info: _Expert, state: PTQState, device: str,
                   context: StepContext) -> torch.nn.Module:
    cls = getattr(diffusers, info.class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise ValueError(f"{directory / MANIFEST}: expert {name} has an unknown class {info.class_name!r}")
    if info.dtype not in DTYPES:
        raise ValueError(f"{directory / MANIFEST}: expert {name} has an unsupported dtype {info.dtype!r}")
    dtype = DTYPES[info.dtype]
    with init_empty_weights():  # parameters on the meta device; buffers (RoPE tables) computed as usual
        model = cls.from_config(info.config)  # dtypes come with the loaded tensors (fp32 islands stay fp32)
    for layer_name, layer in state.layers.items():
        expert, module_name = split_name(layer_name)
        if expert != name:
            continue
        if "weight_packed" not in layer.tensors:
            raise ValueError(f"{directory / 'state'}: layer {layer_name} has no packed weight: not an export")
        old = model.get_submodule(module_name)
        shape = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta",
                                dtype=dtype)  # the base as a shape only: its weight is never built
        swap(model, module_name, QuantLinear.from_state(shape, layer.weight_format, layer.act_format, layer.tensors,
                                                        context=context, name=layer_name, runtime="packed",
                                                        device=device))
    expected = {k: TensorSpec(dtype=v.dtype, shape=tuple(v.shape)) for k, v in _unquantized(model).items()}
    tensors, _ = read_safetensors(directory / "experts" / f"{name}.safetensors", expected, device=device,
                                  what=f"expert {name}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if meta := [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]:
        raise ValueError(f"{directory}: expert {name} lacks tensors {meta[:5]} (truncated or another version)")
    return model.to(device).eval()


def _unquantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` without its quantized layers' own tensors (their biases stay)."""
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    return {k: v for k, v in model.state_dict().items()
            if not any(k.startswith(f"{q}.") for q in quantized) or k in {f"{q}.bias" for q in quantized}}


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _read_manifest(directory: Path) -> ExportManifest:
    file = directory / MANIFEST
    if not file.is_file():
        raise ValueError(f"{directory}: not a vidquant export (no {MANIFEST}); create one with `vidquant export`")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"{file}: unreadable ({err})") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        raise ValueError(f"{file}: export format version {version} is not {FORMAT_VERSION} (another vidquant)")
    check_seal(raw, file)
    try:
        return ExportManifest.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"{file}: invalid export manifest: {describe(err)}") from None
