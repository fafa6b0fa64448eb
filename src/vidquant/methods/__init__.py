"""PTQ methods as tensor math (channel balancing) and their measurement (per-layer fidelity, searches)."""

from .smoothing import (
    DEFAULT_EPS,
    channel_mask,
    fold_weight,
    quantize_input,
    smoothed_quant_output,
    sqnr_db,
    weight_channel_max,
)

__all__ = [
    "DEFAULT_EPS",
    "channel_mask",
    "fold_weight",
    "quantize_input",
    "smoothed_quant_output",
    "sqnr_db",
    "weight_channel_max",
]
