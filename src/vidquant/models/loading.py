"""Loading diffusers pipelines offline, for any registered family, with errors that say what is wrong.

`load_pipeline` finds the family from the folder's ``model_index.json`` (`ModelAdapter.pipeline_classes`);
weights load in bfloat16 on CUDA and float32 on the CPU, the VAE in float32 (the same in the reference and
the quantized runs). On the CPU each weight is copied out of the memory-mapped safetensors file: misaligned
tensors take other BLAS kernels, which round differently, so results would otherwise depend on the file
layout (seen: 6e-7 differences between a model and its save/load round trip).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline
from torch import nn

from vidquant.models import base

if TYPE_CHECKING:
    from vidquant.models.base import ModelAdapter

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_pipeline(model: str | Path, *, i2v: bool | None = None, dtype: torch.dtype | None = None,
                  device: str | None = None) -> Any:
    """A pipeline of any registered family from a local diffusers folder (offline) or a hub id."""
    return load_with([a for a in base._ADAPTERS if a.pipeline_classes], model, i2v=i2v, dtype=dtype, device=device)


def load_with(adapters: Sequence[type[ModelAdapter]], model: str | Path, *, i2v: bool | None = None,
              dtype: torch.dtype | None = None, device: str | None = None) -> Any:
    """Load a pipeline of one of ``adapters``' classes; ``i2v``, when given, must match what the folder holds."""
    classes = {name: (cls, adapter) for adapter in adapters for name, cls in adapter.pipeline_classes.items()}
    families = " or ".join(dict.fromkeys(a.family.capitalize() for a in adapters))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtypes = {"default": dtype, "vae": torch.float32}
    path = Path(model).expanduser()
    if not path.exists() and _HUB_ID.match(str(model)):
        pipe = DiffusionPipeline.from_pretrained(str(model), dtype=dtypes)
        _check_kind(str(model), type(pipe).__name__, i2v, classes, families)
    else:
        name = _check_kind(str(path), saved_class_name(path), i2v, classes, families)
        pipe = classes[name][0].from_pretrained(path, dtype=dtypes, local_files_only=True)
        logger.info("loaded %s from %s (%s on %s)", name, path, dtype, device)
    pipe = pipe.to(device)
    if torch.device(device).type == "cpu":
        _copy_out_of_mmap(pipe)
    return pipe


def saved_class_name(path: Path) -> str:
    """The pipeline class recorded by `save_pretrained`, with an error that says what is missing."""
    if not path.exists():
        raise ValueError(f"{path}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{path}: no model_index.json, so not a pipeline saved by diffusers")
    try:
        return str(json.loads(index_file.read_text())["_class_name"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_file}: unreadable or without `_class_name` ({err})") from err


def _check_kind(where: str, class_name: str, i2v: bool | None, classes: dict[str, tuple[type, Any]],
                families: str) -> str:
    if class_name not in classes:
        raise ValueError(f"{where}: holds a {class_name}, not a {families} pipeline ({', '.join(classes)})")
    classes[class_name][1].check_kind(where, class_name, i2v)
    return class_name


def _copy_out_of_mmap(pipe: DiffusionPipeline) -> None:
    """Give every CPU weight its own aligned memory (see the module docstring)."""
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                tensor.data = tensor.data.clone()
