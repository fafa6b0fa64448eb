"""PTQ methods as tensor math (channel balancing, low-rank branch, GPTQ, clip search) and their measurement."""

from .clip import ClipChoice, choose_clip, clip_search
from .gptq import GPTQResult, HeldOutChoice, gptq, gptq_held_out
from .lowrank import LowRankResult, lowrank, refine_lowrank
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
    "ClipChoice",
    "GPTQResult",
    "HeldOutChoice",
    "LowRankResult",
    "choose_clip",
    "clip_search",
    "gptq",
    "gptq_held_out",
    "lowrank",
    "refine_lowrank",
    "channel_mask",
    "fold_weight",
    "quantize_input",
    "smoothed_quant_output",
    "sqnr_db",
    "weight_channel_max",
]
