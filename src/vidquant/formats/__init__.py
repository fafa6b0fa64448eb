"""Numeric formats, exact to the bit as ../docs/formats.md defines them.

    >>> from vidquant import formats
    >>> fmt = formats.get("hif4")
    >>> y = fmt.quantize_dequantize(x)            # same shape and dtype as x
    >>> enc = fmt.encode(x); fmt.decode(enc)      # codes + scales, and back
    >>> data = fmt.pack(enc)                      # uint8 bytes (36 per 64 HiF4 values)
"""

# Each module registers its formats on import; this order is the order `names()` lists them in.
# isort: off
from . import hif8, hif4, mx, nvfp4, fp8, integer  # noqa: F401
# isort: on
from .base import Encoded, Format, bits_equal
from .registry import get, names, register

__all__ = ["Encoded", "Format", "bits_equal", "get", "names", "register"]
