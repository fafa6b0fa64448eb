"""Which mixed precision recovers most of BF16 per extra byte and per second (issue 14, routed pipeline).

One routed model per tiny pipeline (tiny: Wan2.2 layout, two experts of 2 blocks; tiny-wan21: one expert of 8
blocks) holds the base weights plus a W4A4 state (tail-aware HiF4 by default, calibrated here) and a W8A8 state
(HiF8), and runs every configuration on the same held-out prompts, configurations interleaved prompt by prompt
in ABBA order (reversed every other prompt, so a drift of the load on this shared machine hits them alike):

- all-W4A4, all-W8A8, all-BF16 (the reference, switched to on the same model);
- per expert (tiny): the high-noise expert W8A8 and the low-noise expert W4A4, and the reverse;
- per step: the first 25 % / 50 % of the denoising steps W8A8, the rest W4A4;
- per block W8A8: tiny its first block (of 2); tiny-wan21 the first and last, and the boundary paper's first 2 +
  last 3 (of 8).

Columns: PSNR and SSIM vs the BF16 video (mean over prompts); extra MB: bytes of the (layer, precision) variants
the configuration uses at some call (what must stay resident beyond the base weights, measured); bits/w: the
same per base weight at the formats' own bits per value (HiF4 4.5, HiF8 8: what A14B widths hold; the tiny
models' 32-64-wide rows pad HiF4's 64-value units, so in measured MB W4A4 is no smaller than W8A8 here); s/video:
median wall seconds of the pipeline call (VAE included), after one untimed warm-up per configuration; switch
ms: time spent choosing precisions per video (`use` for a uniform one, the per-call hooks for a mix); dB/bit and
dB/s: PSNR gained over all-W4A4 per extra bit per weight and per extra second.

    python bench/routing.py [--prompts 4] [--steps 8] [--recipe4 tail-aware-hif4] [--recipe8 hif8]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

import vidquant
from vidquant import formats
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.eval.generate import to_uint8
from vidquant.eval.metrics import psnr, ssim
from vidquant.eval.protocol import Protocol
from vidquant.models import load_model, tiny_sizes
from vidquant.route import BF16, RoutedModel, parse_policy


@dataclass
class Row:
    psnr: list[float]
    ssim: list[float]
    seconds: list[float]
    switch_ms: list[float]
    extra_bytes: int = 0
    bits_per_weight: float = 0.0


def configs(model: str) -> dict[str, list[dict] | str]:
    """Configuration name -> a uniform precision or the rules of a mix over the W4A4 default."""
    out: dict[str, list[dict] | str] = {"all-w4a4": "w4a4", "all-w8a8": "w8a8"}
    if model == "tiny":
        out["expert: high-noise w8a8"] = [{"experts": ["transformer"], "precision": "w8a8"}]
        out["expert: low-noise w8a8"] = [{"experts": ["transformer_2"], "precision": "w8a8"}]
    out["step: first 25% w8a8"] = [{"steps": [0.0, 0.25], "precision": "w8a8"}]
    out["step: first 50% w8a8"] = [{"steps": [0.0, 0.5], "precision": "w8a8"}]
    if model == "tiny":  # 2 blocks per expert
        out["block: first w8a8"] = [{"blocks": [0], "precision": "w8a8"}]
    else:
        out["block: first+last w8a8"] = [{"blocks": [0, -1], "precision": "w8a8"}]
        out["block: 0,1,-3..-1 w8a8"] = [{"blocks": [0, 1, -3, -2, -1], "precision": "w8a8"}]
    out["all-bf16"] = BF16
    return out


def run_model(model: str, args: argparse.Namespace) -> None:
    pipe = load_model(model)
    pipe.set_progress_bar_config(disable=True)
    sizes = tiny_sizes(model) or {}
    protocol = Protocol(steps=args.steps, cfg=3.5, seed=42, **sizes)
    prompts = default_prompts()
    settings = CalibSettings(**protocol.model_dump(), num_prompts=args.calib_prompts, bins=2)
    stats = calibrate(pipe, prompts, settings, progress=False) if args.recipe4 != "rtn-hif4" else None
    states = {"w4a4": vidquant.quantize(pipe, args.recipe4, stats),
              "w8a8": vidquant.quantize(pipe, args.recipe8, stats)}
    held_out = prompts[40:40 + args.prompts]  # the bundled set's second half: not calibrated on
    with RoutedModel.build(pipe, states) as routed:
        plans = {}
        for name, spec in configs(model).items():
            plans[name] = spec if isinstance(spec, str) else parse_policy(
                {"name": name, "precisions": {"w4a4": "-", "w8a8": "-"}, "default": "w4a4", "rules": spec}
            ).plan(routed)
        rows = {name: Row([], [], [], []) for name in plans}
        used: dict[str, set[tuple[str, str]]] = {name: set() for name in plans}
        for plan in plans.values():  # warm-up (kernels compiled, caches filled): not timed, not scored
            generate(routed, plan, prompts[-1], protocol, protocol.seed, set())
        for i, prompt in enumerate(held_out):
            frames = {}
            order = list(plans.items())  # interleaved, in ABBA order (reversed every other prompt): drift cancels
            for name, plan in order if i % 2 == 0 else order[::-1]:
                frames[name], seconds, switch = generate(routed, plan, prompt, protocol, protocol.seed_for(i),
                                                         used[name])
                rows[name].seconds.append(seconds)
                rows[name].switch_ms.append(1e3 * switch)
            for name in plans:
                rows[name].psnr.append(min(psnr(frames["all-bf16"], frames[name]), 100.0))
                rows[name].ssim.append(ssim(frames["all-bf16"], frames[name]))
        weights = sum(layer.base.weight.numel() for layer in routed.layers.values())
        for name in plans:
            rows[name].extra_bytes = sum(routed.layers[layer].extra_nbytes(p) for layer, p in used[name])
            rows[name].bits_per_weight = sum(  # without the tiny rows' padding: what A14B widths would hold
                routed.layers[layer].base.weight.numel() * formats.get(states[p].recipe["weights"]).bits_per_value
                for layer, p in used[name]) / weights
    print(f"\n{model}: {len(held_out)} held-out prompts, {protocol.height}x{protocol.width}x{protocol.frames}, "
          f"{protocol.steps} steps; W4A4 {args.recipe4}, W8A8 {args.recipe8}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    base = rows["all-w4a4"]
    head = f"{'config':26s} {'PSNR dB':>8s} {'SSIM':>7s} {'extra MB':>9s} {'bits/w':>7s} {'s/video':>8s} " \
           f"{'switch ms':>10s} {'dB/bit':>7s} {'dB/s':>7s}"
    print(head)
    for name, r in rows.items():
        gain = np.mean(r.psnr) - np.mean(base.psnr)
        more_bits = r.bits_per_weight - base.bits_per_weight
        more_s = np.median(r.seconds) - np.median(base.seconds)
        per_bit = f"{gain / more_bits:7.2f}" if more_bits > 1e-9 and name != "all-bf16" else f"{'-':>7s}"
        per_s = f"{gain / more_s:7.1f}" if more_s > 1e-3 and name != "all-bf16" else f"{'-':>7s}"
        print(f"{name:26s} {np.mean(r.psnr):8.2f} {np.mean(r.ssim):7.4f} {r.extra_bytes / 2**20:9.3f} "
              f"{r.bits_per_weight:7.2f} {np.median(r.seconds):8.2f} {np.median(r.switch_ms):10.3f} {per_bit} {per_s}")


def generate(routed: RoutedModel, plan, prompt: str, protocol: Protocol, seed: int,
             used: set[tuple[str, str]]) -> tuple[np.ndarray, float, float]:
    """One video under ``plan``: frames, wall seconds, seconds spent switching; adds the (layer, precision)
    variants it ran to ``used``."""
    routed.begin(protocol.steps)
    if isinstance(plan, str):
        routed.use(plan)
    else:
        routed.route(plan)
    start = time.perf_counter()
    video = routed.model(**protocol.call_kwargs(routed.model, prompt, seed), output_type="np").frames[0]
    seconds = time.perf_counter() - start
    for expert, step, _ in routed.calls:
        chosen = {local: plan for local, _ in routed.layers_of(expert)} if isinstance(plan, str) else \
            plan.at(expert, step, protocol.steps)
        used.update((f"{expert}.{local}", p) for local, p in chosen.items()
                    if p in routed.layers[f"{expert}.{local}"].variants)
    return to_uint8(video), seconds, routed.switch_seconds


def switch_at_full_count(layers: int = 800, repeats: int = 201) -> None:
    """Switch time does not depend on layer width, only on the count: 800 Linears (A14B's quantized layers) of a
    generic module, two RTN states (HiF4 W4A4, HiF8 W8A8), `use` timed alternately between them."""
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(layers)))
    states = {"w4a4": vidquant.quantize(model, "rtn-hif4", None), "w8a8": vidquant.quantize(model, "hif8", None)}
    with RoutedModel.build(model, states) as routed:
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            routed.use(("w4a4", "w8a8", BF16)[i % 3])
            times.append(time.perf_counter() - start)
    print(f"\nswitch between precisions at {layers} routed Linears: median {1e3 * np.median(times):.3f} ms, "
          f"max {1e3 * max(times):.3f} ms over {repeats} switches (no copy, no reload)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-wan21"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--calib-prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--recipe4", default="tail-aware-hif4")
    parser.add_argument("--recipe8", default="hif8")
    args = parser.parse_args()
    switch_at_full_count()
    for model in args.models:
        run_model(model, args)


if __name__ == "__main__":
    main()
