"""Evidence for the channel-balancing defaults: (alpha, p) search and per-layer fidelity, max vs percentile masks.

On the tiny Wan2.2 pipeline with planted outliers (heavy channels, a timestep ramp, rare FFN token
spikes): calibrate on bundled prompts, capture held-out layer inputs on the next prompts with other
seeds, and score each target Linear's fake-quantized output against the unquantized one (SQNR, dB).

1. The (alpha, p) grid for HiF4 weights and activations, scored by the mean per-layer SQNR and
   averaged over one octave of global mask scales (see methods/fidelity.py: why).
2. How much of the difference between the best percentile and the max mask survives each mask scale
   alone, and what a guarded percentile ``max(a_p, a_max / 4)`` does to the rare spike tokens.
3. At the best setting, RTN / max masks / percentile masks per layer for hif4, mxfp4 and nvfp4, with
   the layers where the percentile loses or the calibration tails are long.

    python bench/smoothing.py
"""

from __future__ import annotations

import math
import tempfile
import time

import torch

from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.capture import capture_inputs
from vidquant.calib.prompts import default_prompts
from vidquant.eval.fidelity import layer_fidelity, search
from vidquant.methods.fidelity import TAIL_FACTOR
from vidquant.models import tiny

SETTINGS = CalibSettings(num_prompts=16, steps=20, height=96, width=96, frames=17)
HELD_OUT = 16  # prompts after the calibration ones
MAX_TOKENS = 1 << 16  # rows per layer: (nearly) every held-out row, so the rare spike tokens are in
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
PERCENTILES = (99.0, 99.9, 99.99, 100.0)
MASK_SCALES = tuple(2.0 ** (k / 4) for k in range(4))  # one octave
MAX_RATIO = 4.0
# NVFP4's fp32 tensor scale absorbs a constant mask factor, so averaging over scales changes nothing there.
FORMATS = {"hif4": MASK_SCALES, "mxfp4": MASK_SCALES, "nvfp4": (1.0,)}


def db(v: float) -> str:
    return "  -  " if math.isnan(v) else f"{v:5.1f}"


def print_grid(table: list[dict]) -> dict:
    cell = {(r["alpha"], r["percentile"]): r for r in table}
    print("alpha" + "".join(f"{'p' + format(p, 'g') + (' (max)' if p == 100 else ''):>22}" for p in PERCENTILES))
    for alpha in ALPHAS:
        row = [cell[alpha, p] for p in PERCENTILES]
        cells = (f"{r['mean_db']:9.2f} ({r['worst_db']:4.1f}|{db(r['tail_worst_db'])})" for r in row)
        print(f"{alpha:5.1f}" + "".join(cells))
    return max(table, key=lambda r: r["mean_db"])


def summarize(name: str, rows: list[dict], alpha: float, p: float, seconds: float) -> None:
    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in ("rtn_db", "max_db", "pct_db")}
    wins = sum(r["pct_db"] > r["max_db"] for r in rows)
    print(f"\n{name} at alpha {alpha:g}, p{p:g}: mean SQNR over {n} layers: RTN {mean['rtn_db']:.2f}  "
          f"max {mean['max_db']:.2f}  percentile {mean['pct_db']:.2f} dB; percentile beats max on {wins}/{n}  "
          f"[{seconds:.0f} s]")
    worst = sorted(rows, key=lambda r: r["pct_db"])[:3]
    print("  worst (percentile): " + ";  ".join(
        f"{r['expert'][-2:]}:{r['layer']} {r['pct_db']:.1f} (max {r['max_db']:.1f}, RTN {r['rtn_db']:.1f})"
        for r in worst))
    notable = [r for r in rows if r["pct_db"] < r["max_db"] - 0.5 or r["range_ratio"] > 2]
    print(f"  percentile < max - 0.5 dB, or a_max/a_p > 2 in some channel ({len(notable)} layers):")
    print(f"    {'expert':13} {'layer':24} {'max':>6} {'pct':>6} {'a_max/a_p':>9}  {'tail rows':>11} "
          f"{'tail max':>8} {'pct':>5}")
    for r in notable:
        ratio = "inf" if math.isinf(r["range_ratio"]) else f"{r['range_ratio']:.3g}"
        print(f"    {r['expert']:13} {r['layer']:24} {r['max_db']:6.2f} {r['pct_db']:6.2f} {ratio:>9}  "
              f"{r['tail_tokens']:>5}/{r['tokens']:<5} {db(r['max_tail_db']):>8} {db(r['pct_tail_db']):>5}")


def main() -> None:
    start = time.perf_counter()
    prompts, s = default_prompts(), SETTINGS
    print(f"tiny Wan2.2 T2V (planted outliers), torch {torch.__version__}, {torch.get_num_threads()} threads")
    pipe = tiny.build_tiny_pipeline()
    with tempfile.TemporaryDirectory() as out:
        stats = calibrate(pipe, prompts, s, out, progress=False)
    held_out = prompts[s.num_prompts : s.num_prompts + HELD_OUT]
    inputs = capture_inputs(pipe, held_out, s, max_tokens=MAX_TOKENS, seed_offset=s.num_prompts)
    layer = "blocks.0.attn1.to_q"
    print(f"calibration: {s.num_prompts} prompts x {s.steps} steps, {s.height}x{s.width}x{s.frames}, cfg {s.cfg}: "
          f"{' / '.join(str(stats.tokens(e, layer)) for e in stats.experts())} tokens per layer "
          f"(transformer / transformer_2)")
    print(f"held out:    prompts {s.num_prompts}-{s.num_prompts + HELD_OUT - 1}, seeds {s.seed + s.num_prompts}..: "
          f"{' / '.join(str(len(inputs[e][layer])) for e in inputs)} rows per layer  "
          f"[{time.perf_counter() - start:.0f} s]")

    t = time.perf_counter()
    print(f"\n(alpha, p) search, hif4 weights and activations: mean per-layer output SQNR in dB, averaged over mask "
          f"scales {', '.join(f'{c:.3g}' for c in MASK_SCALES)}\n(worst layer | worst layer on tail tokens: rows "
          f"beyond {TAIL_FACTOR:g} x a_p in some channel)")
    table = search(pipe, stats, inputs, "hif4", "hif4", ALPHAS, PERCENTILES, mask_scales=MASK_SCALES)
    best = print_grid(table)
    alpha, p = best["alpha"], best["percentile"]
    best_max = max((r for r in table if r["percentile"] == 100.0), key=lambda r: r["mean_db"])
    print(f"best: alpha {alpha:g}, p{p:g}: {best['mean_db']:.2f} dB; best max mask: alpha {best_max['alpha']:g}, "
          f"{best_max['mean_db']:.2f} dB  [{time.perf_counter() - t:.0f} s]")

    print(f"\nat alpha {alpha:g}, one mask scale at a time (a no-op before quantization): p{p:g} vs max")
    for c in MASK_SCALES:
        pct, mx = search(pipe, stats, inputs, "hif4", "hif4", (alpha,), (p, 100.0), mask_scales=(c,))
        gain = pct["mean_db"] - mx["mean_db"]
        print(f"  scale {c:.3f}: {pct['mean_db']:.2f} vs {mx['mean_db']:.2f} dB ({gain:+.2f})")
    print(f"guarded percentile a_i = max(a_p, a_max / {MAX_RATIO:g}) at alpha {alpha:g}: mean dB "
          "(worst tail-token layer)")
    guarded = search(pipe, stats, inputs, "hif4", "hif4", (alpha,), PERCENTILES[:-1], mask_scales=MASK_SCALES,
                     max_ratio=MAX_RATIO)
    print("  " + "   ".join(f"p{r['percentile']:g}: {r['mean_db']:.2f} ({db(r['tail_worst_db']).strip()})"
                            for r in guarded))

    for i, (name, scales) in enumerate(FORMATS.items()):
        t = time.perf_counter()
        rows = layer_fidelity(pipe, stats, inputs, name, name, alpha, p, mask_scales=scales)
        if i == 0:
            ratios = sorted(r["range_ratio"] for r in rows)
            print(f"\ncalibration tails, a_max / a_p{p:g} of each layer's longest-tailed channel: median "
                  f"{ratios[len(ratios) // 2]:.2f}, <= 2 in {sum(v <= 2 for v in ratios)}/{len(ratios)} layers, "
                  f"> 100 in {sum(v > 100 for v in ratios)}")
        summarize(name, rows, alpha, p, time.perf_counter() - t)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
