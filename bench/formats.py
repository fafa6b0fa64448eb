"""Speed of quantize_dequantize for every format, measured side by side in one run (issue: formats must be fast).

On a 4096x4096 bf16 tensor it times a plain memory copy, the straightforward torch-ops implementation (one
op per step, fp32 temporaries; the path any device takes, forced here with VIDQUANT_NO_KERNELS=1) and the
shipped CPU path (the fused numba kernels), checks the last two agree bit for bit, and prints the ratios.
Targets: shipped >= 20x faster than torch ops; aim for within 10x of the copy. Most of a copy's time on
a fresh 32 MiB output is page faults, which every path pays for its output too.

    python bench/formats.py [--size 4096] [--repeats 5] [--formats mxfp4,int8]
"""

from __future__ import annotations

import argparse
import os

import numba
import torch
from timing import median_seconds, median_seconds_ab

from vidquant import formats


def straightforward(fmt: formats.Format, x: torch.Tensor) -> torch.Tensor:
    """The torch-ops path, whatever the device."""
    os.environ["VIDQUANT_NO_KERNELS"] = "1"
    try:
        return fmt.quantize_dequantize(x)
    finally:
        del os.environ["VIDQUANT_NO_KERNELS"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default="", help="comma-separated names (default: every registered format)")
    args = parser.parse_args()
    names = args.formats.split(",") if args.formats else formats.names()
    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    slow_repeats = max(1, args.repeats // 2)
    print(f"{args.size}x{args.size} bf16, torch {torch.__version__}, {torch.get_num_threads()} torch / "
          f"{numba.get_num_threads()} numba threads, median of {args.repeats} (torch ops: of {slow_repeats})")
    print(f"{'':12} {'copy ms':>8} {'torch-ops ms':>13} {'shipped ms':>11} {'speed-up':>9} {'vs copy':>8} bit-exact")
    for name in names:
        fmt = formats.get(name)
        slow = median_seconds(lambda fmt=fmt: straightforward(fmt, x), slow_repeats)
        # the copy in alternation with the shipped path, per format: the machine's load drifts during a run
        copy, fast = median_seconds_ab(x.clone, lambda fmt=fmt: fmt.quantize_dequantize(x), args.repeats)
        exact = formats.bits_equal(straightforward(fmt, x), fmt.quantize_dequantize(x))
        print(f"{name:12} {copy * 1e3:8.1f} {slow * 1e3:13.1f} {fast * 1e3:11.1f} {slow / fast:8.1f}x "
              f"{fast / copy:7.1f}x {exact}")


if __name__ == "__main__":
    main()
