"""The packed runtime against BF16 and the fake-quant simulation, side by side (issue: a real low-bit runtime).

On the medium pipeline (full-width Wan2.2-A14B blocks, one per expert, bf16 on the CPU), each configuration in
a fresh process: the transformer bytes resident (every tensor the experts hold, and those of their blocks
alone: with one block per expert the BF16 embedders and time projection outweigh the block, unlike at 40), the
peak RSS of one expert step (sampled during the call) less what the process held before the transformer
existed (interpreter, libraries, text encoder and VAE), and the seconds of that step (median of 2 after a
warm-up). Then, at A14B shapes (meta device, no memory), the packed transformer size of each weight format.
Targets: resident <= 30 % of BF16 at W4 and <= 53 % at W8; step peak RSS <= 45 % of BF16 at W4; packed <= 2x
fake in time.

    python bench/runtime.py [--tokens 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch
from quantize import step_inputs
from timing import median_seconds

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


def child(name: str, tokens: int) -> dict:
    fmt, runtime, tile_rows = CONFIGS[name]
    baseline = current_rss()
    pipe = tiny.build_medium_pipeline(dtype=torch.bfloat16)
    others = sum(t.untyped_storage().nbytes() for c in (pipe.text_encoder, pipe.vae)
                 for t in (*c.parameters(), *c.buffers()))
    if fmt is not None:
        vidquant.apply(pipe, vidquant.quantize(pipe, recipe(fmt)), runtime=runtime, tile_rows=tile_rows)
    gc.collect()
    model = pipe.transformer
    inputs = bf16_step_inputs(model, tokens)
    with torch.no_grad():
        model(**inputs)  # warm-up (allocator, kernels' compilation)
        with peak_memory("cpu") as peak:
            model(**inputs)
        seconds = median_seconds(lambda: model(**inputs), repeats=2)
    return {"name": name, "resident": resident_bytes(pipe), "blocks": resident_bytes(pipe, blocks_only=True),
            "peak_rss": peak.bytes - baseline - others,
            "seconds": seconds}


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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medium pipeline, bf16, {args.tokens} tokens")
    rows = []
    for name in CONFIGS:
        out = subprocess.run([sys.executable, Path(__file__).name, "--child", name, "--tokens", str(args.tokens)],
                             cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = rows[0]
    fake = next(r for r in rows if r["name"] == "hif4 fake")
    print(f"{'config':18}{'blocks MiB':>12}{'vs BF16':>9}{'all MiB':>10}{'vs BF16':>9}{'step peak MiB':>15}"
          f"{'vs BF16':>9}{'s/step':>9}{'vs BF16':>9}{'vs fake':>9}")
    for r in rows:
        print(f"{r['name']:18}{r['blocks'] / 2**20:12.1f}{100 * r['blocks'] / ref['blocks']:8.1f}%"
              f"{r['resident'] / 2**20:10.1f}{100 * r['resident'] / ref['resident']:8.1f}%"
              f"{r['peak_rss'] / 2**20:15.1f}{100 * r['peak_rss'] / ref['peak_rss']:8.1f}%"
              f"{r['seconds']:9.2f}{r['seconds'] / ref['seconds']:8.2f}x{r['seconds'] / fake['seconds']:8.2f}x")
    a14b_sizes()


if __name__ == "__main__":
    main()
