"""Model adapters: the only model-aware code (Wan pipelines, experts, layer roles, tiny builders)."""

from vidquant.models.tiny import build_medium_pipeline, build_tiny_pipeline
from vidquant.models.wan import (
    boundary_linears,
    boundary_timestep,
    config_fingerprint,
    expert_for_timestep,
    experts,
    fingerprint,
    input_groups,
    load_pipeline,
    placeholder_image,
    target_linears,
)

__all__ = [
    "boundary_linears",
    "boundary_timestep",
    "build_medium_pipeline",
    "build_tiny_pipeline",
    "config_fingerprint",
    "expert_for_timestep",
    "experts",
    "fingerprint",
    "input_groups",
    "load_pipeline",
    "placeholder_image",
    "target_linears",
]
