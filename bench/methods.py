"""Evidence for timestep-aware SVDQuant-GPTQ: layer-output SQNR as each component is added.

Rows add one component each: RTN; SmoothQuant masks from the calibration max; from the guarded p99.9
(the tail-aware recipe); + a low-rank branch (SVDQuant, refined); + GPTQ on the residual; + a clip ratio
per timestep bin (the full svdquant-gptq recipe). Two rows add a Hadamard rotation after the mask (the
`rotated-tail-aware-` recipes' rotation): to the tail-aware recipe, and to the full svdquant-gptq recipe.
Each row is produced by the bundled recipes through the same code users run (`vidquant.quantize`,
`svdquant_gptq.quantize_layer`) and scored as the fake-quantized Linear (`QuantLinear`, with the timestep
bin of each input) against the unquantized one:

1. the tiny Wan2.2 pipeline (planted outliers): calibration on bundled prompts, scoring on held-out
   prompts with other seeds, per layer input and timestep bin;
2. heavy-tailed synthetic layers (Student-t activations, outlier channels whose size changes with the
   timestep bin, rare token spikes, a few heavy weight columns), 768 wide, with channels that mix shared
   factors (correlated, as a DiT's are) and with independent channels.

Per-layer SQNR pools every bin's signal and noise; the table shows the mean over layers and the worst.

Two more tables (issue 13, "GPTQ that holds on held-out data"):

3. few calibration tokens: 1536-wide layers with heavy-tailed (Student-t(3) tokens), correlated inputs
   calibrated on 64 / 256 / 4096 tokens; output SQNR on 4096 fresh tokens for RTN, GPTQ at the fixed
   damping 0.01 (all calibration tokens in the Hessian) and GPTQ with the held-out rule (1/8 of the tokens
   held out, damping from 0.01 / 0.1 / 1 or RTN, `methods.gptq.gptq_held_out`);
4. act-order on the tiny pipeline: svdquant-gptq-hif4 with ``act_order`` false and true, scored as table 1.

    python bench/methods.py [--only tiny,synthetic,few-tokens,act-order]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import vidquant
from vidquant import formats
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.layer_inputs import collect_layer_inputs
from vidquant.calib.prompts import default_prompts
from vidquant.methods.fidelity import binned_sqnr, relative_output_error
from vidquant.methods.gptq import gptq, gptq_held_out
from vidquant.methods.smoothing import channel_mask, guarded_range, weight_channel_max
from vidquant.models import adapter_for, tiny
from vidquant.nn import QuantLinear
from vidquant.ptq.masks import layer_rotation
from vidquant.ptq.svdquant_gptq import quantize_layer
from vidquant.recipes import Recipe, load_recipe
from vidquant.recipes.schema import DEFAULT_MAX_RATIO
from vidquant.state import quant_linear

SETTINGS = CalibSettings(num_prompts=8, steps=12, height=48, width=48, frames=9, bins=4)
HELD_OUT = 4
FORMATS = ("hif4", "mxfp4", "nvfp4")
ROWS = ("RTN", "SmoothQuant-max", "SmoothQuant-percentile", "SmoothQuant-percentile + rotation", "+ low-rank",
        "+ GPTQ", "+ timestep-bin clip", "+ rotation (all components)")
BINS = 4


def variants(fmt: str) -> dict[str, Recipe]:
    """The recipe of each row: bundled recipes, and svdquant-gptq with components switched off."""
    full = load_recipe(f"svdquant-gptq-{fmt}").to_dict()
    section = full["svdquant-gptq"]
    off = {"enabled": False}
    rotated = load_recipe(f"rotated-tail-aware-{fmt}")  # its rotation block: the format's best (bench/rotation.py)

    def variant(**change) -> Recipe:
        return Recipe.model_validate({**full, "svdquant-gptq": {**section, **change}})

    return {
        "RTN": load_recipe(f"rtn-{fmt}"),
        "SmoothQuant-max": load_recipe(f"max-{fmt}"),
        "SmoothQuant-percentile": load_recipe(f"tail-aware-{fmt}"),
        "SmoothQuant-percentile + rotation": rotated,
        "+ low-rank": variant(gptq=off, clip_search={**section["clip_search"], **off}),
        "+ GPTQ": variant(clip_search={**section["clip_search"], **off}),
        "+ timestep-bin clip": variant(),
        "+ rotation (all components)": Recipe.model_validate({**full, "rotation": rotated.to_dict()["rotation"]}),
    }


def print_table(title: str, results: dict[str, dict[str, list[float]]]) -> None:
    print(f"\n{title}\n{'':36}" + "".join(f"{fmt:>20}" for fmt in results))
    print(f"{'':36}" + "".join(f"{'mean (worst) dB':>20}" for _ in results))
    for row in ROWS:
        cells = "".join(f"{sum(v) / len(v):12.2f} ({min(v):5.1f})" for v in (results[f][row] for f in results))
        print(f"{row:36}{cells}")


def tiny_setup(hessians: bool = True):
    """The tiny pipeline, its calibration statistics, and per-layer held-out input samples per timestep bin
    (other prompts, other seeds) that every row is scored on."""
    pipe = tiny.build_tiny_pipeline()
    prompts = default_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        stats = calibrate(pipe, prompts, SETTINGS, tmp, progress=False)
    held_out = SETTINGS.model_copy(update={"num_prompts": HELD_OUT, "seed": SETTINGS.seed + 10_000})
    adapter = adapter_for(pipe)
    groups = {name: adapter.input_groups(name) for name in adapter.experts()}
    inputs = collect_layer_inputs(pipe, prompts[SETTINGS.num_prompts:], held_out, groups, adapter.bin_edges(BINS),
                                  max_tokens=1024, hessians=hessians)
    samples = {f"{e}.{layer}": rec.bin_samples() for e, recs in inputs.items() for rec in recs.values()
               for layer in rec.layers}
    return pipe, prompts, stats, adapter, samples


def tiny_pipeline() -> None:
    start = time.perf_counter()
    pipe, prompts, stats, adapter, samples = tiny_setup()
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
                    tensors = {**({} if mask is None else {"mask": mask}),
                               **layer_rotation(recipe, f"synthetic{seed}", linear)}
                    layer = QuantLinear.from_state(linear, fmt, fmt, tensors)
                else:
                    state = quantize_layer(linear, recipe, mask, hessian, list(cal), f"synthetic{seed}")
                    layer = quant_linear(linear, state)
                results[fmt][row].append(binned_sqnr(linear, layer, held))
    kind = "independent channels" if factors is None else f"channels mixing {factors} shared factors"
    print_table(f"synthetic heavy-tailed layers, {kind}: {count} x ({width} x {width}), {tokens} tokens per bin "
                f"and {BINS} bins, Student-t(3) [{time.perf_counter() - start:.0f} s]", results)


def few_token_inputs(seed: int, width: int, factors: int = 32) -> Callable[[int], torch.Tensor]:
    """A sampler of (m, width) rows: Student-t(3) tokens (a chi^2(3) scale per token) over independent
    channels plus ``factors`` shared Gaussian factors, lognormal channel scales: energy in every direction,
    so a Hessian of fewer tokens than channels misses most of what fresh tokens carry."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(factors, width, generator=g) / factors**0.5
    scales = torch.exp(torch.randn(width, generator=g) * 0.5)

    def draw(m: int) -> torch.Tensor:
        chi = (torch.randn(m, 3, generator=g) ** 2).sum(1, keepdim=True)
        return (torch.randn(m, width, generator=g) / torch.sqrt(chi / 3) + torch.randn(m, factors, generator=g) @ mix
                ) * scales

    return draw


def few_tokens(width: int = 1536, counts: tuple[int, ...] = (64, 256, 4096), seeds: int = 2,
               fmt_name: str = "hif4") -> None:
    """Table 3: held-out output SQNR of RTN, fixed-damping GPTQ and held-out-chosen GPTQ at few tokens."""
    start = time.perf_counter()
    fmt = formats.get(fmt_name)
    print(f"\nfew calibration tokens: {seeds} x ({width} x {width}) {fmt_name} weights ~ N(0, 0.02), heavy-tailed "
          f"correlated inputs; output SQNR (dB) on 4096 fresh tokens, mean over layers (worst)")
    print(f"{'tokens':>7} {'RTN':>14} {'GPTQ damp=0.01':>16} {'GPTQ held-out':>15}  choices")
    for tokens in counts:
        cells: dict[str, list[float]] = {"rtn": [], "fixed": [], "held": []}
        choices = []
        for seed in range(seeds):
            draw = few_token_inputs(seed, width)
            w = torch.randn(width, width, generator=torch.Generator().manual_seed(1000 + seed)) * 0.02
            x, fresh = draw(tokens), draw(4096)
            n_held = min(max(1, tokens // 8), 1024)
            held, fit = x[:n_held], x[n_held:]
            cells["rtn"].append(-10 * math.log10(relative_output_error(fresh, w, fmt.quantize_dequantize(w))))
            fixed = gptq(w, x.T @ x, fmt, evaluate=False).weight
            cells["fixed"].append(-10 * math.log10(relative_output_error(fresh, w, fixed)))
            choice = gptq_held_out(w, fit.T @ fit, fmt, held)
            cells["held"].append(-10 * math.log10(relative_output_error(fresh, w, choice.weight)))
            choices.append(choice.info.split(" (")[0])
        row = "".join(f"{sum(v) / len(v):9.2f} ({min(v):5.2f})" for v in cells.values())
        print(f"{tokens:>7} {row}  {', '.join(choices)}")
    print(f"[{time.perf_counter() - start:.0f} s]")


def act_order_tiny(fmt: str = "hif4") -> None:
    """Table 4: act_order false / true in svdquant-gptq on the tiny pipeline, scored on held-out prompts."""
    start = time.perf_counter()
    pipe, prompts, stats, adapter, samples = tiny_setup(hessians=False)
    full = load_recipe(f"svdquant-gptq-{fmt}").to_dict()
    print(f"\nact-order on the tiny Wan2.2 pipeline, svdquant-gptq-{fmt}, {SETTINGS.num_prompts} calibration and "
          f"{HELD_OUT} held-out prompts: layer-output SQNR on the held-out prompts")
    scores = {}
    for act_order in (False, True):
        section = full["svdquant-gptq"]
        recipe = Recipe.model_validate({**full, "svdquant-gptq": {**section, "gptq": {**section["gptq"],
                                                                                      "act_order": act_order}}})
        state = vidquant.quantize(pipe, recipe, stats, prompts=prompts)
        scores[act_order] = {name: binned_sqnr(adapter.linear(name), quant_linear(adapter.linear(name), ls),
                                               samples[name]) for name, ls in state.layers.items()}
        kept = sum(not ls.info.get("gptq", "rtn").startswith("rtn") for ls in state.layers.values())
        v = list(scores[act_order].values())
        print(f"  act_order={str(act_order):5}  mean {sum(v) / len(v):6.2f} dB  worst {min(v):6.2f} dB  "
              f"GPTQ kept on {kept} of {len(v)} layers")
    diff = [scores[True][n] - scores[False][n] for n in scores[False]]
    print(f"  act_order - no act_order per layer: mean {sum(diff) / len(diff):+.3f} dB, better on "
          f"{sum(d > 0 for d in diff)} of {len(diff)} layers [{time.perf_counter() - start:.0f} s]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="tiny,synthetic,few-tokens,act-order", help="comma-separated tables")
    parser.add_argument("--act-order-format", default="hif4", help="the svdquant-gptq recipe's format for table 4")
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cells: mean (worst) layer-output SQNR")
    if "tiny" in only:
        tiny_pipeline()
    if "synthetic" in only:
        synthetic_layers(factors=64)
        synthetic_layers(factors=None)
    if "few-tokens" in only:
        few_tokens()
    if "act-order" in only:
        act_order_tiny(args.act_order_format)


if __name__ == "__main__":
    main()
