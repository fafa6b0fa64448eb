"""Speed of quantize_dequantize, measured side by side in one run (issue: formats must be fast).

For HiF4 and HiF8 on a 4096x4096 bf16 tensor it times a plain memory copy, the straightforward torch-ops
implementation (one op per step, fp32 temporaries; the path any device takes) and the shipped CPU kernel,
checks the last two agree bit for bit, and prints the ratios. Targets: shipped >= 20x faster than
straightforward; aim for within 10x of the copy. The other formats' torch-ops times are listed for
reference.

    python bench/formats.py [--size 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os

import torch
from timing import median_seconds

from vidquant import formats


def straightforward(fmt: formats.Format, x: torch.Tensor) -> torch.Tensor:
    os.environ["VIDQUANT_NO_KERNELS"] = "1"
    try:
        return fmt.quantize_dequantize(x)
    finally:
        del os.environ["VIDQUANT_NO_KERNELS"]



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    print(f"{args.size}x{args.size} bf16, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    copy = median_seconds(x.clone, args.repeats)
    print(f"{'':10} {'copy ms':>9} {'torch-ops ms':>13} {'shipped ms':>11} {'speed-up':>9} {'vs copy':>8} bit-exact")
    for name in ("hif4", "hif8"):
        fmt = formats.get(name)
        slow = median_seconds(lambda fmt=fmt: straightforward(fmt, x), max(1, args.repeats // 2))
        fast = median_seconds(lambda fmt=fmt: fmt.quantize_dequantize(x), args.repeats)
        exact = formats.bits_equal(straightforward(fmt, x), fmt.quantize_dequantize(x))
        print(f"{name:10} {copy * 1e3:9.1f} {slow * 1e3:13.1f} {fast * 1e3:11.1f} {slow / fast:8.1f}x "
              f"{fast / copy:7.1f}x {exact}")
    print("\nother formats (torch ops):")
    for name in formats.names():
        if not name.startswith("hif"):
            fmt = formats.get(name)
            print(f"{name:12} {median_seconds(lambda fmt=fmt: fmt.quantize_dequantize(x), 1) * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
