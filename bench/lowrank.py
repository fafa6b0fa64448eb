"""Evidence for lowrank's default method: torch.linalg.svd vs torch.svd_lowrank at Wan2.x sizes; cost of refining.

For rank 32 on fp32 weights of the full-size shapes (5120 x 5120: attention; 13824 x 5120: FFN up) it times
the exact SVD and the randomized one (q = rank + OVERSAMPLING, POWER_ITERS power iterations) side by side in
one run, and compares their branches: ``||W - L||_F^2`` of the randomized branch above the Eckart–Young optimum
(the exact SVD's), and the error each leaves once the residual is quantized to HiF4,
``||W - L - Q(W - L)||^2 / ||W||^2`` (refine_lowrank's iteration 0). Then it runs refine_lowrank with HiF4,
without and with a Hessian, and reports the seconds per iteration and how far the iterations get.

The weights: N(0, 0.02) noise, 8 columns x 10 (the outliers smoothing leaves), and either a power-law
component ``s_i = 8 · edge · i^-0.6`` (i <= 512, edge = 0.02 (sqrt(N) + sqrt(K)), the noise's largest
singular value: s_32 ~ edge, a spectrum that decays past the rank as trained weights' do), or none
("flat": the worst case for a randomized SVD, rank 32 cuts into the noise bulk).

    python bench/lowrank.py [--rank 32] [--iters 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import median_seconds

from vidquant import formats
from vidquant.methods.lowrank import OVERSAMPLING, POWER_ITERS, lowrank, refine_lowrank

SHAPES = ((5120, 5120), (13824, 5120))
OUTLIERS = 8
TOKENS = 2048  # calibration rows behind the Hessian


def weight(n: int, k: int, decaying: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, torch.randperm(k, generator=g)[:OUTLIERS]] *= 10
    if decaying:
        m = 512
        u = torch.linalg.qr(torch.randn(n, m, generator=g)).Q
        v = torch.linalg.qr(torch.randn(k, m, generator=g)).Q
        s = 8 * 0.02 * (n**0.5 + k**0.5) * torch.arange(1, m + 1.0) ** -0.6
        w += (u * s) @ v.T
    return w


def hessian(k: int, seed: int = 1) -> torch.Tensor:
    """``X^T X`` of TOKENS rows with per-channel ranges spread over 30x and a few heavy channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, k, generator=g) * (torch.rand(k, generator=g) * 3 + 0.1)
    x[:, :OUTLIERS] *= 10
    return x.T @ x


def sq_norm(t: torch.Tensor) -> float:
    return sum(float(c.square().sum(dtype=torch.float64)) for c in t.split(1024))


def errors(w: torch.Tensor, down: torch.Tensor, up: torch.Tensor, quantize) -> tuple[float, float]:
    """``||W - L||^2`` and ``||W - L - Q(W - L)||^2 / ||W||^2``."""
    r = w - up @ down
    return sq_norm(r), sq_norm(r - quantize(r)) / sq_norm(w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--iters", type=int, default=8, help="refinement iterations to allow")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of svd_lowrank (svd: one)")
    args = parser.parse_args()
    r, hif4 = args.rank, formats.get("hif4").quantize_dequantize
    start = time.perf_counter()
    print(f"rank {r}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; svd_lowrank: "
          f"q = rank + {OVERSAMPLING}, niter {POWER_ITERS}; svd: one call, svd_lowrank: median of {args.repeats}")
    lowrank(torch.randn(256, 256), r, method="svd")  # warm-up (LAPACK, numba)
    hif4(torch.randn(64, 256))

    print(f"\n{'shape':>12} {'spectrum':>9} {'svd s':>7} {'lowrank s':>9} {'speed-up':>8} "
          f"{'opt err':>8} {'excess':>9}  {'Q err svd':>10} {'Q err lowrank':>13} {'ratio':>9}")
    for n, k in SHAPES:
        for decaying in (True, False):
            w = weight(n, k, decaying)
            t0 = time.perf_counter()
            exact = lowrank(w, r, method="svd")
            t_svd = time.perf_counter() - t0
            randomized: list[tuple[torch.Tensor, torch.Tensor]] = []
            t_rand = median_seconds(
                lambda w=w, out=randomized: out.append(lowrank(w, r, method="svd_lowrank")), args.repeats
            )
            opt, q_svd = errors(w, *exact, hif4)
            err, q_rand = errors(w, *randomized[-1], hif4)
            print(f"{n:>6}x{k:<5} {'decaying' if decaying else 'flat':>9} {t_svd:7.1f} {t_rand:9.2f} "
                  f"{t_svd / t_rand:7.0f}x {opt / sq_norm(w):8.4f} {err / opt - 1:9.1e}  {q_svd:10.4e} "
                  f"{q_rand:13.4e} {q_rand / q_svd:9.6f}", flush=True)

    print(f"\nrefine_lowrank, hif4, svd_lowrank, up to {args.iters} iterations (decaying spectrum): "
          "error per iteration relative to iteration 0")
    print(f"{'shape':>12} {'hessian':>8} {'s/iter':>7} {'run':>4} {'best':>4}  errors / errors[0]")
    for n, k in SHAPES:
        w = weight(n, k, True)
        for h in (None, hessian(k)):
            t0 = time.perf_counter()
            res = refine_lowrank(w, r, hif4, hessian=h, iters=args.iters)
            per_iter = (time.perf_counter() - t0) / len(res.errors)
            rel = " ".join(f"{e / res.errors[0]:.4f}" for e in res.errors)
            print(f"{n:>6}x{k:<5} {'no' if h is None else 'yes':>8} {per_iter:7.2f} {len(res.errors):4d} "
                  f"{res.best:4d}  {rel}  (iteration 0: {res.errors[0]:.4e})", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
