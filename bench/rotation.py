"""Evidence for the Hadamard rotation (`methods.rotation`, recipe ``rotation:``): held-out SQNR and FWHT speed.

1. Synthetic heavy-tailed layers, 4096 wide (Student-t(3) activations, lognormal channel scales, a few outlier
   channels, rare token spikes, heavy weight columns; one layer whose channels mix 64 shared factors as a DiT's
   do, one with independent channels). The mask and the low-rank branch are fitted on calibration tokens; every
   cell is the layer-output SQNR on held-out tokens (pooled over the layers), W4A4 in each format:
   none (RTN) / smooth (the tail-aware mask) / rotate / smooth + rotate, per rotation block (full = 4096 here,
   64, 32, 16), and with a rank-32 branch (SVDQuant, refined; GPTQ and clip search off) with and without the
   rotation, through `svdquant_gptq.quantize_layer` (the code recipes run).
2. The fast Walsh-Hadamard transform at A14B widths (K = 5120: "full" is 5 blocks of 1024; K = 13824: 27 of 512;
   and the 64-wide unit): the numba kernel and the torch butterflies against the dense block-diagonal matmul and
   a dense K x K matmul, timed alternately, median of ``--repeats``.

    python bench/rotation.py [--width 4096] [--out-features 2048] [--tokens 2048] [--no-timing]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import torch
from torch import nn

from vidquant.methods import rotation as rot
from vidquant.methods.smoothing import channel_mask, guarded_range, weight_channel_max
from vidquant.nn import QuantLinear
from vidquant.nn.hadamard import rotation_tensors
from vidquant.progress import progress_bar
from vidquant.ptq.svdquant_gptq import quantize_layer
from vidquant.recipes import Recipe
from vidquant.recipes.schema import DEFAULT_ALPHA, DEFAULT_MAX_RATIO, DEFAULT_PERCENTILE
from vidquant.state import quant_linear

FORMATS = ("hif4", "mxfp4", "nvfp4", "int4_g64")
BLOCKS = ("full", 64, 32, 16)
RANK = 32
LOWRANK_ITERS = 4  # refinement rounds of the rank-32 branch (bounded here for time)
RANK_FORMATS = ("hif4", "int4_g64")  # the two rank-32 claims


def heavy_layer(seed: int, width: int, tokens: int, factors: int | None, out_features: int | None = None
                ) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A width -> out_features Linear and (calibration, held-out) inputs with heavy, channel-structured tails."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(width, out_features or width)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=g)
        linear.weight[:, torch.randperm(width, generator=g)[:16]] *= 6  # heavy weight columns
        linear.bias.zero_()
    scales = torch.exp(torch.randn(width, generator=g) * 0.5)  # lognormal channel scales
    mixing = None if factors is None else torch.randn(factors, width, generator=g) / factors**0.5
    outliers = torch.randperm(width, generator=g)[:32]
    student = torch.distributions.StudentT(3.0)
    sets = []
    for _ in range(2):
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
        x = student.sample((tokens, width))
        if mixing is not None:
            x = 0.3 * x + student.sample((tokens, factors)) @ mixing
        x = x * scales
        x[:, outliers] *= 12  # outlier channels
        spikes = torch.randint(0, tokens, (tokens // 100,), generator=g)
        x[spikes, torch.randint(0, width, (len(spikes),), generator=g)] *= 25  # rare token spikes
        sets.append(x)
    return linear, sets[0], sets[1]


def lowrank_recipe(fmt: str, block: str | int | None) -> Recipe:
    """SVDQuant's rank-32 branch on the tail-aware mask (GPTQ and the clip search off), optionally rotated."""
    return Recipe.model_validate({
        "name": f"bench-rank{RANK}-{fmt}", "method": "svdquant-gptq", "weights": fmt, "activations": fmt,
        "rotation": None if block is None else {"block": block},
        "svdquant-gptq": {"lowrank": {"rank": RANK, "iters": LOWRANK_ITERS}, "gptq": {"enabled": False},
                          "clip_search": {"enabled": False}},
    })


def pool(cells: dict[str, list[float]], held: torch.Tensor, reference: torch.Tensor, row: str,
         layer: nn.Module) -> None:
    """Add the layer's held-out output signal and noise energies to the row's pooled totals."""
    with torch.no_grad():
        out = layer(held)
    cells[row][0] += float(reference.double().pow(2).sum())
    cells[row][1] += float((reference.double() - out.double()).pow(2).sum())


def sqnr_table(width: int, tokens: int, out_features: int) -> None:
    start = time.perf_counter()
    rows = ["none", "smooth"] + [f"{v} {b}" for v in ("rotate", "smooth+rotate") for b in BLOCKS]
    rows += [f"smooth+rank{RANK}", f"smooth+rank{RANK}+rotate 64"]
    noise = {fmt: {r: [0.0, 0.0] for r in rows} for fmt in FORMATS}  # pooled (signal, noise) energies
    layers = [(0, 64), (1, None)]
    with progress_bar() as bar:
        task = bar.add_task("layers x formats", total=len(layers) * len(FORMATS))
        for seed, factors in layers:
            linear, cal, held = heavy_layer(seed, width, tokens, factors, out_features)
            a_max = cal.abs().amax(0)
            a_p = torch.quantile(cal.abs()[: min(tokens, 4096)], DEFAULT_PERCENTILE / 100, dim=0)
            mask = channel_mask(weight_channel_max(linear.weight), guarded_range(a_max, a_p, DEFAULT_MAX_RATIO),
                                DEFAULT_ALPHA)
            hessian = cal.T @ cal / cal.shape[0]
            with torch.no_grad():
                reference = linear(held)
            for fmt in FORMATS:
                score = functools.partial(pool, noise[fmt], held, reference)
                score("none", QuantLinear(linear, fmt, fmt))
                score("smooth", QuantLinear(linear, fmt, fmt, mask=mask))
                for b in BLOCKS:
                    t = rotation_tensors(width, b, seed)
                    score(f"rotate {b}", QuantLinear.from_state(linear, fmt, fmt, t))
                    score(f"smooth+rotate {b}", QuantLinear.from_state(linear, fmt, fmt, {**t, "mask": mask}))
                for row, block in ((f"smooth+rank{RANK}", None), (f"smooth+rank{RANK}+rotate 64", 64)):
                    if fmt not in RANK_FORMATS:
                        continue
                    state = quantize_layer(linear, lowrank_recipe(fmt, block), mask, hessian, [], f"synthetic{seed}")
                    score(row, quant_linear(linear, state))
                bar.advance(task)
    print(f"\nheld-out layer-output SQNR (dB), W4A4, {len(layers)} synthetic {width} -> {out_features} layers "
          f"(one mixing 64 shared factors, one independent), {tokens} calibration + {tokens} held-out tokens, "
          f"Student-t(3), 32 outlier channels x12, 1 % token spikes x25 [{time.perf_counter() - start:.0f} s]")
    print(f"{'':32}" + "".join(f"{fmt:>10}" for fmt in FORMATS))
    db = {fmt: {r: 10 * math.log10(s / n) if n else math.nan for r, (s, n) in noise[fmt].items()} for fmt in FORMATS}
    for r in rows:
        print(f"{r:32}" + "".join(f"{db[fmt][r]:10.2f}" if n else f"{'-':>10}"
                                  for fmt in FORMATS for n in [noise[fmt][r][1]]))
    print(f"{'smooth+rotate best - smooth':32}" + "".join(
        f"{max(db[f][f'smooth+rotate {b}'] for b in BLOCKS) - db[f]['smooth']:+10.2f}" for f in FORMATS))
    print(f"{'rank: +rotate 64 - without':32}" + "".join(
        f"{db[f][f'smooth+rank{RANK}+rotate 64'] - db[f][f'smooth+rank{RANK}']:+10.2f}" for f in FORMATS))
    print("(a cell of '-' or nan: not run for that format)")


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def timing(tokens: int, repeats: int) -> None:
    print(f"\nFWHT vs dense rotation, {tokens} tokens fp32, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, median of {repeats} (alternating)")
    print(f"{'K':>6} {'block':>6} {'numba ms':>9} {'torch ms':>9} {'blockdiag ms':>13} {'KxK ms':>9} "
          f"{'blockdiag/numba':>16} {'KxK/numba':>10} {'max |diff|':>11}")
    for k in (5120, 13824):
        x = torch.randn(tokens, k)
        signs = rot.random_signs(k, 0)
        kxk_ms = None
        for block in (rot.full_block(k), 64):
            h = rot.hadamard_matrix(block) / block**0.5
            dense = rot.dense_rotation(signs, block, torch.float32)
            s = signs.float()
            fns = {
                "numba": lambda: rot.rotate(x, signs, block),  # noqa: B023 (called in this iteration)
                "torch": lambda: rot.rotate_torch(x, signs, block),  # noqa: B023
                "blockdiag": lambda: ((x * s).view(-1, block) @ h).view(tokens, k),  # noqa: B023
            }
            if kxk_ms is None:  # the dense K x K matmul costs the same for every block: timed once per K
                fns["kxk"] = lambda: x @ dense  # noqa: B023
            for fn in fns.values():
                fn()  # warm-up (numba compiles on first use)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(repeats):
                for name, fn in fns.items():
                    times[name] += timed(fn, 1)
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            kxk_ms = med["kxk"] = med.get("kxk", kxk_ms)
            diff = float((fns["numba"]().double() - x.double() @ dense.double()).abs().max())
            print(f"{k:6d} {block:6d} {med['numba']:9.1f} {med['torch']:9.1f} {med['blockdiag']:13.1f} "
                  f"{med['kxk']:9.1f} {med['blockdiag'] / med['numba']:15.1f}x {med['kxk'] / med['numba']:9.1f}x "
                  f"{diff:11.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out-features", type=int, default=2048)
    parser.add_argument("--timing-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-sqnr", action="store_true")
    args = parser.parse_args()
    if not args.no_sqnr:
        sqnr_table(args.width, args.tokens, args.out_features)
    if not args.no_timing:
        timing(args.timing_tokens, args.repeats)


if __name__ == "__main__":
    main()
