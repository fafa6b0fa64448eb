"""The `Format` value object and the wiring every format shares.

A format only ever sees *rows*: a contiguous 2-D tensor ``(R, K)`` whose last dim is the one the
blocks run along (the reduction dim K of ``x[..., K]`` and ``W[N, K]``). `Format` moves the caller's
``dim`` to the end, validates the input once, and restores the shape afterwards, so that each format
file holds numerics only.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Encoded:
    """Integer codes plus the scales/metadata needed to decode them.

    ``codes`` holds one uint8 code per value, shaped ``(R, K_padded)`` with the quantized dim last and
    the tail zero-padded to a whole block. ``meta`` holds the format's scales (for example HiF4's
    ``scale``/``eb``/``ec``, MX's E8M0 ``scale``), each with ``R`` rows. ``shape``, ``dim`` and
    ``dtype`` describe the original tensor that `Format.decode` returns.
    """

    format: str
    codes: Tensor
    meta: dict[str, Tensor]
    shape: tuple[int, ...]
    dim: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Format(ABC):
    """A numeric format: how a tensor is turned into codes and back.

    Subclasses implement the row-level numerics (`_encode_rows`, `_decode_rows`, `_pack_rows`,
    `_unpack_rows`) and may override `_qdq_rows` and `_decode_rows_as` with fast paths that must agree bit
    for bit with ``decode(encode(x))`` and ``_decode_rows(...).to(dtype)``.
    """

    name: str
    description: str
    bits_per_value: float
    block_size: int | None  # values sharing one scale; None: the whole vector along dim; 1: no scale
    element: str  # element encoding, e.g. "E2M1", "HiF8"
    scale: str  # scale encoding, e.g. "E8M0", "none"
    max_value: float  # largest finite magnitude the elements can reach (with the largest scale)

    # ---- public contract -------------------------------------------------------------------------
    def quantize_dequantize(self, x: Tensor, dim: int = -1) -> Tensor:
        """Round ``x`` onto the format's grid; same shape and dtype as ``x``."""
        rows, dim = self._to_rows(x, dim)
        out = self._qdq_rows(rows)
        return _from_rows(out, x.shape, dim)

    def encode(self, x: Tensor, dim: int = -1) -> Encoded:
        """Integer codes and scales of ``x`` along ``dim``."""
        rows, dim = self._to_rows(x, dim)
        codes, meta = self._encode_rows(rows)
        return Encoded(self.name, codes, meta, tuple(x.shape), dim, x.dtype)

    def decode(self, enc: Encoded) -> Tensor:
        """The values that ``enc`` stands for, in the original shape and dtype."""
        if enc.format != self.name:
            raise ValueError(f"cannot decode a '{enc.format}' encoding with format '{self.name}'")
        k = enc.shape[enc.dim]
        rows = self._decode_rows_as(enc.codes, enc.meta, k, enc.dtype)
        return _from_rows(rows, torch.Size(enc.shape), enc.dim)

    def pack(self, enc: Encoded) -> Tensor:
        """The bytes of ``enc`` as a flat uint8 tensor, in the order docs/formats.md writes down."""
        if enc.format != self.name:
            raise ValueError(f"cannot pack a '{enc.format}' encoding with format '{self.name}'")
        return self._pack_rows(enc.codes, enc.meta).reshape(-1)

    def unpack(
        self, data: Tensor, shape: tuple[int, ...], dim: int = -1, dtype: torch.dtype = torch.bfloat16
    ) -> Encoded:
        """Inverse of `pack`: the encoding of a tensor of ``shape``/``dtype`` packed along ``dim``."""
        shape = tuple(int(s) for s in shape)
        dim = _check_dim(dim, len(shape), self.name)
        k = shape[dim]
        n_rows = 1
        for i, s in enumerate(shape):
            if i != dim:
                n_rows *= s
        self._check_packed(data, n_rows, k, dtype, f"shape {shape} along dim {dim}")
        codes, meta = self._unpack_rows(data, n_rows, k)
        return Encoded(self.name, codes, meta, shape, dim, dtype)

    def decode_packed(self, data: Tensor, n_rows: int, k: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """``decode(unpack(data, (n_rows, k), -1, dtype))``, the ``(n_rows, k)`` rows, straight from the bytes.

        The packed runtime decodes a weight tile per call: on the CPU a fused kernel reads the bytes and writes
        the rows in one pass (`kernels`; no codes or metadata tensors in between), equal to the definition bit
        for bit (tests); other devices, and the rare input a kernel hands back, run the definition in torch ops.
        """
        if n_rows < 1 or k < 1:
            raise ValueError(f"{self.name}: packed rows need at least one row of one value, got {n_rows} x {k}")
        self._check_packed(data, n_rows, k, dtype, f"{n_rows} rows of {k}")
        if use_cpu_kernels(data):
            out = self._decode_packed_rows(data.contiguous(), n_rows, k, dtype)
            if out is not None:
                return out
        enc = self.unpack(data, (n_rows, k), -1, dtype)
        return Format._decode_rows_as(self, enc.codes, enc.meta, k, dtype)  # the torch ops: the definition

    def _check_packed(self, data: Tensor, n_rows: int, k: int, dtype: torch.dtype, what: str) -> None:
        if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            got = f"{data.dtype} with shape {tuple(data.shape)}" if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"{self.name}: packed data must be a flat uint8 tensor, got {got}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{self.name}: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        expected = self.packed_nbytes(n_rows, k)
        if data.numel() != expected:
            raise ValueError(f"{self.name}: packed data has {data.numel()} bytes, expected {expected} for {what}")

    def padded(self, k: int) -> int:
        """Length of a row of ``k`` values once padded to whole blocks."""
        b = self.block_size
        return k if b is None or b == 1 else -(-k // b) * b

    def column_quantizer(self, weight: Tensor) -> ColumnQuantizer:
        """GPTQ's quantizer for the weight ``(R, K)``: see `ColumnQuantizer`. Block formats implement it."""
        raise ValueError(f"{self.name}: GPTQ has no column quantizer for this format")

    # ---- what a format implements ----------------------------------------------------------------
    @abstractmethod
    def _encode_rows(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...

    @abstractmethod
    def _decode_rows(self, codes: Tensor, meta: dict[str, Tensor], k: int) -> Tensor:
        """fp32 values ``(R, k)`` (padding dropped)."""

    @abstractmethod
    def _pack_rows(self, codes: Tensor, meta: dict[str, Tensor]) -> Tensor: ...

    @abstractmethod
    def _unpack_rows(self, data: Tensor, n_rows: int, k: int) -> tuple[Tensor, dict[str, Tensor]]: ...

    @abstractmethod
    def packed_nbytes(self, n_rows: int, k: int) -> int:
        """Bytes `pack` writes for ``n_rows`` rows of ``k`` values."""

    def _decode_packed_rows(self, data: Tensor, n_rows: int, k: int, dtype: torch.dtype) -> Tensor | None:
        """`decode_packed` by a CPU kernel on checked, contiguous bytes; None: no kernel serves them (the definition
        runs)."""
        return None

    def _decode_rows_as(self, codes: Tensor, meta: dict[str, Tensor], k: int, dtype: torch.dtype) -> Tensor:
        """`_decode_rows` in ``dtype``: a fast path may write ``dtype`` directly (rounding as ``Tensor.to`` does)."""
        return self._decode_rows(codes, meta, k).to(dtype)

    def _qdq_rows(self, rows: Tensor) -> Tensor:
        return self._decode_rows(*self._encode_rows(rows), rows.shape[-1]).to(rows.dtype)

    # ---- wiring ----------------------------------------------------------------------------------
    def _to_rows(self, x: Tensor, dim: int) -> tuple[Tensor, int]:
        if not isinstance(x, Tensor):
            raise ValueError(f"{self.name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{self.name}: input dtype must be bfloat16, float16 or float32, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"{self.name}: input is empty (shape {tuple(x.shape)})")
        dim = _check_dim(dim, x.dim(), self.name)
        rows = x.movedim(dim, -1).reshape(-1, x.shape[dim]).contiguous()
        return rows, dim


class ColumnQuantizer(ABC):
    """Rounds a weight (R, K) one column at a time under per-block metadata that `enter` fixes (GPTQ's quantizer).

    GPTQ quantizes the columns of ``W[R, K]`` (K = the input channels, the dim the blocks run along) one
    by one and moves each column's rounding error onto the columns not yet rounded. A block format's
    metadata (scales, sub-block exponents) depends on a whole block of columns, so it is fixed once per
    block: `enter` computes it from the block's *current* columns (GPTQ passes the error-updated ones),
    and `round` then rounds each column of that block under it. The arithmetic is the format's own
    (`Format.encode` uses the same helpers), so entering every block from ``W`` and rounding every
    column gives exactly ``fmt.encode(W)`` and ``fmt.quantize_dequantize(W)``, bit for bit.

    Tensor-level context is fixed by the constructor from the weight it is given (NVFP4's fp32 tensor
    scale). Subclasses allocate ``meta`` (the `Encoded` meta, R rows) and implement `_enter` / `_round`.
    """

    def __init__(self, fmt: Format, weight: Tensor) -> None:
        if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() == 0:
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"{fmt.name}: the column quantizer needs a non-empty 2-D weight (R, K), got {got}")
        if weight.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{fmt.name}: weight dtype must be bfloat16, float16 or float32, got {weight.dtype}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{fmt.name}: the weight contains Inf or NaN; GPTQ needs a finite weight")
        self.fmt = fmt
        self.rows, self.k = (int(s) for s in weight.shape)
        self.device = weight.device
        self.codes = torch.zeros(self.rows, fmt.padded(self.k), dtype=torch.uint8, device=weight.device)
        self.meta: dict[str, Tensor] = {}
        self._entered = [False] * self.n_blocks

    @property
    def block_size(self) -> int:
        """Values per block along K (the whole row K for per-row formats)."""
        return self.fmt.block_size or self.k

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)

    def enter(self, block: int, values: Tensor) -> None:
        """Fix block ``block``'s metadata from ``values`` (R, n): the block's current columns, all of them."""
        if not 0 <= block < self.n_blocks:
            raise ValueError(f"{self.fmt.name}: block {block} is out of range (the weight has {self.n_blocks})")
        n = min(self.block_size, self.k - block * self.block_size)
        if tuple(values.shape) != (self.rows, n):
            raise ValueError(f"{self.fmt.name}: block {block} needs values of shape {(self.rows, n)}, "
                             f"got {tuple(values.shape)}")
        values = values.float()
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{self.fmt.name}: block {block}'s values contain Inf or NaN")
        self._enter(block, pad_rows(values, self.block_size))
        self._entered[block] = True

    def round(self, column: int, values: Tensor) -> Tensor:
        """Round column ``column`` (0..K-1) of ``values`` (R,) under its block's metadata; the dequantized fp32 values.

        The codes are kept for `encoded`. ``values`` must be finite (GPTQ's updates of a finite weight are).
        """
        if not 0 <= column < self.k:
            raise ValueError(f"{self.fmt.name}: column {column} is out of range (the weight has {self.k})")
        if values.shape != (self.rows,):
            raise ValueError(f"{self.fmt.name}: a column has shape {(self.rows,)}, got {tuple(values.shape)}")
        if not self._entered[column // self.block_size]:
            raise ValueError(f"{self.fmt.name}: column {column} is rounded before its block "
                             f"{column // self.block_size} was entered")
        return self._round(column, values.float())

    def encoded(self, dtype: torch.dtype) -> Encoded:
        """The `Encoded` of everything rounded so far (columns not rounded yet hold code 0); decodes to ``dtype``."""
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{self.fmt.name}: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        meta = {key: value.clone() for key, value in self.meta.items()}
        return Encoded(self.fmt.name, self.codes.clone(), meta, (self.rows, self.k), 1, dtype)

    @abstractmethod
    def _enter(self, block: int, values: Tensor) -> None:
        """Store block ``block``'s metadata from fp32 ``values`` (R, block_size), zero-padded like encode pads."""

    @abstractmethod
    def _round(self, column: int, values: Tensor) -> Tensor:
        """Store the codes of fp32 ``values`` (R,) in ``self.codes[:, column]``; return their decoded fp32 values."""


def _check_dim(dim: int, ndim: int, name: str) -> int:
    if ndim == 0:
        raise ValueError(f"{name}: a 0-d tensor has no dim to quantize along")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}: dim {dim} is out of range for a {ndim}-d tensor")
    return dim % ndim


def _from_rows(rows: Tensor, shape: torch.Size, dim: int) -> Tensor:
    moved = list(shape)
    moved.append(moved.pop(dim))
    return rows.reshape(moved).movedim(-1, dim)


INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits_equal(a: Tensor, b: Tensor) -> bool:
    """Bit-for-bit equality of two float tensors (same shape and dtype), except that any NaN matches any NaN.

    NaN payloads are not part of any format here (torch itself writes different NaN bits for one value).
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a.view(INT_VIEW[a.dtype])[~nan], b.view(INT_VIEW[b.dtype])[~nan])


def pad_rows(rows: Tensor, block: int) -> Tensor:
    """Zero-pad the last dim of ``rows`` to a multiple of ``block``."""
    tail = -rows.shape[-1] % block
    return torch.nn.functional.pad(rows, (0, tail)) if tail else rows


def check_finite_scale(scale: Tensor, fmt: str) -> None:
    """Formats with computed float scales cannot encode Inf/NaN: say so instead of returning garbage."""
    if not torch.isfinite(scale).all():
        raise ValueError(f"{fmt}: input contains Inf or NaN, so its scale is not finite")


def use_cpu_kernels(x: Tensor) -> bool:
    """Whether the compiled (numba) CPU kernels serve ``x``; VIDQUANT_NO_KERNELS=1 forces torch ops."""
    return x.device.type == "cpu" and os.environ.get("VIDQUANT_NO_KERNELS", "") in ("", "0")
