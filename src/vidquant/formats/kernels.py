"""The fused numba CPU kernels of the formats, and the building blocks they share.

Each building block is the scalar twin of a torch-ops helper (`minifloat.round_to_minifloat`, `pow2`, the
fp32 -> bf16/fp16 casts) and does the same fp32 operations in the same order, so the kernels agree with the
torch-ops path (the reference, and what other devices run) bit for bit. Kernels read and write the caller's
dtype directly, in one pass over memory: `kernel_array` shows bf16 as its uint16 bits, fp16 as its int16 bits
and fp32 as is, and the `load` / `store` overloads convert on the fly (the store rounds to nearest even, as
``Tensor.to`` does). A format file keeps the torch ops and its dispatch (`use_cpu_kernels`); its kernel lives
here because numba's on-disk cache (``cache=True``) is keyed on the kernel's own source file only: a kernel in
another file would keep running code compiled against an older version of these helpers.

Every kernel is compiled with ``error_model="numpy"``: fp32 division follows IEEE (no zero-division check,
which would also stop the loops from vectorising). Parallel tasks write disjoint outputs and nothing sums
across them, so results do not depend on the thread count.

Grids are passed as ``(man_bits, min_exp, max_value)`` tuples (`ElementGrid.kernel_grid`).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange
from numba.core import types
from numba.extending import overload
from torch import Tensor

SEGMENT = 4096  # values per parallel task of a block format's kernel: a few pages of a row
FP16_GRID = (10, -14, np.inf)  # fp16 as a minifloat grid: values past 65504 round to 2^16 and beyond (Inf)
FP16_MAX = 65504.0
_KERNEL_VIEW = {torch.bfloat16: (torch.int16, np.uint16), torch.float16: (torch.int16, np.int16),
                torch.float32: (torch.float32, np.float32)}

parallel_jit = numba.njit(parallel=True, cache=True, error_model="numpy")


def kernel_array(t: Tensor) -> np.ndarray:
    """The numpy view of a contiguous CPU float tensor that the kernels take (no copy).

    bf16 and fp16 both arrive as 16-bit integers; their numpy type (uint16 vs int16) tells `load` and
    `store` which one it is.
    """
    torch_view, np_view = _KERNEL_VIEW[t.dtype]
    return t.detach().view(torch_view).numpy().view(np_view)


def load(arr, i):  # pragma: no cover - replaced by the overload below inside numba
    """``arr[i]`` as fp32, exactly."""
    raise NotImplementedError


def store(arr, i, v):  # pragma: no cover - replaced by the overload below inside numba
    """``arr[i] = v`` for fp32 ``v``, rounded to nearest even into the array's dtype."""
    raise NotImplementedError


@overload(load)
def _load_impl(arr, i):
    if arr.dtype == types.uint16:
        return lambda arr, i: bf16_value(arr[i])
    if arr.dtype == types.int16:
        return lambda arr, i: fp16_value(arr[i])
    return lambda arr, i: arr[i]


@overload(store)
def _store_impl(arr, i, v):
    if arr.dtype == types.uint16:
        def store_bf16(arr, i, v):
            arr[i] = bf16_bits(v)

        return store_bf16
    if arr.dtype == types.int16:
        def store_fp16(arr, i, v):
            arr[i] = np.int16(fp16_bits(v))

        return store_fp16

    def store_fp32(arr, i, v):
        arr[i] = v

    return store_fp32


def store_exact(arr, i, v):  # pragma: no cover - replaced by the overload below inside numba
    """`store` for a ``v`` that bf16 holds exactly (HiF4, HiF8 values): a bf16 array keeps its top half."""
    raise NotImplementedError


@overload(store_exact)
def _store_exact_impl(arr, i, v):
    if arr.dtype == types.uint16:
        def store_top_half(arr, i, v):
            arr[i] = np.uint16(np.float32(v).view(np.uint32) >> np.uint32(16))

        return store_top_half
    return lambda arr, i, v: store(arr, i, v)


def abs_bits(arr, i):  # pragma: no cover - replaced by the overload below inside numba
    """The bits of ``|arr[i]|`` as a uint32 that orders like the magnitudes do (Inf above finite, NaN above Inf)."""
    raise NotImplementedError


def abs_value(arr, bits):  # pragma: no cover - replaced by the overload below inside numba
    """The fp32 magnitude whose `abs_bits` (for ``arr``'s dtype) are ``bits``."""
    raise NotImplementedError


@overload(abs_bits)
def _abs_bits_impl(arr, i):
    # numba widens integer arithmetic to 64 bits: the outer uint32 keeps the max (and its vector lanes) 32-bit
    if arr.dtype == types.uint16:
        return lambda arr, i: np.uint32(arr[i] & np.uint16(0x7FFF))
    if arr.dtype == types.int16:
        return lambda arr, i: np.uint32(arr[i] & np.int16(0x7FFF))
    return lambda arr, i: np.uint32(np.float32(arr[i]).view(np.uint32) & np.uint32(0x7FFFFFFF))


@overload(abs_value)
def _abs_value_impl(arr, bits):
    if arr.dtype == types.uint16:
        return lambda arr, bits: bf16_value(bits)
    if arr.dtype == types.int16:
        return lambda arr, bits: fp16_value(bits)
    return lambda arr, bits: np.uint32(bits).view(np.float32)


@numba.njit(inline="always")
def amax(x, start, stop):
    """max |x[start:stop]| as fp32; Inf or NaN when one is there (an empty range gives 0).

    An integer max over the magnitude bits: it vectorises (a float max does not without fast-math) and
    carries the Inf/NaN check with it.
    """
    m = np.uint32(0)
    for i in range(start, stop):
        m = max(m, abs_bits(x, i))
    return abs_value(x, m)


@numba.njit(inline="always")
def bf16_value(bits):
    """fp32 value of bf16 bits (exact)."""
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@numba.njit(inline="always")
def bf16_bits(v):
    """bf16 bits of fp32 ``v``: round to nearest even, overflow to Inf, NaN stays NaN (as ``Tensor.to``)."""
    b = np.float32(v).view(np.uint32)
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(inline="always")
def fp16_value(bits):
    """fp32 value of fp16 bits, exactly, without branches (so that loads vectorise).

    The magnitude bits shifted into fp32 position read as the value times 2^-112 (subnormals included), so
    one exact scaling by 2^112 finishes them; Inf/NaN get the all-ones exponent instead.
    """
    h = np.uint32(np.int32(bits) & 0xFFFF)
    shifted = np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13))
    finite = np.float32(np.uint32(shifted).view(np.float32) * pow2f(112)).view(np.uint32)
    mag = np.uint32(shifted | np.uint32(0x7F800000)) if shifted >= np.uint32(0x7C00 << 13) else finite
    return np.uint32(mag | ((h & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


@numba.njit(inline="always")
def fp16_bits(v):
    """fp16 bits (as uint16) of fp32 ``v``: round to nearest even, from 65520 on Inf, NaN stays NaN."""
    b = np.float32(v).view(np.uint32)
    sign = (b >> np.uint32(16)) & np.uint32(0x8000)
    a = b & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):
        return np.uint16(sign | np.uint32(0x7E00))
    if a >= np.uint32(0x477FF000):  # 65520, the midpoint between 65504 and 2^16
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below 2^-14: multiples of 2^-24 (the scaling is exact), 1024 = 2^-14
        return np.uint16(sign | np.uint32(np.rint(np.float32(np.uint32(a).view(np.float32) * pow2f(24)))))
    r = (a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    return np.uint16(sign | (r - np.uint32(112 << 10)))


@numba.njit(inline="always")
def pow2f(e):
    """2^e as fp32 for integer e in [-126, 127], from its bits (`minifloat.pow2`)."""
    return np.uint32((e + 127) << 23).view(np.float32)


@numba.njit(inline="always")
def exponent_field(a):
    """The biased exponent bits of fp32 ``a`` (0 for zeros and subnormals, 255 for Inf/NaN)."""
    return np.int32((np.float32(a).view(np.uint32) >> np.uint32(23)) & np.uint32(0xFF))


@numba.njit(inline="always")
def round_grid(a, man_bits, min_exp, max_value, away):
    """`minifloat.round_to_minifloat` of one fp32 magnitude ``a`` (>= 0, finite): E2M1, E4M3, E5M2, fp16.

    With ``e = max(floor(log2 a), min_exp)``: ``RNE(a * 2^(man_bits - e)) * 2^(e - man_bits)``, clamped at
    ``max_value``; ``away``: ties away from zero as ``floor(v + 0.5)`` in fp32 instead. The powers of two are
    built from the biased exponent bits in uint32 (so the loops vectorise 16 lanes wide); ``min_exp`` > -126
    and ``min_exp - man_bits`` >= -126, so fp32 subnormals (exponent bits 0) need no special case.
    """
    eb = np.uint32(max(np.uint32(np.float32(a).view(np.uint32) & np.uint32(0x7F800000)),
                       np.uint32((min_exp + 127) << 23)))  # (e + 127) << 23
    up = np.uint32(np.uint32((man_bits + 254) << 23) - eb).view(np.float32)  # 2^(man_bits - e)
    down = np.uint32(eb - np.uint32(man_bits << 23)).view(np.float32)  # 2^(e - man_bits)
    scaled = np.float32(a * up)
    r = np.floor(np.float32(scaled + np.float32(0.5))) if away else np.rint(scaled)
    return min(np.float32(np.float32(r) * down), np.float32(max_value))


@numba.njit(inline="always")
def is_finite(a):
    """``a`` (a magnitude) is neither Inf nor NaN."""
    return a < np.float32(np.inf)


@numba.njit(inline="always")
def segments(k, block):
    """How a block format's kernel splits rows of ``k`` values into parallel tasks of whole blocks.

    Returns (blocks per row, blocks per task, tasks per row); the tail block of a row is the short one.
    """
    blocks = (k + block - 1) // block
    per_task = max(1, SEGMENT // block)
    return blocks, per_task, (blocks + per_task - 1) // per_task


# ---- HiF4 (docs/formats.md steps 1-8, fused per 64-value unit) -----------------------------------------------
_HIF4_CHUNK = 64  # units per parallel task (amortizes the scratch buffers)


@parallel_jit
def hif4_qdq(src, dst, reciprocals, inv7, scale_min, scale_max):
    """HiF4 quantize_dequantize of rows ``src`` (R, K) into ``dst``, steps 1-8 per unit of 64 (hif4.py).

    ``reciprocals[m]`` = bf16(1 / (1 + m/4)): r = bf16(1/s) is that times 2^-e, exactly.
    """
    n_rows, k = src.shape
    units = (k + 63) // 64
    total = n_rows * units
    f0, half, four, two = np.float32(0), np.float32(0.5), np.float32(4), np.float32(2)
    for chunk in prange((total + _HIF4_CHUNK - 1) // _HIF4_CHUNK):
        m4 = np.empty(16, np.float32)
        g = np.empty(16, np.float32)  # per 4-element sub-block: 2^-(Eb+Ec) · r (step 7)
        h = np.empty(16, np.float32)  # per 4-element sub-block: 2^(Eb+Ec) · s / 4 (step 8)
        for job in range(chunk * _HIF4_CHUNK, min(total, (chunk + 1) * _HIF4_CHUNK)):
            row, start = job // units, (job % units) * 64
            n = min(64, k - start)
            x, y = src[row, start:start + n], dst[row, start:start + n]
            has_nan = False
            for j in range(16):  # step 1
                m = f0
                for i in range(4 * j, min(4 * j + 4, n)):
                    a = abs(load(x, i))
                    has_nan |= a != a
                    if a > m:
                        m = a
                m4[j] = m
            if has_nan:
                for i in range(n):
                    store(y, i, np.float32(np.nan))
                continue
            m64 = f0
            for j in range(16):
                m64 = max(m64, m4[j])
            sf = bf16_value(bf16_bits(min(max(np.float32(m64 * np.float32(inv7)), np.float32(scale_min)),
                                          np.float32(scale_max))))  # step 2
            e = exponent_field(sf) - 127
            q = np.int32(np.rint(sf * pow2f(2 - e)))  # step 3: 4..8
            if q == 8:
                q, e = 4, e + 1
            r = np.float32(reciprocals[q - 4]) * pow2f(-e)  # step 4
            for b in range(8):  # steps 5-6
                eb = 1 if max(m4[2 * b], m4[2 * b + 1]) * r >= four else 0
                for j in (2 * b, 2 * b + 1):
                    v = m4[j] * r
                    if eb:
                        v = v * half
                    p = eb + (1 if v >= two else 0)
                    g[j] = pow2f(-p) * r
                    h[j] = np.float32(q) * pow2f(e - 4 + p)
            for i in range(n):  # steps 7-8
                xv = load(x, i)
                c = np.int32(min(four * (abs(xv) * g[i >> 2]) + half, np.float32(7.5)))
                store_exact(y, i, np.float32(np.copysign(np.float32(c) * h[i >> 2], xv)))


# ---- MX (mx.py): an E8M0 scale per block ----------------------------------------------------------------------
@parallel_jit
def mx_qdq(src, dst, block, grid, emax, away):
    """MX quantize_dequantize of rows ``src`` (R, K) into ``dst``, block by block, as encode + decode compute it."""
    n_rows, k = src.shape
    blocks, per_task, row_tasks = segments(k, block)
    for task in prange(n_rows * row_tasks):
        row, first = task // row_tasks, task % row_tasks * per_task
        x, y = src[row], dst[row]
        for start in range(first * block, min(blocks, first + per_task) * block, block):
            n = min(block, k - start)
            _mx_block(x[start:start + n], y[start:start + n], n, grid, emax, away)


@numba.njit(inline="always")
def _mx_block(x, y, n, grid, emax, away):
    """One block: X = 2^(floor(log2 amax) - emax) clamped to E8M0, each ``x / X`` rounded, times X.

    Dividing by the power of two X is multiplying by 2^-e (both are the exact quotient rounded once), and
    ``q * X`` is exact (the products stay above 2^-149 and below the fp32 range). Inf/NaN: E8M0 NaN.
    """
    man_bits, min_exp, max_value = grid
    m = amax(x, 0, n)
    if not is_finite(m):
        for i in range(n):
            store(y, i, np.float32(np.nan))
        return
    e = min(max(exponent_field(m) - 127 - emax, -127), 127)
    inv = pow2f(-e)
    scale = pow2f(e) if e > -127 else np.uint32(1 << 22).view(np.float32)  # E8M0 code 0: 2^-127, subnormal
    for i in range(n):
        v = load(x, i)
        q = round_grid(abs(np.float32(v * inv)), man_bits, min_exp, max_value, away)
        store(y, i, np.float32(np.copysign(q, v) * scale))


# ---- NVFP4 (nvfp4.py): an E4M3 scale per block under an fp32 tensor scale -------------------------------------
@parallel_jit
def nvfp4_qdq(src, dst, block, tensor_scale, e2m1, e4m3):
    """NVFP4 quantize_dequantize of rows ``src`` (R, K) into ``dst``; False if ``src`` is not finite.

    Two passes: the row maxima (their max gives ``g``; a NaN or Inf stops it), then block by block.
    """
    n_rows, k = src.shape
    row_amax = np.empty(n_rows, np.float32)
    for row in prange(n_rows):
        row_amax[row] = amax(src[row], 0, k)
    top = np.float32(0)
    for row in range(n_rows):
        if not is_finite(row_amax[row]):
            return False
        top = max(top, row_amax[row])
    g = np.float32(1)
    if tensor_scale:
        g = np.float32(top / np.float32(6.0 * 448.0))
        if not g > 0:
            g = np.float32(1)
    blocks, per_task, row_tasks = segments(k, block)
    for task in prange(n_rows * row_tasks):
        row, first = task // row_tasks, task % row_tasks * per_task
        x, y = src[row], dst[row]
        for start in range(first * block, min(blocks, first + per_task) * block, block):
            n = min(block, k - start)
            _nvfp4_block(x[start:start + n], y[start:start + n], n, g, e2m1, e4m3)
    return True


@numba.njit(inline="always")
def _nvfp4_block(x, y, n, g, e2m1, e4m3):
    """One block: ``b = E4M3(amax / 6 / g)``, ``s = b * g``, ``q = E2M1(x / s)`` (+-0 where s is 0), ``q * s``
    (decoding's ``E4M3.value(code) * g`` is that same ``b * g``)."""
    raw = np.float32(np.float32(amax(x, 0, n) / np.float32(6)) / g)
    s = np.float32(round_grid(raw, e4m3[0], e4m3[1], e4m3[2], False) * g)
    if s > 0:
        for i in range(n):
            v = load(x, i)
            q = round_grid(abs(np.float32(v / s)), e2m1[0], e2m1[1], e2m1[2], False)
            store(y, i, np.float32(np.copysign(q, v) * s))
    else:
        for i in range(n):
            store(y, i, np.float32(np.copysign(np.float32(0), load(x, i)) * s))


# ---- FP8 (fp8.py): an fp32 scale per row ----------------------------------------------------------------------
@parallel_jit
def fp8_qdq(src, dst, grid):
    """FP8 quantize_dequantize of rows ``src`` (R, K) into ``dst``, a row at a time; False if one is not finite.

    ``scale = amax / max`` (1 where that is 0), ``q = RNE(x / scale)`` saturated, ``q * scale``.
    """
    man_bits, min_exp, max_value = grid
    n_rows, k = src.shape
    finite = np.ones(n_rows, np.bool_)
    for row in prange(n_rows):
        x, y = src[row], dst[row]
        m = amax(x, 0, k)
        finite[row] = is_finite(m)
        if not finite[row]:
            continue
        scale = np.float32(m / np.float32(max_value))
        if not scale > 0:
            scale = np.float32(1)
        for i in range(k):
            v = load(x, i)
            q = round_grid(abs(np.float32(v / scale)), man_bits, min_exp, max_value, False)
            store(y, i, np.float32(np.copysign(q, v) * scale))
    return finite.all()


# ---- INT (integer.py): an fp32 scale per row or an fp16 scale per group ---------------------------------------
@parallel_jit
def int_qdq(src, dst, group, qmax, fp16_scale, full_range=False):
    """INT quantize_dequantize of rows ``src`` (R, K) into ``dst`` for groups of ``group`` values (K: per row);
    ``full_range``: the two's-complement grid -qmax-1..qmax with ``s = amax / (qmax + 1/2)`` (``int4_g64_full``).

    False if a group is not finite or its fp16 scale overflows (the torch path then raises the error).
    """
    n_rows, k = src.shape
    groups, per_task, row_tasks = segments(k, group)
    ok = np.ones(n_rows * row_tasks, np.bool_)
    for task in prange(n_rows * row_tasks):
        row, first = task // row_tasks, task % row_tasks * per_task
        x, y = src[row], dst[row]
        for start in range(first * group, min(groups, first + per_task) * group, group):
            n = min(group, k - start)
            ok[task] = ok[task] and _int_group(x[start:start + n], y[start:start + n], n, qmax, fp16_scale,
                                               full_range)
    return ok.all()


@numba.njit(inline="always")
def _int_group(x, y, n, qmax, fp16_scale, full_range):
    """One group: ``s = amax / qmax`` (``/ (qmax + 1/2)`` full-range; rounded to fp16 for groups: the stored scale is
    the one divided by), ``q = RNE(x / s)`` clamped to +-qmax (-qmax-1..qmax full-range; 0 where s is 0),
    ``q * s``; False if it cannot be encoded."""
    m = amax(x, 0, n)
    s = np.float32(m / np.float32(qmax + 0.5 if full_range else qmax))
    if fp16_scale:
        s = round_grid(s, FP16_GRID[0], FP16_GRID[1], FP16_GRID[2], False)
    if not (is_finite(m) and s <= np.float32(FP16_MAX if fp16_scale else np.inf)):
        return False
    lo, hi = np.float32(-qmax - 1 if full_range else -qmax), np.float32(qmax)
    if s > 0:
        for i in range(n):
            q = min(max(np.rint(np.float32(load(x, i) / s)), lo), hi)
            store(y, i, np.float32(np.float32(q + np.float32(0)) * s))  # + 0: -0 has the code of 0
    else:
        for i in range(n):
            store(y, i, np.float32(0))
    return True


# ---- decode: codes through a table, times a per-block scale ------------------------------------------------------
def check_layout(codes: Tensor, k: int, meta: dict[str, tuple[Tensor, tuple[int, ...]]]) -> None:
    """The kernels read without bounds checks: an encoding whose tensors do not fit ``k`` is an error, not a crash."""
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] < k:
        raise ValueError(f"codes must be uint8 (R, >= {k}), got {codes.dtype} {tuple(codes.shape)}")
    for key, (t, shape) in meta.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"meta['{key}'] must have shape {shape} for {tuple(codes.shape)} codes, got "
                             f"{tuple(t.shape)}")


def every_byte() -> Tensor:
    """The 256 uint8 codes: a decode table holds the torch decode of each, so that any code byte, even one
    outside the format's range, decodes as the torch path decodes it."""
    return torch.arange(256, dtype=torch.uint8)


def decode_blocks(codes: Tensor, table: Tensor, scale: Tensor, block: int, k: int, dtype: torch.dtype) -> Tensor:
    """``(table[codes] * scale[:, i // block]).to(dtype)``, ``(R, k)``: the decode of MX, NVFP4, FP8 and INT.

    ``table`` holds the fp32 value of every byte (`every_byte` through the format's own torch decode, so the
    values are the same bits) and ``scale`` the fp32 scale of every block (R, blocks); the product is the torch
    path's one fp32 multiplication, and `store` rounds it into ``dtype`` as ``Tensor.to`` does. ``codes`` is
    (R, K_padded) uint8; the padding is not read.
    """
    blocks = -(-k // block)
    check_layout(codes, k, {"scale": (scale, (codes.shape[0], blocks))})
    out = torch.empty(codes.shape[0], k, dtype=dtype)
    _decode_kernel(codes.contiguous().numpy(), table.contiguous().numpy(), scale.float().contiguous().numpy(), block,
                   kernel_array(out))
    return out


@parallel_jit
def _decode_kernel(codes, table, scale, block, out):
    """``out[r, i] = table[codes[r, i]] * scale[r, i // block]``, rounded into ``out``'s dtype."""
    n_rows, k = out.shape
    blocks, per_task, row_tasks = segments(k, block)
    for task in prange(n_rows * row_tasks):
        row, first = task // row_tasks, task % row_tasks * per_task
        c, y = codes[row], out[row]
        for blk in range(first, min(blocks, first + per_task)):
            start = blk * block
            n = min(block, k - start)
            _decode_block(c[start:start + n], y[start:start + n], n, table, scale[row, blk])


@numba.njit(inline="always")
def _decode_block(c, y, n, table, s):
    for i in range(n):
        store(y, i, np.float32(table[c[i]] * s))


@parallel_jit
def hif4_decode(codes, scale, eb, ec, scale_values, out):
    """HiF4 decode (hif4.py `code_values`): ``+-((c * 0.25) * 2^(Eb + Ec)) * s`` per element, in ``out``'s dtype.

    ``scale_values`` is the fp32 value of every E6M2 byte (0xFF: NaN); codes (R, K_padded), scale (R, U), eb
    (R, U, 8) and ec (R, U, 16) are the `Encoded` tensors, read as the torch path reads them for any byte.
    """
    n_rows, k = out.shape
    units, per_task, row_tasks = segments(k, 64)
    for task in prange(n_rows * row_tasks):
        row, first = task // row_tasks, task % row_tasks * per_task
        c, y = codes[row], out[row]
        for unit in range(first, min(units, first + per_task)):
            s = scale_values[scale[row, unit]]
            start = unit * 64
            for i in range(start, min(k, start + 64)):
                j = i - start
                p = np.int32(eb[row, unit, j >> 3]) + np.int32(ec[row, unit, j >> 2])
                mag = np.float32(np.float32(np.float32(c[i] & 7) * np.float32(0.25)) * pow2f(p)) * s
                store(y, i, np.float32(-mag if c[i] & 8 else mag))


# ---- packed decode: a format's bytes straight to dense rows, in one pass ------------------------------------------
# `Format.decode_packed` is ``decode(unpack(bytes))``. Where a value depends only on bytes (an element code and a
# one-byte scale: HiF4, HiF8, MX, NVFP4 under its tensor scale), the kernels gather from a table that holds the
# *output bit patterns* of every combination, made once by the format's own torch decode and torch's own
# ``Tensor.to``: equal to the reference by construction, NaN included (torch writes 0xFFFF for every bf16 NaN,
# whatever its sign, where a rounding kernel would keep the sign). FP8 and INT scales are free fp32 / fp16
# values: their kernel multiplies as the torch decode does and reports a NaN product (an Inf or NaN byte in a
# corrupt weight), for which the caller takes the reference path.
_BITS_VIEW = {torch.bfloat16: (torch.int16, np.uint16), torch.float16: (torch.int16, np.uint16),
              torch.float32: (torch.int32, np.uint32)}


def bits_array(t: Tensor) -> np.ndarray:
    """The unsigned-integer numpy view of a contiguous CPU float tensor's bits (no copy)."""
    torch_view, np_view = _BITS_VIEW[t.dtype]
    return t.detach().view(torch_view).numpy().view(np_view)


def output_bits(values: Tensor, dtype: torch.dtype) -> np.ndarray:
    """Bit patterns of fp32 ``values`` as ``Tensor.to(dtype)`` writes them: the tables the gathers read."""
    return bits_array(values.to(dtype).contiguous()).copy()


@parallel_jit
def hif4_decode_packed(data, table, out):
    """HiF4 bytes ``data`` (R, U * 36) -> ``out`` (R, k) bits; ``table`` (flat): the output bits of
    ``[scale byte, Eb + Ec, nibble]`` at ``(scale * 3 + Eb + Ec) * 16 + nibble``.

    A unit is 32 element bytes (low nibble = even element) then ``[E6M2, Eb mask, Ec lo, Ec hi]``; element ``i``
    has Eb bit ``i >> 3`` and Ec bit ``i >> 2``, so the 4 elements of byte pair ``j`` share ``Eb + Ec``.
    """
    n_rows, k = out.shape
    units, per_task, row_tasks = segments(k, 64)
    for task in prange(n_rows * row_tasks):
        row, first = task // row_tasks, task % row_tasks * per_task
        d, y = data[row], out[row]
        for unit in range(first, min(units, first + per_task)):
            base, start = unit * 36, unit * 64
            scale = np.int64(d[base + 32]) * 48
            eb = np.int64(d[base + 33])
            ec = np.int64(d[base + 34]) | (np.int64(d[base + 35]) << 8)
            if start + 64 <= k:
                for j in range(16):
                    t = scale + (((eb >> (j >> 1)) & 1) + ((ec >> j) & 1)) * 16
                    b0, b1 = d[base + 2 * j], d[base + 2 * j + 1]
                    y[start + 4 * j] = table[t + (b0 & 15)]
                    y[start + 4 * j + 1] = table[t + (b0 >> 4)]
                    y[start + 4 * j + 2] = table[t + (b1 & 15)]
                    y[start + 4 * j + 3] = table[t + (b1 >> 4)]
            else:  # the row's short last unit
                for i in range(k - start):
                    t = scale + (((eb >> (i >> 3)) & 1) + ((ec >> (i >> 2)) & 1)) * 16
                    y[start + i] = table[t + ((d[base + (i >> 1)] >> (4 * (i & 1))) & 15)]


@parallel_jit
def gather_decode(codes, table, out):
    """``out[r, i] = table[codes[r, i]]`` (HiF8: one byte, one value)."""
    n_rows, k = out.shape
    _, per_task, row_tasks = segments(k, 1)
    for task in prange(n_rows * row_tasks):
        row, first = task // row_tasks, task % row_tasks * per_task
        c, y = codes[row], out[row]
        for i in range(first, min(k, first + per_task)):
            y[i] = table[c[i]]


@parallel_jit
def block_table_decode(data, block, four_bit, table, out):
    """Blocks of ``block`` element codes (4-bit: two per byte, low nibble first; else one byte) followed by a
    one-byte scale: ``out`` = ``table[scale byte, code]`` (MX, NVFP4)."""
    n_rows, k = out.shape
    blocks, per_task, row_tasks = segments(k, block)
    element_bytes = block // 2 if four_bit else block
    for task in prange(n_rows * row_tasks):
        row, first = task // row_tasks, task % row_tasks * per_task
        d, y = data[row], out[row]
        for blk in range(first, min(blocks, first + per_task)):
            base, start = blk * (element_bytes + 1), blk * block
            t = table[d[base + element_bytes]]
            n = min(block, k - start)
            if four_bit:
                for b in range(n >> 1):
                    byte = d[base + b]
                    y[start + 2 * b] = t[byte & np.uint8(15)]
                    y[start + 2 * b + 1] = t[byte >> np.uint8(4)]
                if n & 1:
                    y[start + n - 1] = t[d[base + (n >> 1)] & np.uint8(15)]
            else:
                for i in range(n):
                    y[start + i] = t[d[base + i]]


@parallel_jit
def scaled_decode(data, block, four_bit, scale_bytes, values, out):
    """Groups of ``block`` codes (4-bit: two per byte, low nibble first) followed by a little-endian fp16
    (``scale_bytes`` 2) or fp32 (4) scale: ``out = values[code] * scale`` in fp32, rounded into ``out``'s dtype as
    ``Tensor.to`` rounds (FP8, INT). False if a product is NaN (only a corrupt weight has one: see above)."""
    n_rows, k = out.shape
    groups, per_task, row_tasks = segments(k, block)
    element_bytes = (block + 1) // 2 if four_bit else block
    ok = np.ones(n_rows * row_tasks, np.bool_)
    for task in prange(n_rows * row_tasks):
        row, first = task // row_tasks, task % row_tasks * per_task
        d, y = data[row], out[row]
        nan = False
        for grp in range(first, min(groups, first + per_task)):
            base, start = grp * (element_bytes + scale_bytes), grp * block
            at = base + element_bytes
            if scale_bytes == 2:
                s = fp16_value(np.uint32(d[at]) | (np.uint32(d[at + 1]) << np.uint32(8)))
            else:
                s = np.uint32(np.uint32(d[at]) | (np.uint32(d[at + 1]) << np.uint32(8))
                              | (np.uint32(d[at + 2]) << np.uint32(16)) | (np.uint32(d[at + 3]) << np.uint32(24))
                              ).view(np.float32)
            n = min(block, k - start)
            if four_bit:
                for b in range(n >> 1):
                    byte = d[base + b]
                    v0, v1 = np.float32(values[byte & np.uint8(15)] * s), np.float32(values[byte >> np.uint8(4)] * s)
                    nan |= (v0 != v0) | (v1 != v1)
                    store(y, start + 2 * b, v0)
                    store(y, start + 2 * b + 1, v1)
                if n & 1:
                    v = np.float32(values[d[base + (n >> 1)] & np.uint8(15)] * s)
                    nan |= v != v
                    store(y, start + n - 1, v)
            else:
                for i in range(n):
                    v = np.float32(values[d[base + i]] * s)
                    nan |= v != v
                    store(y, start + i, v)
        ok[task] = not nan
    return ok.all()
