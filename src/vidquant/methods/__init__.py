"""PTQ methods as tensor math (channel balancing, low-rank branch, GPTQ, clip search) and their measurement."""

from .clip import clip_search
from .gptq import GPTQResult, gptq
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
    "GPTQResult",
    "LowRankResult",
    "clip_search",
    "gptq",
    "lowrank",
    "refine_lowrank",
    "channel_mask",
    "fold_weight",
    "quantize_input",
    "smoothed_quant_output",
    "sqnr_db",
    "weight_channel_max",
]
