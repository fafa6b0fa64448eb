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

Where this differs from the reference loop (IST-DASLab's ``gptq.py``, and llm-compressor after it): there a
group's scale comes from ``W[:, i:i + groupsize]``, the full matrix, which holds the lazy updates of the
earlier ``block_size`` batches but not the in-block updates of the current one (those go to the batch's
copy ``W1``). Here `enter` reads ``wt[i:i + fb]``, the working columns themselves, so a format block's
metadata (HiF4's scale and sub-block exponents, the INT/MX/NVFP4 scales) is taken *after* the in-block
updates of the earlier columns of its batch. It is the better-informed reading (the metadata sees the
errors the block will have to absorb), and it is not the reference's: measured against the reference on
the same correlated layer and grid, about +0.3 dB output SQNR for HiF4 (INT4: the same error within 0.02 dB).

Few calibration tokens: with fewer tokens than inputs the Hessian is singular and GPTQ fits it, making the
calibration error 7-10 dB better than RTN and the held-out output error *worse* at ``damp=0.01``. So
`gptq_held_out` runs GPTQ over a small grid of dampings, scores each (and RTN) on held-out rows that were
not in the Hessian (Eq. (2)'s objective ``||(W - Q) X^T||^2`` with X the held-out rows) and keeps the best,
RTN included. Its own error evaluation (``evaluate``: two K x K quadratic forms and an RTN pass, most of
the time at 13824 x 5120) is then not needed, and `gptq_held_out` switches it off.
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

from .fidelity import output_energy, row_output_energy

logger = logging.getLogger(__name__)

MAX_DAMP = 10.0  # the largest relative damping the Cholesky retries go up to
_TILE = 1024  # columns per slab when gathering or reducing K x K matrices


@dataclass(frozen=True)
class GPTQResult:
    """What `gptq` returns; the errors are relative output errors ``tr(dW H dW^T) / tr(W H W^T)``."""

    encoded: Encoded  # the quantized weight (pack it with fmt.pack)
    weight: Tensor  # fmt.decode(encoded): the dequantized weight (N, K) in the requested dtype
    error: float | None  # relative output error of `weight` (float64 arithmetic); None: not evaluated
    rtn_error: float | None  # the same for plain round-to-nearest, fmt.quantize_dequantize(W); None: not evaluated
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
    evaluate: bool = True,
) -> GPTQResult:
    """Quantize ``weight`` (N, K) to ``fmt`` with GPTQ under the Hessian ``hessian`` (K, K).

    ``hessian`` is the sum or mean of ``x^T x`` over calibration tokens (symmetric, fp32 or fp64); it is
    not modified. Dead inputs (``H_ii == 0``) get ``H_ii = 1`` in the working copy: their weight columns
    are still quantized, just without error propagation. The damping is ``damp * mean(diag H)`` on the
    diagonal; if the Cholesky factorization fails it is retried with ``damp`` x10 up to `MAX_DAMP` (a
    WARNING each time), then a ValueError. ``block_size`` (the lazy-update batch) must be a multiple of
    the format's block size unless one format block covers the whole row (per-channel formats).
    ``dtype`` is the dtype of the returned weight and encoding (default: ``weight.dtype``); the work is
    done in fp32. ``name`` (the layer's name) labels the log lines and errors. ``evaluate=False`` skips
    the calibration errors (``error`` and ``rtn_error`` are None): two K x K quadratic forms and an RTN
    pass, 38 of 50 s at 13824 x 5120, that a caller judging on held-out rows does not need.
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
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"gptq {label}: the quantized weight is not finite; the Hessian is too ill-conditioned")
    error = rtn_error = None
    if evaluate:
        reference = _quadratic_form(w0, hessian)
        error = _relative(_quadratic_form(out.to(torch.float32, copy=True).sub_(w0), hessian), reference)
        rtn = fmt.quantize_dequantize(weight.detach()).to(torch.float32, copy=True).sub_(w0)
        rtn_error = _relative(_quadratic_form(rtn, hessian), reference)
        del rtn
        if not math.isfinite(error):
            raise ValueError(f"gptq {label}: the output error is not finite ({error}); the Hessian is too "
                             "ill-conditioned")
    end = time.perf_counter()
    errors = f"output error {_db(error):.2f} dB (RTN {_db(rtn_error):.2f} dB)" if evaluate else "not evaluated"
    logger.info("gptq %s: %s %dx%d, %s, damp %g%s; %.1f s (Hessian %.1f, columns %.1f, errors %.1f)", label,
                fmt.name, n, k, errors, used_damp, ", act_order" if act_order else "", end - start,
                factorized - start, rounded - factorized, end - rounded)
    return GPTQResult(encoded, out, error, rtn_error, used_damp)


DAMP_GRID = (0.01, 0.1, 1.0)  # `gptq_held_out`'s default grid: the reference default, and 10x / 100x
SIGNIFICANCE_Z = 1.0  # GPTQ must beat RTN on held-out rows by this many standard errors of the paired difference
# fewer held-out rows than this cannot tell GPTQ from RTN (synthetic 256-wide layers, 64-240 tokens: with 8 rows
# one draw in 40 kept a GPTQ 0.8 dB worse than RTN on fresh rows; with 16-30, none in 40): RTN is kept
MIN_HELD_OUT_ROWS = 16


@dataclass(frozen=True)
class HeldOutChoice:
    """What `gptq_held_out` keeps: GPTQ at the best damping, or RTN, by the output error on held-out rows."""

    encoded: Encoded  # the kept quantized weight
    weight: Tensor  # its dequantized (N, K), in the requested dtype
    method: str  # "gptq" or "rtn"
    damp: float | None  # the damping of the kept GPTQ (None: RTN kept)
    errors: dict[str, float]  # held-out relative output error per candidate: "rtn", "damp=0.01", ...
    info: str  # one line for the state's manifest and the log

    @property
    def gain_db(self) -> float:
        """How much lower (dB) the kept candidate's held-out error is than RTN's (0 when RTN is kept)."""
        kept = self.errors["rtn" if self.damp is None else _damp_label(self.damp)]
        return _db(self.errors["rtn"]) - _db(kept)


def gptq_held_out(
    weight: Tensor,
    hessian: Tensor,
    fmt: Format | str,
    held_out: Tensor,
    *,
    damps: tuple[float, ...] | list[float] = DAMP_GRID,
    keep_rtn: bool = True,
    block_size: int = 128,
    act_order: bool = False,
    dtype: torch.dtype | None = None,
    name: str = "",
) -> HeldOutChoice:
    """GPTQ with the damping chosen, and RTN kept where GPTQ does not beat it, on held-out rows.

    ``hessian`` must be built from calibration rows that exclude ``held_out`` (M, K), the layer inputs
    GPTQ's objective ``||(W - Q) X^T||^2`` (Frantar et al. Eq. (2)) is then measured on. Each damping of
    ``damps`` runs `gptq` (without its own evaluation); the candidate with the least held-out error is
    compared with RTN, which is kept (``keep_rtn``) unless there are at least `MIN_HELD_OUT_ROWS` held-out
    rows and GPTQ's per-row held-out errors are lower by more than `SIGNIFICANCE_Z` standard errors
    (`_beats`: a paired test, so that a handful of held-out rows cannot pick the fitted candidate by
    luck); ties among dampings go to the larger, less fitted one. ``keep_rtn=False``: the best damping
    is kept whatever RTN does (RTN still where every damping fails).
    Cost: one GPTQ per damping plus M x N x K multiply-adds per candidate for the held-out errors.
    """
    label = name or "<unnamed>"
    fmt = formats.get(fmt) if isinstance(fmt, str) else fmt
    if not damps:
        raise ValueError(f"gptq {label}: the damping grid is empty")
    if not isinstance(held_out, Tensor) or held_out.dim() != 2 or held_out.shape[1] != weight.shape[-1] \
            or held_out.shape[0] == 0:
        got = tuple(held_out.shape) if isinstance(held_out, Tensor) else type(held_out).__name__
        raise ValueError(f"gptq {label}: held_out must be (M >= 1, {weight.shape[-1]}) rows, got {got}")
    if not bool(torch.isfinite(held_out).all()):
        raise ValueError(f"gptq {label}: held_out rows contain Inf or NaN")
    dtype = weight.dtype if dtype is None else dtype
    w0 = weight.detach().float()
    x = held_out.to(w0.device, torch.float32)
    reference = output_energy(x, w0)

    def row_errors(q: Tensor) -> Tensor:
        return row_output_energy(x, q.float() - w0)

    rtn_encoded = fmt.encode(weight.detach().to(dtype))
    rtn_weight = fmt.decode(rtn_encoded)
    rtn_rows = row_errors(rtn_weight)
    errors = {"rtn": _relative(float(rtn_rows.sum()), reference)}
    best: tuple[float, str, Encoded, Tensor, float | None, Tensor] | None = None
    for damp in sorted(set(damps), reverse=True):  # ties to the larger damping
        try:
            result = gptq(weight, hessian, fmt, block_size=block_size, damp=damp, act_order=act_order,
                          dtype=dtype, name=name, evaluate=False)
        except ValueError as err:
            logger.warning("gptq %s: damp %g failed (%s); skipped", label, damp, err)
            continue
        key = _damp_label(result.damp)
        rows = row_errors(result.weight)
        errors[key] = _relative(float(rows.sum()), reference)
        if best is None or errors[key] < best[0]:
            best = (errors[key], key, result.encoded, result.weight, result.damp, rows)
        del result
    enough = x.shape[0] >= MIN_HELD_OUT_ROWS
    significant = best is not None and enough and _beats(best[5], rtn_rows)
    if best is None or (keep_rtn and not significant):
        kept, encoded, out, used = "rtn", rtn_encoded, rtn_weight, None
    else:
        _, kept, encoded, out, used, _ = best
    if best is None:
        info = "rtn (every gptq damping failed)"
    elif used is None:
        gain = _db(errors["rtn"]) - _db(best[0])
        why = "worse" if gain <= 0 else "not significantly better" if enough else \
            f"not judged: fewer than {MIN_HELD_OUT_ROWS} rows"
        info = f"rtn (gptq {why} on held-out: {gain:+.2f} dB at {best[1]}, {x.shape[0]} rows)"
    else:
        info = f"{kept} ({_db(errors['rtn']) - _db(errors[kept]):+.2f} dB over rtn on {x.shape[0]} held-out rows)"
    logger.info("gptq %s: %s; held-out errors %s", label, info,
                ", ".join(f"{k} {_db(v):.2f} dB" for k, v in errors.items()))
    return HeldOutChoice(encoded, out, "rtn" if used is None else "gptq", used, errors, info)


def _beats(candidate: Tensor, rtn: Tensor, z: float = SIGNIFICANCE_Z) -> bool:
    """Whether the per-row held-out errors of ``candidate`` are below RTN's by more than ``z`` standard errors.

    A paired test: ``d = candidate - rtn`` per held-out row; GPTQ is kept when ``mean(d) + z * std(d) /
    sqrt(M) < 0``. With few, heavy-tailed held-out rows a small mean gain is noise, and RTN (nothing
    fitted) is the safer choice; with hundreds of rows any real gain passes.
    """
    d = candidate - rtn
    m = d.numel()
    spread = float(d.std()) / math.sqrt(m) if m > 1 else math.inf
    return float(d.mean()) + z * spread < 0


def _damp_label(damp: float) -> str:
    return f"damp={damp:g}"


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


def _db(ratio: float | None) -> float:
    if ratio is None or math.isnan(ratio):
        return math.nan
    return 10 * math.log10(ratio) if ratio > 0 else -math.inf
