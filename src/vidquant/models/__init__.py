"""Model adapters: the only model-aware code. Outside this package, code asks `adapter_for(obj)`.

Registered families: Wan2.1 / Wan2.2 (`wan`), CogVideoX (`cogvideox`), LTX-Video (`ltx`), and the generic
adapter for any ``nn.Module`` (`generic`, asked last). `load_model` loads a diffusers folder of any family,
or builds one of the offline tiny models (`TINY_MODELS`) for tests and the demo.
"""

from vidquant.models import cogvideox, generic, ltx, wan  # noqa: F401 (registers the adapters)
from vidquant.models.base import (
    BRANCHES,
    CallInfo,
    ModelAdapter,
    adapter_families,
    adapter_for,
    bin_edges,
    qualify,
    register_adapter,
    register_fallback,
    split_name,
    timestep_bin,
)
from vidquant.models.builtin import TINY_MODELS, load_model, tiny_sizes
from vidquant.models.loading import load_pipeline

__all__ = [
    "BRANCHES",
    "TINY_MODELS",
    "CallInfo",
    "ModelAdapter",
    "adapter_families",
    "adapter_for",
    "bin_edges",
    "load_model",
    "load_pipeline",
    "qualify",
    "register_adapter",
    "register_fallback",
    "split_name",
    "timestep_bin",
    "tiny_sizes",
]
