"""Calibration cost, measured side by side in one run (issue: calibration engine).

1. Time per prompt: generation with the calibration hooks plus the statistics save vs the same
   generation without hooks, on the tiny pipeline and on the medium one (full-width 5120 / 13824 blocks).
   Target: overhead at most 1.5x. The one-time setup (weight fingerprint, layer groups) is printed apart.
2. Memory: the statistics footprint at Wan2.2-A14B shapes (two experts x 40 blocks, the real layer
   inputs, the default bins), allocated on the meta device from the real module structure. Target: < 2 GB.

    python bench/calibration.py [--skip-medium]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from types import SimpleNamespace

import torch
from timing import median_seconds_ab

from vidquant.calib.calibrate import CalibSettings, generate, new_stats
from vidquant.calib.collector import collecting
from vidquant.calib.prompts import default_prompts
from vidquant.models import adapter_for, tiny


def overhead(name: str, pipe, settings: CalibSettings) -> None:
    """Generation with the calibration hooks (+ the per-prompt save) vs without, and the one-time setup."""
    prompt = default_prompts()[0]
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    stats = new_stats(pipe, settings, [prompt], torch.device("cpu"))
    setup = time.perf_counter() - t0

    def plain() -> None:
        generate(pipe, prompt, settings, seed=settings.seed, on_step=lambda: None)

    def calibrated() -> None:
        with collecting(stats, adapter_for(pipe)):
            plain()
        with tempfile.TemporaryDirectory() as out:
            stats.save(out)

    t_plain, t_calib = median_seconds_ab(plain, calibrated)
    print(
        f"{name:8} {settings.height}x{settings.width}x{settings.frames}, {settings.steps} steps, per prompt: "
        f"generation {t_plain:7.2f} s  calibration {t_calib:7.2f} s  overhead {t_calib / t_plain:5.2f}x  "
        f"(one-time setup: fingerprint + layer groups {setup:.2f} s)"
    )


class _MetaPipe:
    """Just enough of a two-expert A14B pipeline for `new_stats`: experts on the meta device."""

    def __init__(self) -> None:
        config = {**tiny.MEDIUM_EXPERT, "num_layers": 40, "in_channels": 16}
        with torch.device("meta"):
            from diffusers import WanTransformer3DModel

            self.transformer = WanTransformer3DModel.from_config(config)
            self.transformer_2 = WanTransformer3DModel.from_config(config)
        self.config = {"boundary_ratio": 0.875}
        self.scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))


def footprint() -> None:
    settings = CalibSettings()
    pipe = _MetaPipe()
    # meta experts hold no weights to fingerprint
    stats = new_stats(pipe, settings, default_prompts(), torch.device("meta"), fingerprint="a14b-shapes")
    total = channels = observers = 0
    for per_expert in stats.inputs.values():
        for obs in per_expert.values():
            observers += 1
            channels += obs.channels
            total += sum(t.nbytes for t in obs.tensors("x").values())
    layers = sum(len(stats.layers(e)) for e in stats.experts())
    print(
        f"A14B statistics: {layers} target Linears, {observers} distinct inputs, {channels} channels, "
        f"{settings.bins} bins x 2 branches, tails '{settings.tail_keys}': {total / 2**30:.2f} GiB "
        f"({total / channels:.0f} B per channel)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-medium", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    footprint()
    pipe = tiny.build_tiny_pipeline()
    for size, frames in ((64, 9), (128, 17)):  # 48 and 320 tokens per call: fixed hook costs vs layer work
        overhead("tiny", pipe, CalibSettings(num_prompts=1, steps=8, height=size, width=size, frames=frames))
    if not args.skip_medium:
        medium = tiny.build_medium_pipeline(dtype=torch.float32)
        overhead("medium", medium, CalibSettings(num_prompts=1, steps=2, height=64, width=64, frames=5))


if __name__ == "__main__":
    main()
