"""The packed-weight runtime: a quantized Linear's weight kept in its format's bytes, decoded tile by tile per call.

`PackedLinearWeight` holds the weight as the format packs it (HiF4 36 bytes per 64 values, MXFP4 17 per 32,
NVFP4 9 per 16 plus its tensor scale, INT4-g64 34 per 64, 8-bit formats one byte per value plus scales), split
into row tiles so that a call never holds more than one tile dense (``tile_rows``; None: one tile). Decoding a
row slice is exact: every format's scales are per row (NVFP4 repeats its tensor scale on every row), so
``decode(pack(rows r0..r1))`` is rows r0..r1 of ``decode(encoded)`` bit for bit. With one tile the call is the
very matmul of the fake-quant path (`F.linear` on the same dense weight), so outputs match it bit for bit; with
several, each output column is still one dot product over K, and only the BLAS kernel choice for a narrower
matrix can change its accumulation order (the tests derive the bound).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidquant import formats
from vidquant.formats import Encoded


class PackedLinearWeight(nn.Module):
    """A ``(N, K)`` weight in its format's bytes, as row tiles; `forward` computes ``x W^T + b`` tile by tile."""

    def __init__(self, encoded: Encoded, tile_rows: int | None = None) -> None:
        super().__init__()
        if len(encoded.shape) != 2 or encoded.dim not in (-1, 1):
            raise ValueError(f"a packed Linear weight is 2-D and encoded along in_features, got shape "
                             f"{encoded.shape} along dim {encoded.dim}")
        if tile_rows is not None and tile_rows < 1:
            raise ValueError(f"tile_rows must be at least 1, got {tile_rows}")
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
        fmt = formats.get(self.format_name)
        return fmt.decode(fmt.unpack(getattr(self, f"tile{i}"), (r1 - r0, self.in_features), -1, self.dtype))

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
