"""GPTQ cost and gain on the two full-size Wan FFN layers, in one run (issue: GPTQ with a format-aware quantizer).

ffn.net.0.proj (weight 13824 x 5120) and ffn.net.2 (weight 5120 x 13824) with bf16 weights ~ N(0, 0.02).
Calibration inputs are synthetic and heavy-tailed: a rank-256 heavy-tailed latent mixed into all channels
(correlated channels, as real activations are) plus iid noise, lognormal per-channel scales and a few
outlier channels at 30x; ffn.net.2 sees GELU(x W0^T) of those, as in the model. The Hessian is X^T X
over the calibration tokens; the output error is measured on held-out tokens as
||X (W_q - W)^T||^2 / ||X W^T||^2 in dB, for GPTQ and for round-to-nearest (RTN).

Printed per layer: GPTQ wall time with its own error evaluation and without it (``evaluate=False``, what
svdquant-gptq runs: its held-out check replaces the evaluation), RTN (quantize_dequantize) time, the process
RSS peak during the GPTQ
call (absolute, and the delta over the RSS just before it), and the errors (the Hessian-weighted one that
gptq reports, and the held-out one) with their difference GPTQ - RTN in dB.

    python bench/gptq.py [--format hif4] [--tokens 8192] [--heldout 1024]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from timing import median_seconds

from vidquant import formats
from vidquant.eval.probes import current_rss, peak_memory
from vidquant.methods.gptq import gptq

DIM, FFN_DIM = 5120, 13824
GiB = 2**30


def heavy_tailed_inputs(tokens: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(tokens, k) fp32 activations with the structure GPTQ exploits and the tails that hurt RTN.

    A rank-256 heavy-tailed latent (Gaussian times lognormal) mixed into all channels (correlated
    channels) plus iid noise (about 13 % of the variance), lognormal per-channel scales, and 0.3 %
    outlier channels at 30x.
    """
    latent = torch.randn(tokens, 256, generator=g) * torch.exp(0.5 * torch.randn(tokens, 256, generator=g))
    x = latent @ (torch.randn(256, k, generator=g) / 16) + 0.5 * torch.randn(tokens, k, generator=g)
    x *= torch.exp(0.5 * torch.randn(k, generator=g))
    outliers = torch.randperm(k, generator=g)[: max(1, 3 * k // 1000)]
    x[:, outliers] *= 30
    return x


def held_out_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """||x (wq - w)^T||^2 / ||x w^T||^2 (fp32 products, fp64 sums)."""
    ref = x @ w.T
    err = x @ (wq.float() - w).T
    return float(torch.sum(err * err, dtype=torch.float64) / torch.sum(ref * ref, dtype=torch.float64))


def db(ratio: float) -> float:
    return 10 * math.log10(ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="hif4")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens for the Hessian")
    parser.add_argument("--heldout", type=int, default=1024, help="held-out tokens for the output error")
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    fmt = formats.get(args.format)
    print(f"GPTQ {fmt.name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.tokens} calibration + {args.heldout} held-out tokens, block_size {args.block_size}")

    g = torch.Generator().manual_seed(0)
    x0 = heavy_tailed_inputs(args.tokens + args.heldout, DIM, g)
    w0 = (torch.randn(FFN_DIM, DIM, generator=g) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(DIM, FFN_DIM, generator=g) * 0.02).to(torch.bfloat16)
    x2 = torch.nn.functional.gelu(x0 @ w0.float().T, approximate="tanh")
    layers = [("ffn.net.0.proj", w0, x0), ("ffn.net.2", w2, x2)]

    rows = []
    for name, w, x in layers:
        calib, held = x[: args.tokens], x[args.tokens:]
        hessian = calib.T @ calib
        rtn_s = median_seconds(lambda w=w: fmt.quantize_dequantize(w), 3)
        baseline = current_rss()
        with peak_memory("cpu") as peak:
            t0 = time.perf_counter()
            result = gptq(w, hessian, fmt, block_size=args.block_size, name=name)
            gptq_s = time.perf_counter() - t0
        w32 = w.float()
        held_gptq = held_out_error(held, w32, result.weight)
        held_rtn = held_out_error(held, w32, fmt.quantize_dequantize(w))
        t0 = time.perf_counter()
        fast = gptq(w, hessian, fmt, block_size=args.block_size, name=name, evaluate=False)
        fast_s = time.perf_counter() - t0
        assert torch.equal(fast.encoded.codes, result.encoded.codes)  # the same rounding, no errors computed
        del fast
        rows.append((name, tuple(w.shape), gptq_s, fast_s, rtn_s, peak.bytes, peak.bytes - baseline, result,
                     held_gptq, held_rtn))
        del hessian, result

    print(f"\n{'layer':15} {'weight':>12} {'gptq s':>7} {'no-eval s':>9} {'rtn ms':>7} {'peak GiB':>9} "
          f"{'delta GiB':>10} {'H-err gptq':>11} {'H-err rtn':>10} {'held gptq':>10} {'held rtn':>9} {'gptq-rtn':>9}")
    for name, shape, gptq_s, fast_s, rtn_s, peak_b, delta_b, result, held_gptq, held_rtn in rows:
        print(f"{name:15} {shape[0]:>5}x{shape[1]:<6} {gptq_s:7.1f} {fast_s:9.1f} {rtn_s * 1e3:7.0f} "
              f"{peak_b / GiB:9.2f} {delta_b / GiB:10.2f} {db(result.error):8.2f} dB {db(result.rtn_error):7.2f} dB "
              f"{db(held_gptq):7.2f} dB {db(held_rtn):6.2f} dB {db(held_gptq) - db(held_rtn):6.2f} dB")
    print("\nerrors: relative output error in dB (lower is better); H-err = tr(dW H dW^T) / tr(W H W^T) on the "
          "calibration Hessian, held = on held-out tokens; gptq-rtn < 0 means GPTQ is better.")


if __name__ == "__main__":
    main()
