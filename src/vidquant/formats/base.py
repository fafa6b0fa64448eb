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
    `_unpack_rows`) and may override `_qdq_rows` with a fast path that must agree bit for bit with
    ``decode(encode(x))``.
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
        rows = self._decode_rows(enc.codes, enc.meta, k).to(enc.dtype)
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
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError(f"{self.name}: packed data must be a flat uint8 tensor, got {data.dtype} "
                             f"with shape {tuple(data.shape)}")
        shape = tuple(int(s) for s in shape)
        dim = _check_dim(dim, len(shape), self.name)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{self.name}: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        k = shape[dim]
        n_rows = 1
        for i, s in enumerate(shape):
            if i != dim:
                n_rows *= s
        expected = self.packed_nbytes(n_rows, k)
        if data.numel() != expected:
            raise ValueError(f"{self.name}: packed data has {data.numel()} bytes, expected {expected} "
                             f"for shape {shape} along dim {dim}")
        codes, meta = self._unpack_rows(data, n_rows, k)
        return Encoded(self.name, codes, meta, shape, dim, dtype)

    def padded(self, k: int) -> int:
        """Length of a row of ``k`` values once padded to whole blocks."""
        b = self.block_size
        return k if b is None or b == 1 else -(-k // b) * b

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
