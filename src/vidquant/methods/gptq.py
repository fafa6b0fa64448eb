"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Alg. 1) with a format-aware column quantizer, as pure tensor math.

Why GPTQ: round-to-nearest (RTN) minimizes the weight error ``||W - Q||`` but what matters is the
layer's output error ``||(W - Q) X^T||^2 = tr(dW H dW^T)`` with ``H = X^T X`` over calibration tokens.
GPTQ rounds the columns of ``W[N, K]`` (the input channels) one at a time and moves each column's
rounding error onto the columns not rounded yet, weighted by the inverse Hessian (the Optimal Brain
Surgeon update), which on correlated inputs cancels much of the output error that RTN leaves.

Algorithm 1 as written: the rows of the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) give
every update; the updates are applied lazily, ``block_size`` columns at a time (one rank-1 update per
column inside the block, one matrix product for the columns after it). ``U`` is computed as
``J L^-1 J`` where ``L`` is the Cholesky factor of ``J H J`` and ``J`` reverses the columns' order: the
same matrix as ``cholesky(cholesky_inverse(cholesky(H)), upper=True)`` of the reference code, with one
factorization instead of two and no explicit inverse (cheaper, and only one place where it can fail).

The quantizer is the format's `ColumnQuantizer`: a block format's metadata (HiF4's scale and
sub-block exponents, MX/NVFP4/INT block scales) is fixed from the *error-updated* weights when the
column loop reaches the first column of each format block, then that block's columns are rounded one
by one under it (a reading of HiGPTQ, docs/formats.md). ``act_order`` (columns in descending
``diag(H)``) would visit a format block's columns out of order, so it uses *static groups* (as
AutoGPTQ's ``static_groups``): every block's metadata is fixed up front from the original weight, and
only the element rounding sees the propagated errors.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from vidquant import formats
from vidquant.formats import Encoded, Format
from vidquant.formats.base import FLOAT_DTYPES

logger = logging.getLogger(__name__)

MAX_DAMP = 10.0  # the largest relative damping the Cholesky retries go up to
_TILE = 1024  # columns per slab when gathering or reducing K x K matrices


@dataclass(frozen=True)
class GPTQResult:
    """What `gptq` returns; the errors are relative output errors ``tr(dW H dW^T) / tr(W H W^T)``."""

    encoded: Encoded  # the quantized weight (pack it with fmt.pack)
    weight: Tensor  # fmt.decode(encoded): the dequantized weight (N, K) in the requested dtype
    error: float  # relative output error of `weight` (float64 arithmetic)
    rtn_error: float  # the same for plain round-to-nearest, fmt.quantize_dequantize(W)
    damp: float  # the relative damping finally used (after retries)


def gptq(
    weight: Tensor,
    hessian: Tensor,
    fmt: Format | str,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    dtype: torch.dtype | None = None,
    name: str = "",
) -> GPTQResult:
    """Quantize ``weight`` (N, K) to ``fmt`` with GPTQ under the Hessian ``hessian`` (K, K).

    ``hessian`` is the sum or mean of ``x^T x`` over calibration tokens (symmetric, fp32 or fp64); it is
    not modified. Dead inputs (``H_ii == 0``) get ``H_ii = 1`` in the working copy: their weight columns
    are still quantized, just without error propagation. The damping is ``damp * mean(diag H)`` on the
    diagonal; if the Cholesky factorization fails it is retried with ``damp`` x10 up to `MAX_DAMP` (a
    WARNING each time), then a ValueError. ``block_size`` (the lazy-update batch) must be a multiple of
    the format's block size unless one format block covers the whole row (per-channel formats).
    ``dtype`` is the dtype of the returned weight and encoding (default: ``weight.dtype``); the work is
    done in fp32. ``name`` (the layer's name) labels the log lines and errors.
    """
    label = name or "<unnamed>"
    fmt = formats.get(fmt) if isinstance(fmt, str) else fmt
    n, k = _check_inputs(weight, hessian, block_size, damp, label)
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"gptq {label}: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    start = time.perf_counter()

    w0 = weight.detach().float()  # read only (it is the caller's tensor when the weight is fp32)
    try:
        quantizer = fmt.column_quantizer(w0)
    except ValueError as exc:
        raise ValueError(f"gptq {label}: {exc}") from None
    fb = quantizer.block_size
    if fb < k and block_size % fb:
        raise ValueError(f"gptq {label}: block_size {block_size} is not a multiple of {fmt.name}'s block of {fb}")

    order = None
    if act_order:
        diag = hessian.diagonal()
        order = torch.argsort(torch.where(diag == 0, 1, diag), descending=True, stable=True)
    u, used_damp = _inverse_cholesky(hessian, order, damp, label)
    factorized = time.perf_counter()

    # The working weight is kept transposed, (K, N): a column is a contiguous row and the rank-1 updates
    # run over contiguous memory.
    if order is None:
        wt = w0.T.clone(memory_format=torch.contiguous_format)  # never the caller's storage
        columns = range(k)
    else:  # static groups: all metadata from the original weight, before any error moves
        wt = w0.T.index_select(0, order)
        columns = order.tolist()
        for block in range(quantizer.n_blocks):
            quantizer.enter(block, w0[:, block * fb:(block + 1) * fb])
    # x + 0.0 turns a -0.0 into +0.0: where the weight has -0.0 entries, a column entry that is still exactly
    # zero takes the original's sign back (so that a diagonal Hessian gives RTN bit for bit).
    negative_zeros = bool((torch.signbit(w0) & (w0 == 0)).any())
    err1 = torch.empty(min(block_size, k), n, dtype=torch.float32, device=wt.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        u1 = u[i1:i2, i1:i2]
        with _one_thread():  # small ops: a second thread only adds synchronization (and suffers on a busy CPU)
            for i in range(i1, i2):
                j = i - i1
                if order is None and i % fb == 0:  # entering a format block: its metadata from the current columns
                    quantizer.enter(i // fb, wt[i:i + fb].T)
                col = wt[i]
                if negative_zeros:
                    original = w0[:, columns[i]]
                    col = torch.where((col == 0) & (original == 0), original, col)
                err = (col - quantizer.round(columns[i], col)).div_(u1[j, j])
                wt[i + 1:i2].addr_(u1[j, j + 1:], err, alpha=-1)
                err1[j] = err
        wt[i2:].addmm_(u[i1:i2, i2:].T, err1[:i2 - i1], alpha=-1)  # the lazy update of all later columns
    del u, wt, err1
    rounded = time.perf_counter()

    encoded = quantizer.encoded(dtype)
    del quantizer
    out = _decode(fmt, encoded)
    reference = _quadratic_form(w0, hessian)
    error = _relative(_quadratic_form(out.to(torch.float32, copy=True).sub_(w0), hessian), reference)
    rtn = fmt.quantize_dequantize(weight.detach()).to(torch.float32, copy=True).sub_(w0)
    rtn_error = _relative(_quadratic_form(rtn, hessian), reference)
    del rtn
    if not math.isfinite(error):
        raise ValueError(f"gptq {label}: the output error is not finite ({error}); the Hessian is too ill-conditioned")
    end = time.perf_counter()
    logger.info("gptq %s: %s %dx%d, output error %.2f dB (RTN %.2f dB), damp %g%s; %.1f s (Hessian %.1f, columns "
                "%.1f, errors %.1f)", label, fmt.name, n, k, _db(error), _db(rtn_error), used_damp,
                ", act_order" if act_order else "", end - start, factorized - start, rounded - factorized,
                end - rounded)
    return GPTQResult(encoded, out, error, rtn_error, used_damp)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops single-threaded inside the block, restoring the thread count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_inputs(weight: Tensor, hessian: Tensor, block_size: int, damp: float, label: str) -> tuple[int, int]:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() == 0:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"gptq {label}: weight must be a non-empty 2-D tensor (N, K), got {got}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"gptq {label}: weight dtype must be one of {FLOAT_DTYPES}, got {weight.dtype}")
    n, k = weight.shape
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (k, k):
        got = tuple(hessian.shape) if isinstance(hessian, Tensor) else type(hessian).__name__
        raise ValueError(f"gptq {label}: hessian must have shape {(k, k)} for a weight of shape {(n, k)}, got {got}")
    if not hessian.is_floating_point():
        raise ValueError(f"gptq {label}: hessian must be a float tensor, got {hessian.dtype}")
    if hessian.device != weight.device:
        raise ValueError(f"gptq {label}: weight is on {weight.device} but hessian is on {hessian.device}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"gptq {label}: weight contains Inf or NaN")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"gptq {label}: hessian contains Inf or NaN")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq {label}: block_size must be a positive int, got {block_size!r}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"gptq {label}: damp must be a positive finite number, got {damp!r}")
    return n, k


def _inverse_cholesky(hessian: Tensor, order: Tensor | None, damp: float, label: str) -> tuple[Tensor, float]:
    """``U`` upper triangular with ``U^T U = (H + damp * mean(diag H) * I)^-1`` (fp32), H in processing order.

    Retries with ten times the damping while the factorization fails, up to `MAX_DAMP`.
    """
    k = hessian.shape[0]
    reverse = (torch.arange(k, device=hessian.device) if order is None else order).flip(0)
    while True:
        u = _try_inverse_cholesky(hessian, reverse, damp)
        if u is not None:
            return u, damp
        if damp * 10 > MAX_DAMP * (1 + 1e-9):
            raise ValueError(f"gptq {label}: the Hessian is not positive definite even with damp {damp:g} "
                             f"(Cholesky failed); check the calibration statistics of this layer")
        logger.warning("gptq %s: Cholesky of the damped Hessian failed with damp %g; retrying with damp %g",
                       label, damp, damp * 10)
        damp *= 10


def _try_inverse_cholesky(hessian: Tensor, reverse: Tensor, damp: float) -> Tensor | None:
    """`_inverse_cholesky` for one damping, or None if the factorization fails. At most two K x K at a time."""
    m = _gathered(hessian, reverse)  # J H J (in processing order): a fresh fp32 working copy
    diag = m.diagonal()
    diag.masked_fill_(diag == 0, 1.0)  # dead inputs
    diag.add_(damp * diag.mean())
    lower, info = torch.linalg.cholesky_ex(m)
    del m, diag
    if int(info) != 0 or not bool(torch.isfinite(lower.diagonal()).all()):
        return None
    inverse = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)  # L^-1, in place
    del lower
    if not bool(torch.isfinite(inverse).all()):
        return None
    return inverse.flip((0, 1))  # J L^-1 J: upper triangular, U^T U = H^-1


def _gathered(h: Tensor, index: Tensor) -> Tensor:
    """``h[index][:, index]`` as a new fp32 tensor, built a slab of rows at a time (no second K x K temporary)."""
    k = index.numel()
    out = torch.empty(k, k, dtype=torch.float32, device=h.device)
    for r0 in range(0, k, _TILE):
        out[r0:r0 + _TILE] = h.index_select(0, index[r0:r0 + _TILE]).index_select(1, index)
    return out


def _decode(fmt: Format, enc: Encoded) -> Tensor:
    """``fmt.decode(enc)`` a slab of rows at a time: the formats' torch decode holds several full-size temporaries."""
    n = enc.shape[0]
    out = torch.empty(enc.shape, dtype=enc.dtype, device=enc.codes.device)
    for r0 in range(0, n, _TILE):
        r1 = min(r0 + _TILE, n)
        meta = {key: value[r0:r1] for key, value in enc.meta.items()}  # every meta tensor has one entry per row
        rows = Encoded(enc.format, enc.codes[r0:r1], meta, (r1 - r0, enc.shape[1]), enc.dim, enc.dtype)
        out[r0:r1] = fmt.decode(rows)
    return out


def _quadratic_form(a: Tensor, h: Tensor) -> float:
    """``tr(a h a^T)`` for a symmetric ``h``, in fp32 products summed in fp64.

    Only the blocks on and above h's diagonal are multiplied (the ones above count twice): about half
    the work of ``a @ h``.
    """
    k = h.shape[0]
    total = 0.0
    for c0 in range(0, k, _TILE):
        c1 = min(c0 + _TILE, k)
        hc = h[:c1, c0:c1].float()
        part = a[:, c0:c1] @ hc[c0:]
        if c0:
            part.addmm_(a[:, :c0], hc[:c0], alpha=2)
        total += float(torch.sum(part * a[:, c0:c1], dtype=torch.float64))
    return total


def _relative(numerator: float, denominator: float) -> float:
    """numerator / denominator; 0 when both are 0 (no output at all), inf when only the denominator is."""
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf


def _db(ratio: float) -> float:
    return 10 * math.log10(ratio) if ratio > 0 else -math.inf
