"""Evidence for timestep-aware SVDQuant-GPTQ: layer-output SQNR as each component is added.

Rows add one component each: RTN; SmoothQuant masks from the calibration max; from the guarded p99.9
(the tail-aware recipe); + a low-rank branch (SVDQuant, refined); + GPTQ on the residual; + a clip ratio
per timestep bin (the full svdquant-gptq recipe). Each row is produced by the bundled recipes through
the same code users run (`vidquant.quantize`, `svdquant_gptq.quantize_layer`) and scored as the
fake-quantized Linear (`QuantLinear`, with the timestep bin of each input) against the unquantized one:

1. the tiny Wan2.2 pipeline (planted outliers): calibration on bundled prompts, scoring on held-out
   prompts with other seeds, per layer input and timestep bin;
2. heavy-tailed synthetic layers (Student-t activations, outlier channels whose size changes with the
   timestep bin, rare token spikes, a few heavy weight columns), 768 wide, with channels that mix shared
   factors (correlated, as a DiT's are) and with independent channels.

Per-layer SQNR pools every bin's signal and noise; the table shows the mean over layers and the worst.

    python bench/methods.py
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch import nn

import vidquant
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.layer_inputs import collect_layer_inputs
from vidquant.calib.prompts import default_prompts
from vidquant.methods.fidelity import binned_sqnr
from vidquant.methods.smoothing import channel_mask, guarded_range, weight_channel_max
from vidquant.models import adapter_for, tiny
from vidquant.nn import QuantLinear
from vidquant.ptq.svdquant_gptq import quantize_layer
from vidquant.recipes import Recipe, load_recipe
from vidquant.recipes.schema import DEFAULT_MAX_RATIO
from vidquant.state import quant_linear

SETTINGS = CalibSettings(num_prompts=8, steps=12, height=48, width=48, frames=9, bins=4)
HELD_OUT = 4
FORMATS = ("hif4", "mxfp4", "nvfp4")
ROWS = ("RTN", "SmoothQuant-max", "SmoothQuant-percentile", "+ low-rank", "+ GPTQ", "+ timestep-bin clip")
BINS = 4


def variants(fmt: str) -> dict[str, Recipe]:
    """The recipe of each row: bundled recipes, and svdquant-gptq with components switched off."""
    full = load_recipe(f"svdquant-gptq-{fmt}").to_dict()
    section = full["svdquant-gptq"]
    off = {"enabled": False}

    def variant(**change) -> Recipe:
        return Recipe.model_validate({**full, "svdquant-gptq": {**section, **change}})

    return {
        "RTN": load_recipe(f"rtn-{fmt}"),
        "SmoothQuant-max": load_recipe(f"max-{fmt}"),
        "SmoothQuant-percentile": load_recipe(f"tail-aware-{fmt}"),
        "+ low-rank": variant(gptq=off, clip_search={**section["clip_search"], **off}),
        "+ GPTQ": variant(clip_search={**section["clip_search"], **off}),
        "+ timestep-bin clip": variant(),
    }


def print_table(title: str, results: dict[str, dict[str, list[float]]]) -> None:
    print(f"\n{title}\n{'':24}" + "".join(f"{fmt:>20}" for fmt in results))
    print(f"{'':24}" + "".join(f"{'mean (worst) dB':>20}" for _ in results))
    for row in ROWS:
        cells = "".join(f"{sum(v) / len(v):12.2f} ({min(v):5.1f})" for v in (results[f][row] for f in results))
        print(f"{row:24}{cells}")


def tiny_pipeline() -> None:
    start = time.perf_counter()
    pipe = tiny.build_tiny_pipeline()
    prompts = default_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        stats = calibrate(pipe, prompts, SETTINGS, tmp, progress=False)
    held_out = SETTINGS.model_copy(update={"num_prompts": HELD_OUT, "seed": SETTINGS.seed + 10_000})
    adapter = adapter_for(pipe)
    groups = {name: adapter.input_groups(name) for name in adapter.experts()}
    inputs = collect_layer_inputs(pipe, prompts[SETTINGS.num_prompts:], held_out, groups,
                                  adapter_for(pipe).bin_edges(BINS), max_tokens=1024)
    samples = {f"{e}.{layer}": rec.bin_samples() for e, recs in inputs.items() for rec in recs.values()
               for layer in rec.layers}
    results = {}
    for fmt in FORMATS:
        results[fmt] = {}
        for row, recipe in variants(fmt).items():
            state = vidquant.quantize(pipe, recipe, stats, prompts=prompts)
            scores = []
            for name, layer_state in state.layers.items():
                linear = adapter.linear(name)
                scores.append(binned_sqnr(linear, quant_linear(linear, layer_state), samples[name]))
            results[fmt][row] = scores
    n = len(scores)
    print_table(f"tiny Wan2.2 T2V (planted outliers): {n} Linears, {SETTINGS.num_prompts} calibration and "
                f"{HELD_OUT} held-out prompts, {SETTINGS.steps} steps, {BINS} timestep bins per expert "
                f"[{time.perf_counter() - start:.0f} s]", results)


def synthetic_layer(seed: int, width: int, tokens: int, factors: int | None
                    ) -> tuple[nn.Linear, list[torch.Tensor], list[torch.Tensor]]:
    """A Linear and per-bin (calibration, held-out) inputs with heavy tails that move across the bins.

    ``factors``: channels mix that many shared Student-t factors (plus independent noise), as a DiT's
    channels do; None: independent channels, where the Hessian is diagonal and GPTQ has nothing to do.
    """
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(width, width)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=g)
        linear.weight[:, torch.randperm(width, generator=g)[:8]] *= 6  # heavy weight columns
        linear.bias.zero_()
    scales = torch.exp(torch.randn(width, generator=g) * 0.5)  # lognormal channel scales
    mixing = None if factors is None else torch.randn(factors, width, generator=g) / factors**0.5
    outliers = torch.randperm(width, generator=g)[:6]
    student = torch.distributions.StudentT(3.0)
    cal, held = [], []
    for b in range(BINS):
        growth = 2.0 ** (BINS - 1 - b)  # high-noise bins carry the largest outlier channels
        for out in (cal, held):
            torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
            x = student.sample((tokens, width))
            if mixing is not None:
                x = 0.3 * x + student.sample((tokens, factors)) @ mixing
            x = x * scales
            x[:, outliers] *= 6 * growth
            spikes = torch.randint(0, tokens, (tokens // 200,), generator=g)
            x[spikes, torch.randint(0, width, (len(spikes),), generator=g)] *= 25  # rare token spikes
            out.append(x)
    return linear, cal, held


def synthetic_layers(factors: int | None, count: int = 3, width: int = 768, tokens: int = 1024) -> None:
    start = time.perf_counter()
    results: dict[str, dict[str, list[float]]] = {fmt: {row: [] for row in ROWS} for fmt in FORMATS}
    for seed in range(count):
        linear, cal, held = synthetic_layer(seed, width, tokens, factors)
        x = torch.cat(cal)
        hessian = x.T @ x / x.shape[0]
        a_max = x.abs().amax(0)
        a_pct = guarded_range(a_max, torch.quantile(x.abs(), 0.999, dim=0), DEFAULT_MAX_RATIO)
        for fmt in FORMATS:
            for row, recipe in variants(fmt).items():
                s = recipe.smoothing
                a = a_max if s.statistic == "max" else a_pct
                mask = None if s.statistic == "none" else channel_mask(weight_channel_max(linear.weight), a, s.alpha)
                if recipe.method == "smoothquant":
                    layer = QuantLinear(linear, fmt, fmt, mask=mask)
                else:
                    state = quantize_layer(linear, recipe, mask, hessian, list(cal), f"synthetic{seed}")
                    layer = quant_linear(linear, state)
                results[fmt][row].append(binned_sqnr(linear, layer, held))
    kind = "independent channels" if factors is None else f"channels mixing {factors} shared factors"
    print_table(f"synthetic heavy-tailed layers, {kind}: {count} x ({width} x {width}), {tokens} tokens per bin "
                f"and {BINS} bins, Student-t(3) [{time.perf_counter() - start:.0f} s]", results)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells: mean (worst) layer-output SQNR")
    tiny_pipeline()
    synthetic_layers(factors=64)
    synthetic_layers(factors=None)


if __name__ == "__main__":
    main()
