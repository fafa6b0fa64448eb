"""The packed-weight runtime: a quantized Linear's weight kept in its format's bytes, decoded tile by tile per call.

`PackedLinearWeight` holds the weight as the format packs it (HiF4 36 bytes per 64 values, MXFP4 17 per 32,
NVFP4 9 per 16 plus its tensor scale, INT4-g64 34 per 64, 8-bit formats one byte per value plus scales), split
into row tiles so that a call never holds more than one tile dense (``tile_rows``; None: one tile). Decoding a
row slice is exact: every format's scales are per row (NVFP4 repeats its tensor scale on every row), so
``decode(pack(rows r0..r1))`` is rows r0..r1 of ``decode(encoded)`` bit for bit. With one tile the call is the
very matmul of the fake-quant path (`F.linear` on the same dense weight), so outputs match it bit for bit; with
several, each output column is still one dot product over K, and only the BLAS kernel choice for a narrower
matrix can change its accumulation order (the tests derive the bound). A tile is decoded by
`Format.decode_packed`: on the CPU one fused pass from its bytes to the layer's dtype (no codes or scale tensors
in between), bit-identical to ``decode(unpack(...))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidquant import formats
from vidquant.formats import Encoded
from vidquant.formats.base import FLOAT_DTYPES


def check_encoding(encoded: Encoded) -> None:
    """Refuse an encoding that its format's own `encode` could not have written for its shape.

    Codes and every scale tensor must have the format's layout for ``(N, K)`` (the keys, dtypes and shapes
    `encode` gives a row of K values, with N rows): a mismatched scale tensor would otherwise pack into bytes of
    another layout and decode to garbage, or fail deep inside the packing with an unrelated message.
    """
    fmt = formats.get(encoded.format)
    if encoded.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fmt.name} weight: dtype must be one of {FLOAT_DTYPES}, got {encoded.dtype}")
    n, k = encoded.shape
    if n < 1 or k < 1:
        raise ValueError(f"{fmt.name} weight: an empty {n}x{k} weight has nothing to pack")
    like = fmt.encode(torch.zeros(1, k))  # the layout of one row
    what = f"{fmt.name} weight {n}x{k}"
    codes = encoded.codes
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (n, like.codes.shape[1]):
        raise ValueError(f"{what}: codes must be uint8 {(n, like.codes.shape[1])}, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    if set(encoded.meta) != set(like.meta):
        raise ValueError(f"{what}: scale tensors {sorted(encoded.meta)} do not match the format's {sorted(like.meta)}")
    for key, ref in like.meta.items():
        t, shape = encoded.meta[key], (n, *ref.shape[1:])
        if t.dtype != ref.dtype or tuple(t.shape) != shape:
            raise ValueError(f"{what}: scale tensor '{key}' must be {ref.dtype} {shape}, got {t.dtype} "
                             f"{tuple(t.shape)}")


class PackedLinearWeight(nn.Module):
    """A ``(N, K)`` weight in its format's bytes, as row tiles; `forward` computes ``x W^T + b`` tile by tile."""

    def __init__(self, encoded: Encoded, tile_rows: int | None = None) -> None:
        super().__init__()
        if len(encoded.shape) != 2 or encoded.dim not in (-1, 1):
            raise ValueError(f"a packed Linear weight is 2-D and encoded along in_features, got shape "
                             f"{encoded.shape} along dim {encoded.dim}")
        if tile_rows is not None and tile_rows < 1:
            raise ValueError(f"tile_rows must be at least 1, got {tile_rows}")
        check_encoding(encoded)
        self.format_name = encoded.format
        self.out_features, self.in_features = encoded.shape
        self.dtype = encoded.dtype
        fmt = formats.get(encoded.format)
        step = self.out_features if tile_rows is None else tile_rows
        self.bounds = [(r, min(r + step, self.out_features)) for r in range(0, self.out_features, step)]
        for i, (r0, r1) in enumerate(self.bounds):
            tile = Encoded(encoded.format, encoded.codes[r0:r1], {k: v[r0:r1] for k, v in encoded.meta.items()},
                           (r1 - r0, self.in_features), -1, encoded.dtype)
            self.register_buffer(f"tile{i}", fmt.pack(tile))

    @classmethod
    def from_bytes(cls, data: Tensor, weight_format: str, shape: tuple[int, int], dtype: torch.dtype,
                   tile_rows: int | None = None) -> PackedLinearWeight:
        """From the bytes `Format.pack` wrote for the whole weight (a state's ``weight_packed``)."""
        return cls(formats.get(weight_format).unpack(data, shape, -1, dtype), tile_rows)

    def tiles(self) -> list[Tensor]:
        return [getattr(self, f"tile{i}") for i in range(len(self.bounds))]

    def decode_tile(self, i: int) -> Tensor:
        r0, r1 = self.bounds[i]
        return formats.get(self.format_name).decode_packed(getattr(self, f"tile{i}"), r1 - r0, self.in_features,
                                                           self.dtype)

    def dense(self) -> Tensor:
        """The whole dequantized weight (for inspection; `forward` never builds it for more than one tile)."""
        return torch.cat([self.decode_tile(i) for i in range(len(self.bounds))])

    def nbytes(self) -> int:
        return sum(t.numel() for t in self.tiles())

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if len(self.bounds) == 1:
            return F.linear(x, self.decode_tile(0), bias)
        outputs = []
        for i, (r0, r1) in enumerate(self.bounds):
            w = self.decode_tile(i)
            outputs.append(F.linear(x, w, None if bias is None else bias[r0:r1]))
            del w  # one dense tile at a time
        return torch.cat(outputs, dim=-1)

    def extra_repr(self) -> str:
        return (f"{self.format_name}, {self.out_features}x{self.in_features}, {len(self.bounds)} tile(s), "
                f"{self.nbytes()} bytes")
