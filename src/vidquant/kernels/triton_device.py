"""Triton device code for `triton_quant`: the kernels, their building blocks, and the lazy build.

Triton is imported at first use (`_triton`), not at import: the interpreter flag is read when ``triton.jit``
wraps a function, so the kernels below are plain functions that `_triton` wraps then, in this module's namespace
(callers reach them as attributes of this module, after `_triton()`).

Exactness rules the kernels follow (they are why the results are bit-exact, not merely close):
powers of two are built from exponent bits (`_pow2`), round-to-nearest-even is the ``(v + 2^23) - 2^23`` trick
(no libdevice, so no flush-to-zero), fp32 -> bf16 rounding is done on the bits (the interpreter's cast
truncates), true divisions use ``tl.math.div_rn`` (``/`` is ``div.full.f32``, not IEEE, on NVIDIA), dots on
fp32 operands use ``input_precision="ieee"`` (not TF32), and fp contraction is switched off at launch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

tl: Any = None  # triton.language, bound by `_triton()` at first use (the kernels below read it as a global)
_max_combine: Any = None  # the combine function of `_max`, bound by `_triton()`

FLOAT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # KIND constexpr of the kernels
HIF4_UNIT = 64
HIF4_UNIT_BYTES = 36


@dataclass(frozen=True)
class KernelSpec:
    """How the kernels see one format: FMT id (0 HiF4, 1 MX, 2 NVFP4, 3 HiF8) and its constants."""

    fmt: int
    block: int
    emax: int = 0  # MX: exponent of the element's largest binade (E2M1: 2)
    away: bool = False  # MX: ties away from zero (the challenge simulator)
    saturate: bool = True  # HiF8: overflow to +-32768 (else +-Inf)
    tensor_scale: bool = False  # NVFP4: the fp32 per-tensor scale g
    bf16_exact: bool = True  # every value of the format is a bf16 value (decode loses nothing in bf16)


SPECS = {
    "hif4": KernelSpec(0, 64),
    "mxfp4": KernelSpec(1, 32, emax=2),
    "mxfp4_sim": KernelSpec(1, 32, emax=2, away=True),
    "nvfp4": KernelSpec(2, 16, tensor_scale=True, bf16_exact=False),
    "nvfp4_sim": KernelSpec(2, 16, bf16_exact=False),
    "hif8": KernelSpec(3, 1),
    "hif8_inf": KernelSpec(3, 1, saturate=False),
}


# ---- device code: plain functions, wrapped by triton.jit in `_triton()` -----------------------------------------
def _pow2(e):
    """2^e as fp32 for an int32 tensor ``e`` in [-126, 127], from the exponent bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


def _exponent(a):
    """floor(log2 a) for normal fp32 ``a`` >= 0 (-127 for zeros and subnormals), off the exponent bits."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


def _rint(v):
    """Round to nearest integer, ties to even, for 0 <= v < 2^22: (v + 2^23) - 2^23 rounds exactly once."""
    return (v + 8388608.0) - 8388608.0


def _max(x, AXIS: tl.constexpr):
    """Max over ``AXIS`` (NaN-free fp32 / int32 input): ``tl.reduce`` with the combine function ``tl.max`` uses.

    Not ``tl.max`` itself: it is a ``@triton.jit`` library function, wrapped for the interpreter or not when
    triton was imported, and an interpreted kernel cannot call a compiled one (diffusers/torch may import
    triton before TRITON_INTERPRET is set). The interpreter reduces with this combine function in numpy.
    """
    return tl.reduce(x, AXIS, _max_combine)


def _max_combine_fallback(a, b):
    """The combine function for `_max` where triton's library lacks ``_elementwise_max`` (slow in the interpreter)."""
    return tl.maximum(a, b)


def _negative(x):
    """The sign bits of fp32 ``x`` (True for -0 too, as torch.signbit)."""
    return x.to(tl.int32, bitcast=True) < 0


def _bf16_bits(v):
    """bf16 bits (low 16 bits of an int32) of fp32 ``v``: round to nearest even, NaN stays NaN (as Tensor.to)."""
    b = v.to(tl.int32, bitcast=True)
    rounded = (b + (0x7FFF + ((b >> 16) & 1))) >> 16
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, (b >> 16) | 0x40, rounded) & 0xFFFF


def _bf16(v):
    """fp32 ``v`` rounded to the nearest bf16 (ties to even), as fp32."""
    return (_bf16_bits(v) << 16).to(tl.float32, bitcast=True)


def _load(ptr, offs, mask, KIND: tl.constexpr):
    """fp32 values of a float tensor (KIND 0 fp32, 1 bf16 passed as int16 bits, 2 fp16); masked lanes read 0."""
    if KIND == 1:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


def _store(ptr, offs, v, mask, KIND: tl.constexpr):
    """Store fp32 ``v`` into a KIND tensor, rounding to nearest even as ``Tensor.to`` does."""
    if KIND == 1:
        tl.store(ptr + offs, _bf16_bits(v).to(tl.int16), mask=mask)
    elif KIND == 2:
        tl.store(ptr + offs, v.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, v, mask=mask)


def _as_dtype(v, KIND: tl.constexpr):
    """fp32 ``v`` as the KIND dtype holds it (rounded to nearest even), back in fp32."""
    if KIND == 1:
        return _bf16(v)
    elif KIND == 2:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


def _round_grid(a, MAN: tl.constexpr, MIN_EXP: tl.constexpr, MAXV: tl.constexpr, AWAY: tl.constexpr):
    """`minifloat.round_to_minifloat` of magnitudes ``a`` (finite, >= 0): RNE (or floor(v + 0.5)), saturating.

    ``a * 2^(MAN - e)`` is exact (e >= floor(log2 a)), so the grid rounding is the only rounding.
    """
    e = tl.maximum(_exponent(a), MIN_EXP)
    scaled = a * _pow2(MAN - e)
    r = tl.floor(scaled + 0.5) if AWAY else _rint(scaled)
    return tl.minimum(r * _pow2(e - MAN), MAXV)


def _hif4_encode(x, NU: tl.constexpr):
    """HiF4 steps 1-7 on ``NU`` units ``x`` (NU, 64) fp32: integer elements and unit scales.

    Returns ``mag`` (NU, 64) int32 = c * 2^(Eb + Ec) in 0..28 and ``q4`` (NU,) = s / 4 (NaN for a unit holding a
    NaN); the value of element i is +-mag * q4, signed by the sign bit of x (see hif4_int.py for why that is exact).
    ``r = bf16(1/s)`` is bf16(1/(1 + m/4)) * 2^-e for s = (1 + m/4) * 2^e: a 4-entry table, no division.
    """
    nan = x != x
    bad = _max(nan.to(tl.int32), 1) > 0
    a = tl.where(nan, 0.0, tl.abs(x))
    a3 = tl.reshape(a, (NU, 16, 4))
    m4 = _max(a3, 2)
    m8 = _max(tl.reshape(m4, (NU, 8, 2)), 2)
    m64 = _max(m8, 1)
    sf = _bf16(tl.minimum(tl.maximum(m64 * 0.142578125, 3.552713678800501e-15), 49152.0))  # step 2 (2^-48 floor)
    e = _exponent(sf)
    q = _rint(sf * _pow2(2 - e)).to(tl.int32)  # step 3: 4..8 (8: carry into the next binade)
    carry = q == 8
    q = tl.where(carry, 4, q)
    e = tl.where(carry, e + 1, e)
    m = q - 4
    recip = tl.where(m == 0, 1.0, tl.where(m == 1, 0.80078125, tl.where(m == 2, 0.66796875, 0.5703125)))
    r = recip * _pow2(-e)  # step 4
    eb = (m8 * r[:, None] >= 4.0).to(tl.int32)  # step 5
    eb16 = tl.reshape(tl.broadcast_to(eb[:, :, None], (NU, 8, 2)), (NU, 16))
    ec = ((m4 * r[:, None]) * _pow2(-eb16) >= 2.0).to(tl.int32)  # step 6
    p = eb16 + ec
    t = (a3 * _pow2(-p)[:, :, None]) * r[:, None, None]  # step 7
    c = tl.minimum(tl.floor(4.0 * t + 0.5), 7.0).to(tl.int32)
    mag = tl.reshape(c << p[:, :, None], (NU, 64))
    q4 = tl.where(bad, float("nan"), q.to(tl.float32) * _pow2(e - 4))
    return mag, q4


def _hif4_qdq(x, NU: tl.constexpr):
    """HiF4 quantize_dequantize of (NU, 64) fp32: step 8 is +-mag * (s/4), exact (= ((c/4) * 2^p) * s)."""
    mag, q4 = _hif4_encode(x, NU)
    v = mag.to(tl.float32) * q4[:, None]
    return tl.where(_negative(x), -v, v)


def _mx_qdq(x, EMAX: tl.constexpr, AWAY: tl.constexpr):
    """MX E2M1 quantize_dequantize of blocks ``x`` (NB, 32): X = 2^(floor(log2 amax) - EMAX) clamped to E8M0.

    ``x * 2^-e`` equals ``x / X`` (one rounding of the same quotient); a block holding Inf/NaN becomes NaN.
    """
    a = tl.abs(x)
    am = _max(tl.where(a != a, float("inf"), a), 1)
    bad = am == float("inf")
    e = tl.minimum(tl.maximum(_exponent(am) - EMAX, -127), 127)
    inv = _pow2(-e)
    scale = tl.where(e > -127, (e + 127) << 23, 1 << 22).to(tl.float32, bitcast=True)  # E8M0 code 0: 2^-127
    q = _round_grid(tl.abs(x * inv[:, None]), 1, 0, 6.0, AWAY)
    out = tl.where(_negative(x), -q, q) * scale[:, None]
    return tl.where(bad[:, None], float("nan"), out)


def _nvfp4_qdq(x, g):
    """NVFP4 quantize_dequantize of blocks ``x`` (NB, 16) (finite) under the fp32 tensor scale ``g``.

    b = E4M3_RNE(amax / 6 / g), s = b * g, q = E2M1_RNE(x / s) (0 where s is 0), q * s, as nvfp4.py.
    """
    am = _max(tl.abs(x), 1)
    b = _round_grid(tl.math.div_rn(tl.math.div_rn(am, 6.0), g), 3, -6, 448.0, False)
    s = b * g
    safe = tl.where(s > 0, s, 1.0)
    q = _round_grid(tl.abs(tl.math.div_rn(x, safe[:, None])), 1, 0, 6.0, False)
    return tl.where(_negative(x), -q, q) * s[:, None]


def _hif8_qdq(x, SAT: tl.constexpr):
    """HiF8 quantize_dequantize (formats.md Conversion 1-4): tapered mantissa width, ties away, no -0."""
    a = tl.abs(x)
    e = tl.minimum(tl.maximum(_exponent(tl.maximum(a, 1.1920928955078125e-07)), -22), 15)  # clamp(a, 2^-23)
    ae = tl.abs(e)
    mw = (ae <= 3).to(tl.int32) + (ae <= 7).to(tl.int32) + (ae <= 15).to(tl.int32)
    q = tl.floor(a * _pow2(mw - e) + 0.5) * _pow2(e - mw)
    q = tl.where(a >= 40960.0, 32768.0 if SAT else float("inf"), q)  # saturate, or the Inf code
    q = tl.where(a < 1.1920928955078125e-07, 0.0, q)
    q = tl.where((x < 0) & (q > 0), -q, q)
    return tl.where(x != x, float("nan"), q)


def _qdq_tile(x, R: tl.constexpr, C: tl.constexpr, FMT: tl.constexpr, BLOCK: tl.constexpr, EMAX: tl.constexpr,
              AWAY: tl.constexpr, SAT: tl.constexpr, g):
    """Quantize-dequantize a (R, C) fp32 tile whose rows start on block boundaries (C a multiple of BLOCK)."""
    if FMT == 0:
        y = tl.reshape(_hif4_qdq(tl.reshape(x, (R * C // 64, 64)), R * C // 64), (R, C))
    elif FMT == 1:
        y = tl.reshape(_mx_qdq(tl.reshape(x, (R * C // 32, 32)), EMAX, AWAY), (R, C))
    elif FMT == 2:
        y = tl.reshape(_nvfp4_qdq(tl.reshape(x, (R * C // 16, 16)), g), (R, C))
    else:
        y = _hif8_qdq(x, SAT)
    return y


def _qdq_kernel(x_ptr, y_ptr, g_ptr, R, K, FMT: tl.constexpr, BLOCK: tl.constexpr, EMAX: tl.constexpr,
                AWAY: tl.constexpr, SAT: tl.constexpr, KIND: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """One program per (BR rows, BK columns) tile of contiguous rows (R, K); BK is a multiple of the block."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = _load(x_ptr, offs, mask, KIND)  # the tail reads zeros: the zero padding of encode
    g = tl.load(g_ptr) if FMT == 2 else 1.0
    _store(y_ptr, offs, _qdq_tile(x, BR, BK, FMT, BLOCK, EMAX, AWAY, SAT, g), mask, KIND)


def _hif4_weight(w_ptr, rn, N, unit, U):
    """Unit ``unit`` of packed HiF4 rows ``rn`` as (64, BN) integers: mag = c * 2^(Eb+Ec), the sign, and s/4 (BN,).

    Layout (hif4.py `_pack_rows`): per unit 32 element bytes (low nibble = even element; bit 3 sign, bits 2:0 c),
    then [E6M2 scale, Eb mask, Ec low byte, Ec high byte], bits LSB first.
    """
    j = tl.arange(0, 64)[:, None]
    ok = rn < N
    base = (rn.to(tl.int64) * U + unit) * 36  # (BN,)
    byte = tl.load(w_ptr + base[None, :] + (j >> 1), mask=ok[None, :], other=0).to(tl.int32)
    code = (byte >> ((j & 1) * 4)) & 15
    scale = tl.load(w_ptr + base + 32, mask=ok, other=0).to(tl.int32)
    eb = tl.load(w_ptr + base + 33, mask=ok, other=0).to(tl.int32)
    ec = tl.load(w_ptr + base + 34, mask=ok, other=0).to(tl.int32)
    ec = ec | (tl.load(w_ptr + base + 35, mask=ok, other=0).to(tl.int32) << 8)
    p = ((eb[None, :] >> (j >> 3)) & 1) + ((ec[None, :] >> (j >> 2)) & 1)
    mag = (code & 7) << p
    q4 = ((scale & 3) + 4).to(tl.float32) * _pow2((scale >> 2) - 52)  # s/4 = (4 + m) * 2^(e - 52)
    return mag, (code & 8) != 0, tl.where(scale == 255, float("nan"), q4)


def _weight_tile(w_ptr, lut_ptr, lut2_ptr, gw, rn, N, k0, K, KP, WFMT: tl.constexpr):
    """Rows ``rn`` of the packed weight, columns k0..k0+63, dequantized as `Format.decode` does: (64, BN) fp32."""
    j = tl.arange(0, 64)[:, None]
    k = k0 + j
    ok = (rn[None, :] < N) & (k < K)
    n = rn[None, :].to(tl.int64)
    if WFMT == 0:
        mag, neg, q4 = _hif4_weight(w_ptr, rn, N, k0 // 64, KP // 64)
        w = mag.to(tl.float32) * q4[None, :]
        w = tl.where(neg, -w, w)
    elif WFMT == 1:  # MX E2M1: per 32 values 16 element bytes + the E8M0 byte
        base = (n * (KP // 32) + (k >> 5)) * 17
        byte = tl.load(w_ptr + base + ((k & 31) >> 1), mask=ok, other=0).to(tl.int32)
        element = tl.load(lut_ptr + ((byte >> ((k & 1) * 4)) & 15))
        sbyte = tl.load(w_ptr + base + 16, mask=ok, other=0).to(tl.int32)
        scale = tl.where(sbyte == 0, 1 << 22, sbyte << 23).to(tl.float32, bitcast=True)
        w = element * tl.where(sbyte == 255, float("nan"), scale)
    elif WFMT == 2:  # NVFP4: per 16 values 8 element bytes + the UE4M3 byte; s = b * g
        base = (n * (KP // 16) + (k >> 4)) * 9
        byte = tl.load(w_ptr + base + ((k & 15) >> 1), mask=ok, other=0).to(tl.int32)
        element = tl.load(lut_ptr + ((byte >> ((k & 1) * 4)) & 15))
        sbyte = tl.load(w_ptr + base + 8, mask=ok, other=0).to(tl.int32)
        w = element * (tl.load(lut2_ptr + sbyte) * gw)
    else:  # HiF8: one byte per value
        w = tl.load(lut_ptr + tl.load(w_ptr + n * K + k, mask=ok, other=0).to(tl.int32))
    return tl.where(ok, w, 0.0)


def _linear_kernel(x_ptr, w_ptr, lut_ptr, lut2_ptr, gw_ptr, gx_ptr, out_ptr, M, N, K, KP,
                   WFMT: tl.constexpr, AFMT: tl.constexpr, A_BLOCK: tl.constexpr, A_EMAX: tl.constexpr,
                   A_AWAY: tl.constexpr, A_SAT: tl.constexpr, KIND: tl.constexpr, OUT_KIND: tl.constexpr,
                   DOT_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out = x @ W^T for x (M, K) and a packed weight W (N, K), K walked 64 at a time (one HiF4 unit, two MX or four
    NVFP4 blocks); AFMT >= 0 also quantize-dequantizes each x tile (per token) before the dot."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    gw = tl.load(gw_ptr)
    gx = tl.load(gx_ptr) if AFMT == 2 else 1.0
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, 64):
        cols = k0 + tl.arange(0, 64)
        xmask = (rm[:, None] < M) & (cols[None, :] < K)
        x = _load(x_ptr, rm[:, None].to(tl.int64) * K + cols[None, :], xmask, KIND)
        if AFMT >= 0:
            x = _as_dtype(_qdq_tile(x, BM, 64, AFMT, A_BLOCK, A_EMAX, A_AWAY, A_SAT, gx), KIND)
        w = _weight_tile(w_ptr, lut_ptr, lut2_ptr, gw, rn, N, k0, K, KP, WFMT)
        if DOT_BF16:  # exact: both operands are bf16 values (the wrapper checks), products exact in fp32
            acc = tl.dot(x.to(tl.bfloat16), w.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(x, w, acc, input_precision="ieee")
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    _store(out_ptr, rm[:, None].to(tl.int64) * N + rn[None, :], acc, omask, OUT_KIND)


def _hif4_int_kernel(x_ptr, w_ptr, out_ptr, dots_ptr, M, N, K, U, KIND: tl.constexpr, OUT_KIND: tl.constexpr,
                     STORE_DOTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """HiF4 W4A4 on integers: per unit, x encoded to int8 here, W unpacked to int8, an exact int32 dot, then
    ``acc += (dot * sx) * sw`` in fp32 (each term exact; hif4_int.py), units in order."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    for u in range(0, U):
        cols = u * 64 + tl.arange(0, 64)
        x = _load(x_ptr, rm[:, None].to(tl.int64) * K + cols[None, :], (rm[:, None] < M) & (cols[None, :] < K), KIND)
        xmag, sx = _hif4_encode(x, BM)
        xi = tl.where(_negative(x), -xmag, xmag).to(tl.int8)
        wmag, wneg, sw = _hif4_weight(w_ptr, rn, N, u, U)
        wi = tl.where(wneg, -wmag, wmag).to(tl.int8)
        d = tl.dot(xi, wi, out_dtype=tl.int32)
        if STORE_DOTS:
            tl.store(dots_ptr + (u * M + rm[:, None]).to(tl.int64) * N + rn[None, :], d, mask=omask)
        acc += (d.to(tl.float32) * sx[:, None]) * sw[None, :]
    _store(out_ptr, rm[:, None].to(tl.int64) * N + rn[None, :], acc, omask, OUT_KIND)


_JIT = (
    "_pow2", "_exponent", "_rint", "_max", "_max_combine_fallback", "_negative", "_bf16_bits", "_bf16", "_load",
    "_store", "_as_dtype", "_round_grid", "_hif4_encode", "_hif4_qdq", "_mx_qdq", "_nvfp4_qdq", "_hif8_qdq",
    "_qdq_tile", "_qdq_kernel", "_hif4_weight", "_weight_tile", "_linear_kernel", "_hif4_int_kernel",
)


class JitOnce:
    """``triton`` after wrapping a module's plain device functions with ``triton.jit`` in its namespace, once.

    Why not at import: the interpreter flag (TRITON_INTERPRET) is read when ``triton.jit`` wraps a function, and
    triton is optional. Binds ``tl`` in the namespace first; ``then(namespace, language)`` binds anything else.
    """

    def __init__(self, namespace: dict[str, Any], names: tuple[str, ...], what: str,
                 then: Callable[[dict[str, Any], Any], None] | None = None) -> None:
        self.namespace, self.names, self.what, self.then = namespace, names, what, then
        self._lock = threading.Lock()
        self._triton: Any = None

    def __call__(self) -> Any:
        with self._lock:
            if self._triton is None:
                triton, language = import_triton()
                self.namespace["tl"] = language
                for name in self.names:
                    self.namespace[name] = triton.jit(self.namespace[name])
                if self.then is not None:
                    self.then(self.namespace, language)
                log.debug("triton %s %s ready (interpreter: %s)", triton.__version__, self.what, interpreting())
                self._triton = triton
            return self._triton


def _bind_max_combine(namespace: dict[str, Any], language: Any) -> None:
    namespace["_max_combine"] = getattr(language.standard, "_elementwise_max", namespace["_max_combine_fallback"])


_triton = JitOnce(globals(), _JIT, "kernels", _bind_max_combine)


def import_triton() -> tuple[Any, Any]:
    """``triton`` and ``triton.language``, or the one error that says how to get them."""
    try:
        import triton
        import triton.language as language
    except ImportError as err:
        raise RuntimeError("vidquant.kernels needs triton>=3 for CUDA tensors or TRITON_INTERPRET=1: "
                           "pip install 'triton>=3' (the 'gpu' extra)") from err
    return triton, language


def available() -> bool:
    """Whether triton can be imported (the kernels need it; the torch fallback does not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def uses_kernel(t: Tensor) -> bool:
    """Whether the functions here run a Triton kernel for ``t`` (CUDA, or the interpreter) or the torch fallback."""
    return t.is_cuda or interpreting()
