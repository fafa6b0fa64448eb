"""The packed runtime against BF16 and the fake-quant simulation, side by side (issue: a real low-bit runtime).

On the medium pipeline (full-width Wan2.2-A14B blocks, ``--blocks`` per expert, bf16 on the CPU), each
configuration in a fresh process:

- resident: the bytes of every tensor the experts hold, and of their blocks alone (the quantizable part: with
  few blocks per expert the BF16 embedders and the 30720 x 5120 time projection outweigh the blocks, unlike
  at A14B's 40);
- process peak: the peak RSS of one expert step (sampled during the call), the whole process;
- transformer peak: that peak less what the process holds without the transformers, *measured* at the end
  of the child: both experts dropped, the allocator trimmed, the RSS read again (interpreter, libraries,
  compiled kernels, text encoder, VAE). It is what the step costs in the transformers' weights, the decode
  temporaries and the activations, the figure the <= 45 % target is about;
- the seconds of that step (median of ``--timed`` steps after the warm-up and the measured one).

Then, at A14B shapes (meta device, no memory), the packed transformer size of each weight format.
Targets: resident <= 30 % of BF16 at W4 and <= 53 % at W8; step peak <= 45 % of BF16 at W4; packed <= 2x
fake in time.

    python bench/runtime.py [--tokens 256] [--blocks 1] [--configs "bf16,hif4 packed"] [--timed 2]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from quantize import step_inputs

import vidquant
from vidquant import formats
from vidquant.eval.probes import current_rss, peak_memory
from vidquant.models import adapter_for, tiny
from vidquant.recipes import Recipe, plan

CONFIGS = {  # name -> (weight format or None for BF16, runtime, rows per decoded tile)
    "bf16": (None, None, None),
    "hif4 fake": ("hif4", "fake", None),
    "hif4 packed": ("hif4", "packed", None),
    "hif4 packed/1024": ("hif4", "packed", 1024),
    "nvfp4 packed": ("nvfp4", "packed", None),
    "int4_g64 packed": ("int4_g64", "packed", None),
    "hif8 packed": ("hif8", "packed", None),
    "fp8_e4m3 packed": ("fp8_e4m3", "packed", None),
}


def recipe(fmt: str) -> Recipe:
    """Weights in ``fmt``, activations unquantized: the weight path is what the runtime changes."""
    return Recipe(name=f"rtn-{fmt}-weights", weights=fmt, activations=None, smoothing={"statistic": "none"})


def resident_bytes(pipe, blocks_only: bool = False) -> int:
    """Bytes of every storage the experts hold (or only their blocks': the quantizable part)."""
    seen, total = set(), 0
    for model in adapter_for(pipe).experts().values():
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            if (not blocks_only or name.startswith("blocks.")) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def bf16_step_inputs(model, tokens: int) -> dict:
    """bench/quantize.py's step inputs, in bf16."""
    return {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and k != "timestep" else v
            for k, v in step_inputs(model, tokens).items()}


def timings(fn, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls (the step is warm already: compiled, allocator primed)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def trim_allocator() -> None:
    """Hand the allocator's free pages back to the system (glibc), so that RSS counts what is held."""
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL(libc).malloc_trim(0)


def child(name: str, tokens: int, blocks: int, timed: int) -> dict:
    fmt, runtime, tile_rows = CONFIGS[name]
    pipe = tiny.build_medium_pipeline(num_layers=blocks, dtype=torch.bfloat16)
    if fmt is not None:
        vidquant.apply(pipe, vidquant.quantize(pipe, recipe(fmt)), runtime=runtime, tile_rows=tile_rows)
    gc.collect()
    trim_allocator()
    model = pipe.transformer
    inputs = bf16_step_inputs(model, tokens)
    with torch.no_grad():
        model(**inputs)  # warm-up (allocator, kernels' compilation)
        gc.collect()
        trim_allocator()
        before = current_rss()
        with peak_memory("cpu") as peak:
            model(**inputs)
        seconds = statistics.median(timings(lambda: model(**inputs), timed)) if timed else None
    result = {"name": name, "resident": resident_bytes(pipe), "blocks": resident_bytes(pipe, blocks_only=True),
              "peak_rss": peak.bytes, "before": before, "seconds": seconds}
    model = None
    for expert in adapter_for(pipe).experts():
        setattr(pipe, expert, None)
    gc.collect()
    trim_allocator()
    result["rest"] = current_rss()  # everything but the transformers, measured
    return result


def a14b_sizes() -> None:
    config = {**tiny.MEDIUM_EXPERT, "num_layers": 40, "in_channels": 16}
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        experts = {"transformer": WanTransformer3DModel.from_config(config),
                   "transformer_2": WanTransformer3DModel.from_config(config)}
    adapter = adapter_for(experts)
    bf16 = sum(2 * p.numel() for m in experts.values() for p in m.parameters())
    print(f"\nA14B shapes (2 experts x 40 blocks), BF16 transformer weights {bf16 / 2**30:.1f} GiB:")
    for fmt in ("hif4", "mxfp4", "nvfp4", "int4_g64", "hif8", "fp8_e4m3", "int8"):
        the_plan = plan(adapter, recipe(fmt))
        linears = [adapter.linear(n) for n in the_plan.quantized]
        quantized = sum(2 * m.weight.numel() for m in linears)
        packed = sum(formats.get(fmt).packed_nbytes(m.out_features, m.in_features) for m in linears)
        total = bf16 - quantized + packed
        print(f"  {fmt:10} packed transformer {total / 2**30:6.2f} GiB = {100 * total / bf16:5.1f} % of BF16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=1, help="full-width blocks per expert (A14B has 40)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated rows (bf16 always runs)")
    parser.add_argument("--timed", type=int, default=2, help="timed steps per config (median; 0: memory only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.blocks, args.timed)))
        return
    names = ["bf16", *(n.strip() for n in args.configs.split(",") if n.strip() and n.strip() != "bf16")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medium pipeline, {args.blocks} block(s) "
          f"per expert, bf16, {args.tokens} tokens")
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, Path(__file__).name, "--child", name, "--tokens", str(args.tokens),
                              "--blocks", str(args.blocks), "--timed", str(args.timed)],
                             cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print("  done:", json.dumps(rows[-1]), flush=True)
    ref = rows[0]
    fake = next((r for r in rows if r["name"] == "hif4 fake" and r["seconds"]), None)
    mib = 2**20
    print(f"{'config':18}{'blocks MiB':>11}{'vs BF16':>8}{'all MiB':>9}{'vs BF16':>8}{'proc peak':>10}{'vs BF16':>8}"
          f"{'tf peak':>9}{'vs BF16':>8}{'s/step':>8}{'vs BF16':>8}{'vs fake':>8}")
    for r in rows:
        tf, tf_ref = r["peak_rss"] - r["rest"], ref["peak_rss"] - ref["rest"]
        if r["seconds"]:
            vs_fake = f"{r['seconds'] / fake['seconds']:7.2f}x" if fake else f"{'-':>8}"
            timing = f"{r['seconds']:8.2f}{r['seconds'] / ref['seconds']:7.2f}x{vs_fake}"
        else:
            timing = f"{'-':>8}{'-':>8}{'-':>8}"
        print(f"{r['name']:18}{r['blocks'] / mib:11.1f}{100 * r['blocks'] / ref['blocks']:7.1f}%"
              f"{r['resident'] / mib:9.1f}{100 * r['resident'] / ref['resident']:7.1f}%"
              f"{r['peak_rss'] / mib:10.1f}{100 * r['peak_rss'] / ref['peak_rss']:7.1f}%"
              f"{tf / mib:9.1f}{100 * tf / tf_ref:7.1f}%{timing}")
    print("(MiB; proc peak: the process's peak RSS during one expert step; tf peak: that less the RSS of the same "
          "process without the transformers, measured)")
    a14b_sizes()


if __name__ == "__main__":
    main()
