"""SVDQuant's low-rank branch (Li et al., ICLR 2025, arXiv:2411.05007; deepcompressor): the tensor math only.

A (smoothed) weight ``W`` (N out x K in) is split into a rank-r branch ``L = up · down`` kept in 16 bits
and a residual ``R = W - L`` that is quantized to 4 bits (the paper's ``Ŵ = L1 L2 + R``, with its
``XW`` convention transposed to torch's ``(out, in)`` weights)::

    x W^T  ≈  Q(x) Q(R)^T + (x down^T) up^T,        down (r, K), up (N, r)

so the layer's weight error is ``E = W - L - Q(R)`` instead of ``W - Q(W)``.
Why the branch absorbs outliers: smoothing (methods/smoothing.py) moves the activation outliers into a
few large weight columns. A few large columns span a subspace of dimension at most their number, so the
smoothed weight is a small-norm matrix plus a low-rank part that holds the outliers, and its spectrum is
dominated by a few singular values. The rank-r truncated SVD, the best rank-r approximation of W
(Eckart–Young: ``||W - L||_F^2 = sum_{i > r} s_i^2``), takes those directions, leaving R with a smaller,
flatter range that 4-bit formats represent well, while the branch costs r (N + K) 16-bit values: for
r = 32 and a 13824 x 5120 Wan2.x weight 0.9 % of its values, 3 % of its bits in HiF4.

`lowrank` is the plain truncated SVD (exact or randomized). `refine_lowrank` is deepcompressor's
iteration on top of it: what the rounding of R leaves behind, ``W - Q(R)``, is decomposed again,
so the branch also absorbs the part of the quantization error that is low rank; the best branch
by the (optionally Hessian-weighted, i.e. layer-output) error is kept.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .fidelity import output_energy

Method = Literal["svd", "svd_lowrank"]
METHODS: tuple[str, ...] = ("svd", "svd_lowrank")
# svd_lowrank is the default because bench/lowrank.py (rank 32, 5120 x 5120 and 13824 x 5120 fp32, 2 CPU threads)
# finds it as good and much faster: ||W - L||_F^2 2-3e-5 above the Eckart–Young optimum for a spectrum decaying
# past the rank (1e-3 for a flat one), the same HiF4 error as the exact SVD to 0.1 %, in 2-8 s instead of
# 130-190 s (24-63x; timed side by side on a shared, loaded machine). The exact SVD stays for tests and checks.
DEFAULT_METHOD: Method = "svd_lowrank"
OVERSAMPLING = 16  # svd_lowrank sketches q = rank + OVERSAMPLING directions (Halko, Martinsson & Tropp 2011)
POWER_ITERS = 6  # power iterations; excess error on a decaying spectrum: 2 leave ~3e-3, 6 ~2e-5, 8 ~2e-6
# bench/lowrank.py, HiF4: every refinement iteration still improved (none stopped early in 8), by 1.3-2 % at first
# and 0.4-0.5 % at the 8th; 8 iterations cut the error by 5-8 % (0.25-0.35 dB), for 4-11 s each at full size on CPU.
# On a real pretrained model and on synthetic layers it converged after 22-27 iterations, 0.2-0.3 dB better than
# at 8 (issue 13), so with held-out rows the iteration stops on a tolerance and DEFAULT_ITERS is only the cap
# without them; MAX_ITERS bounds the held-out run.
DEFAULT_ITERS = 8
MAX_ITERS = 64
DEFAULT_TOL = 5e-4  # stop when an iteration lowers the held-out error by less than 0.05 % (0.002 dB) of the best
_CHUNK = 1 << 22  # elements per row chunk when summing the error: a few tens of MB of fp32 temporaries


def lowrank(
    weight: Tensor,
    rank: int,
    *,
    method: Method = DEFAULT_METHOD,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The best rank-r approximation ``up · down`` of ``weight`` (N, K) (Eckart–Young; SVDQuant's branch).

    Returns ``(down (r, K), up (N, r))`` in ``dtype`` (default: ``weight``'s) with the singular values
    split evenly, ``up = U_r sqrt(S_r)`` and ``down = sqrt(S_r) V_r^T``, so both factors have similar
    ranges when stored in 16 bits. Computed in fp32 (fp64 for an fp64 weight).

    ``method="svd"`` is ``torch.linalg.svd``. ``"svd_lowrank"`` is the randomized SVD
    (``torch.svd_lowrank``, Halko et al. 2011) with ``q = rank + OVERSAMPLING`` sketch directions and
    ``POWER_ITERS`` power iterations. Tolerance: its ``||W - L||_F^2`` is within a relative 1e-4 of the
    optimum ``sum_{i > r} s_i^2`` when the spectrum decays past rank r, as trained weights' do (measured
    ~1e-5 at Wan2.x sizes, bench/lowrank.py), and within 0.5 % when rank r cuts into a flat noise
    spectrum, where the directions left are all about equally good; the quantized error it leads to
    is the exact SVD's to ~1e-3 relative either way. It is deterministic: the sketch is drawn from ``seed``
    in a forked RNG, so the same inputs give identical factors and the global RNG state is untouched.
    """
    w = _check_weight(weight, "lowrank")
    n, k = w.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, k):
        raise ValueError(f"lowrank: rank must be an integer in 1..{min(n, k)} for a {n}x{k} weight, got {rank!r}")
    if method not in METHODS:
        raise ValueError(f"lowrank: method must be one of {', '.join(METHODS)}, got {method!r}")
    dtype = weight.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"lowrank: dtype must be a floating-point dtype, got {dtype}")
    if method == "svd":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        with _seeded(w.device, seed):
            u, s, v = torch.svd_lowrank(w, q=min(rank + OVERSAMPLING, n, k), niter=POWER_ITERS)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    root = s.sqrt()
    return (root[:, None] * vh).to(dtype), (u * root).to(dtype)


@dataclass(frozen=True)
class LowRankResult:
    """The kept branch of `refine_lowrank` and the error of every iteration it ran."""

    down: Tensor  # (r, K), in the requested dtype
    up: Tensor  # (N, r)
    errors: list[float]  # relative error per iteration; iteration 0 is the plain SVD branch
    best: int  # index of the kept iteration: errors[best] == min(errors)


def refine_lowrank(
    weight: Tensor,
    rank: int,
    quantize: Callable[[Tensor], Tensor],
    *,
    hessian: Tensor | None = None,
    iters: int = DEFAULT_ITERS,
    method: Method = DEFAULT_METHOD,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    held_out: Tensor | None = None,
    tol: float = 0.0,
) -> LowRankResult:
    """SVDQuant's branch refined on the quantization error (deepcompressor's iterative low-rank calibration).

    Iteration 0 is the plain branch ``(down, up) = lowrank(W)``, rounded to ``dtype`` (the precision it is
    stored in; default ``weight``'s). Each iteration computes, in fp32, the residual
    ``R = W - up · down``, the layer's error ``E = W - up · down - Q(R)`` with ``Q = quantize`` (a callable
    on fp32 tensors, e.g. ``formats.get("hif4").quantize_dequantize``) and its relative size::

        err = tr(E H E^T) / tr(W H W^T)     with a Hessian H (K, K) = sum x^T x of the layer's inputs
        err = ||E||_F^2 / ||W||_F^2         without one

    (the first is the output error ``sum ||x E^T||^2`` over the calibration inputs relative to the
    output's energy). Iteration k + 1 decomposes what rounding leaves: ``(down, up) = lowrank(W - Q(R_k))``,
    so that ``up · down + Q(R)`` approximates W better when part of the rounding error is low rank.
    The iteration is not monotone: it stops at the first iteration whose error is not below the best so
    far by more than a relative ``tol``, or after ``iters`` refinement iterations, and returns the best
    branch (``iters = 0``: the plain SVD).

    ``held_out`` (M, K): input rows the branch is not fitted on (not in ``hessian``). The errors, the
    stopping rule and the kept branch then use the output error on those rows,
    ``||X E^T||^2 / ||X W^T||^2``, and ``hessian`` is not needed: the iteration count is set by held-out
    evidence (pass ``iters`` as a safety bound, e.g. `MAX_ITERS`, and a ``tol`` such as `DEFAULT_TOL`),
    and each error costs M x N x K instead of N x K x K. Memory: besides W (fp32) about three N x K fp32
    temporaries; an error is summed over row chunks in fp64.
    """
    w = _check_weight(weight, "refine_lowrank").float()
    n, k = w.shape
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"refine_lowrank: iters must be an integer >= 0, got {iters!r}")
    if not callable(quantize):
        raise ValueError(f"refine_lowrank: quantize must be a callable Tensor -> Tensor, got {type(quantize).__name__}")
    h = None
    if hessian is not None:
        if not isinstance(hessian, Tensor) or hessian.shape != (k, k) or not hessian.is_floating_point():
            shape = tuple(hessian.shape) if isinstance(hessian, Tensor) else type(hessian).__name__
            raise ValueError(f"refine_lowrank: hessian must be a floating ({k}, {k}) tensor, got {shape}")
        h = hessian.detach().to(w.device, torch.float32)
        if not torch.isfinite(h).all():
            raise ValueError("refine_lowrank: hessian holds NaN or inf")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and 0 <= tol < 1):
        raise ValueError(f"refine_lowrank: tol must be a number in [0, 1), got {tol!r}")
    x = None
    if held_out is not None:
        if not isinstance(held_out, Tensor) or held_out.dim() != 2 or held_out.shape[1] != k \
                or held_out.shape[0] == 0 or not held_out.is_floating_point():
            shape = tuple(held_out.shape) if isinstance(held_out, Tensor) else type(held_out).__name__
            raise ValueError(f"refine_lowrank: held_out must be floating (M >= 1, {k}) rows, got {shape}")
        x = held_out.detach().to(w.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("refine_lowrank: held_out holds NaN or inf")
        h = None  # judged on the held-out rows only

    def quadratic(e: Tensor) -> float:
        return _quadratic(e, h) if x is None else output_energy(x, e)

    dtype = weight.dtype if dtype is None else dtype
    scale = quadratic(w)
    if not scale > 0:
        what = "||X W^T||^2 on the held-out rows" if x is not None else "tr(W H W^T)" if h is not None else \
            "||W||_F^2"
        raise ValueError(f"refine_lowrank: {what} is {scale}, so the relative error is undefined")

    errors: list[float] = []
    best, kept = 0, None
    prev_q: Tensor | None = None  # Q(R) of the previous iteration
    for it in range(iters + 1):
        target = w if prev_q is None else prev_q.neg_().add_(w)  # W - Q(R_{k-1}), in Q's buffer
        prev_q = None
        down, up = lowrank(target, rank, method=method, dtype=dtype, seed=seed)
        del target
        r = up.float() @ down.float()  # L, then R = W - L in place
        r.neg_().add_(w)
        q = quantize(r)
        if not isinstance(q, Tensor) or q.shape != r.shape:
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"refine_lowrank: quantize must return a tensor of shape {tuple(r.shape)}, got {shape}")
        q = q.float()
        if q.data_ptr() == r.data_ptr():  # a quantizer that hands back its input: R is overwritten below
            q = q.clone()
        err = quadratic(r.sub_(q)) / scale  # E = R - Q(R) = W - L - Q(R)
        del r
        if not math.isfinite(err):
            raise ValueError(f"refine_lowrank: the error of iteration {it} is {err}: quantize returned NaN or inf")
        errors.append(err)
        if kept is not None and not err < errors[best] * (1 - tol):
            if err < errors[best]:  # a gain below the tolerance: keep it, but stop
                best, kept = it, (down, up)
            break
        best, kept, prev_q = it, (down, up), q
        del q  # prev_q is the only reference: next iteration's target reuses the buffer
    assert kept is not None
    return LowRankResult(down=kept[0], up=kept[1], errors=errors, best=best)


def _check_weight(weight: Tensor, who: str) -> Tensor:
    """``weight`` detached, in fp32 (fp64 stays fp64), after checking it is a finite 2-D float matrix."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point() or weight.numel() == 0:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        dt = weight.dtype if isinstance(weight, Tensor) else ""
        raise ValueError(f"{who}: weight must be a non-empty 2-D floating-point (out, in) tensor, got {shape} {dt}")
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    if not torch.isfinite(w).all():
        raise ValueError(f"{who}: weight holds NaN or inf")
    return w


def _quadratic(e: Tensor, h: Tensor | None) -> float:
    """``tr(E H E^T) = sum((E H) * E)``, or ``||E||_F^2`` for ``h`` None: fp32 products over row chunks, fp64 sums."""
    rows = max(1, _CHUNK // e.shape[1])
    total = 0.0
    for c in e.split(rows):
        total += float(((c if h is None else c @ h) * c).sum(dtype=torch.float64))
    return total if math.isfinite(total) else math.nan


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Run the body with ``device``'s default generator seeded to ``seed``, restoring every RNG state after."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    backend = getattr(torch, device.type)
    index = device.index if device.index is not None else backend.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type), backend.device(index):
        backend.manual_seed(seed)  # the current device's generator only
        yield
