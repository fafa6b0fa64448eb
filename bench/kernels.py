"""Speed of the vidquant.kernels functions, side by side in one run; no asserts on time.

CPU (always, small shapes): the HiF4 integer reference (`hif4_int_operands`, `hif4_w4a4_gemm`) against the
float fake-quant GEMM it stands for (``qdq(x) @ qdq(W)^T`` in fp32) and plain ``F.linear`` in fp32 / bf16.

CUDA (when a GPU is there; otherwise a message): for each format, the Triton activation qdq against the torch-ops
path (what `Format.quantize_dequantize` runs on CUDA), with a bit-exactness check; then the GEMMs
(``dequant_linear`` W4A16, ``qdq_linear`` simulated W4A4, ``hif4_int_linear`` integer W4A4) against BF16
``F.linear`` and against the torch-ops path (decode the packed weight, qdq x, ``F.linear`` in fp32), with the max
relative difference to that path (fp32 outputs; F.linear in fp32 may use TF32 if the process allows it).

    python bench/kernels.py [--tokens 2048] [--dim 4096] [--repeats 5] [--formats hif4,mxfp4]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import median_seconds

from vidquant import formats
from vidquant.kernels import hif4_int, triton_quant

F32 = torch.float32


def cpu_part(repeats: int) -> None:
    m, n, k = 64, 256, 1024
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.02
    fmt = formats.get("hif4")
    x_enc, w_enc = fmt.encode(x), fmt.encode(w)
    xq, wq = fmt.quantize_dequantize(x), fmt.quantize_dequantize(w)
    xb, wb = x.bfloat16(), w.bfloat16()
    base = median_seconds(lambda: F.linear(x, w), repeats)
    rows = [
        ("F.linear fp32", base),
        ("F.linear bf16", median_seconds(lambda: F.linear(xb, wb), repeats)),
        ("fake-quant GEMM fp32 (qdq given)", median_seconds(lambda: xq @ wq.T, repeats)),
        ("hif4 encode(x)", median_seconds(lambda: fmt.encode(x), repeats)),
        ("hif4_int_operands(x_enc)", median_seconds(lambda: hif4_int.hif4_int_operands(x_enc), repeats)),
        ("hif4_w4a4_gemm(x_enc, w_enc)", median_seconds(lambda: hif4_int.hif4_w4a4_gemm(x_enc, w_enc), repeats)),
    ]
    print(f"CPU, x {m}x{k} fp32, W {n}x{k}, {torch.get_num_threads()} torch threads, median of {repeats}")
    print(f"{'':36} {'ms':>9} {'vs F.linear fp32':>17}")
    for label, seconds in rows:
        print(f"{label:36} {seconds * 1e3:9.3f} {seconds / base:16.1f}x")


def cuda_timer(fn: Callable[[], object], repeats: int) -> float:
    def synced() -> None:
        fn()
        torch.cuda.synchronize()

    return median_seconds(synced, repeats)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def cuda_part(tokens: int, dim: int, names: list[str], repeats: int) -> None:
    if not torch.cuda.is_available():
        print("\nCUDA: no GPU here, skipping the Triton timings")
        return
    if not triton_quant.available():
        print("\nCUDA: triton is not installed (pip install 'triton>=3'), skipping the Triton timings")
        return
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, dim, device=dev, generator=g).bfloat16()
    w = (torch.randn(dim, dim, device=dev, generator=g) * 0.02).bfloat16()
    print(f"\nCUDA {torch.cuda.get_device_name()}, x {tokens}x{dim} bf16, W {dim}x{dim}, median of {repeats}")
    print("activation qdq:")
    print(f"{'':12} {'torch-ops ms':>13} {'triton ms':>10} {'speed-up':>9} bit-exact")
    for name in names:
        fmt = formats.get(name)
        slow = cuda_timer(lambda fmt=fmt: fmt.quantize_dequantize(x), repeats)
        fast = cuda_timer(lambda name=name: triton_quant.quantize_dequantize(x, name), repeats)
        exact = formats.bits_equal(triton_quant.quantize_dequantize(x, name), fmt.quantize_dequantize(x))
        print(f"{name:12} {slow * 1e3:13.3f} {fast * 1e3:10.3f} {slow / fast:8.1f}x {exact}")

    bf16 = cuda_timer(lambda: F.linear(x, w), repeats)
    print(f"GEMMs (BF16 F.linear: {bf16 * 1e3:.3f} ms); 'torch-ops' = decode + qdq + fp32 F.linear:")
    print(f"{'':28} {'ms':>9} {'vs bf16':>8} {'torch-ops ms':>13} {'speed-up':>9} {'max rel diff':>13}")
    shape = (dim, dim)
    for name in names:
        fmt = formats.get(name)
        packed = fmt.pack(fmt.encode(w))
        wdq = fmt.decode(fmt.unpack(packed, shape, dtype=torch.float32))
        # fp32 outputs on both sides, so that the difference shows the accumulation order only
        cases: list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]]] = [
            (f"{name} W-only", lambda p=packed, n=name: triton_quant.dequant_linear(x, p, shape, n, out_dtype=F32),
             lambda wd=wdq: F.linear(x.float(), wd)),
            (f"{name} W+A (fake quant)", lambda p=packed, n=name: triton_quant.qdq_linear(x, p, shape, n,
                                                                                          out_dtype=F32),
             lambda wd=wdq, f=fmt: F.linear(f.quantize_dequantize(x).float(), wd)),
        ]
        if name == "hif4":
            cases.append(("hif4 W4A4 int8 dots", lambda p=packed: triton_quant.hif4_int_linear(x, p, shape),
                          lambda wd=wdq, f=fmt: F.linear(f.quantize_dequantize(x).float(), wd)))
        for label, kernel, reference in cases:
            fast = cuda_timer(kernel, repeats)
            slow = cuda_timer(reference, repeats)
            diff = rel_diff(kernel(), reference())
            print(f"{label:28} {fast * 1e3:9.3f} {fast / bf16:7.1f}x {slow * 1e3:13.3f} {slow / fast:8.1f}x "
                  f"{diff:13.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default=",".join(triton_quant.SPECS), help="comma-separated format names")
    args = parser.parse_args()
    cpu_part(args.repeats)
    cuda_part(args.tokens, args.dim, args.formats.split(","), args.repeats)


if __name__ == "__main__":
    main()
