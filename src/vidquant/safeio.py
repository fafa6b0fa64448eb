"""Guarded reading of safetensors files that may be corrupt or hostile.

The safetensors library trusts a file's header far enough to fail with raw ``SafetensorError`` tracebacks
on a flipped bit, and it loads whatever tensors the file lists (an extra 8 GiB tensor gets allocated). Here
the header is parsed and checked in pure Python first (its length bounded, its JSON strict, every tensor's
dtype, shape and byte range consistent with the file's size), then compared with what the caller expects;
only then are the expected tensors loaded. Every failure is a ``ValueError`` that names the file and, where
it applies, the tensor and the field.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024 * 1024  # the library's own cap is 100 MB; real headers are kilobytes
MAX_NDIM = 64  # far beyond any real tensor, and it keeps the numel product of a hostile shape cheap
_SHOW = 120  # characters of a name or value echoed from the file into a message

# safetensors dtype name -> (torch dtype name, bits per element). The F6 types and any dtype this torch
# lacks are left out: the library could not hand them to torch anyway.
_DTYPE_BITS = {
    "BOOL": ("bool", 8),
    "U8": ("uint8", 8),
    "I8": ("int8", 8),
    "U16": ("uint16", 16),
    "I16": ("int16", 16),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "U32": ("uint32", 32),
    "I32": ("int32", 32),
    "F32": ("float32", 32),
    "U64": ("uint64", 64),
    "I64": ("int64", 64),
    "F64": ("float64", 64),
    "C64": ("complex64", 64),
    "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "F8_E8M0": ("float8_e8m0fnu", 8),
    "F4": ("float4_e2m1fn_x2", 4),  # torch packs two per element: its last dimension is half the file's
}
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, torch_name) for name, (torch_name, _) in _DTYPE_BITS.items() if hasattr(torch, torch_name)
}
_BITS = {name: bits for name, (_, bits) in _DTYPE_BITS.items() if name in DTYPES}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_KNOWN_UNLOADABLE = {"F6_E2M3", "F6_E3M2"}  # safetensors knows them, torch does not


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor must look like: dtype(s) by safetensors name or torch dtype, shape with None for any size.

    ``dtype`` and ``shape`` None accept anything; ``required`` False lets the tensor be absent.
    The shape is the file's (for F4, the unpacked element count, not torch's packed last dimension).
    """

    dtype: str | torch.dtype | tuple[str | torch.dtype, ...] | None = None
    shape: tuple[int | None, ...] | None = None
    required: bool = True

    def __post_init__(self) -> None:
        if self.dtype is not None:
            given = self.dtype if isinstance(self.dtype, tuple) else (self.dtype,)
            names = []
            for d in given:
                name = _NAMES.get(d) if isinstance(d, torch.dtype) else d
                if name not in DTYPES:
                    raise ValueError(f"TensorSpec: unknown dtype {d!r}; use one of {', '.join(DTYPES)}")
                names.append(name)
            object.__setattr__(self, "dtype", tuple(names))
        if self.shape is not None:
            shape = tuple(self.shape)
            if not all(d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape):
                raise ValueError(f"TensorSpec: shape {self.shape!r} must hold non-negative ints or None")
            object.__setattr__(self, "shape", shape)

    @property
    def dtypes(self) -> tuple[str, ...] | None:
        """The accepted safetensors dtype names (None: any)."""
        return self.dtype  # type: ignore[return-value]  # normalized in __post_init__


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; ``begin``/``end`` are byte offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The shape torch gives the loaded tensor (F4 packs two elements into one along the last dimension)."""
        if _BITS[self.dtype] == 4 and self.shape:
            return (*self.shape[:-1], self.shape[-1] // 2)
        return self.shape


Expected = Mapping[str, TensorSpec] | Callable[[str], TensorSpec | None]


def read_header(path: str | Path) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """The tensors a safetensors file lists and its ``__metadata__``, checked without the safetensors library.

    Reads only the 8-byte length and the header itself, so nothing a hostile header claims gets allocated.
    Raises ValueError naming the file when anything is malformed or inconsistent with the file's size.
    """
    return _read_header(path, str(path))


def _read_header(path: str | Path, label: str) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    raw, data_size = _read_raw_header(Path(path), label)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{label}: header is not UTF-8 (byte {err.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as err:
        raise ValueError(f"{label}: header lists key {_show(err.key)} twice") from None
    except RecursionError:
        raise ValueError(f"{label}: header JSON is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, NaN/Infinity, integers too long to convert
        raise ValueError(f"{label}: header is not valid JSON ({_show(str(err))})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{label}: header is a JSON {type(header).__name__}, not an object")
    metadata = _metadata(header.pop("__metadata__", None), label)
    entries = {name: _entry(name, info, data_size, label) for name, info in header.items()}
    _check_layout(entries, data_size, label)
    return entries, metadata


def read_safetensors(
    path: str | Path,
    expected: Expected | None = None,
    *,
    allow_unknown: bool = False,
    device: str | torch.device = "cpu",
    what: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its header metadata, every check done before any tensor loads.

    ``expected``: a mapping of tensor name to `TensorSpec` (names not listed are unknown; required ones must be
    present) or a callable giving the spec of a name (None: unknown), or None to accept and load every tensor.
    Unknown tensors are an error unless ``allow_unknown``; then they are skipped, never loaded.
    ``what`` says what the file is, for messages ("PTQ state", "calibration statistics").
    Raises ValueError naming the file (and the tensor and field) on any problem.
    """
    label = f"{path} ({what})" if what else str(path)
    entries, metadata = _read_header(path, label)
    wanted = _select(entries, expected, allow_unknown, label)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in wanted:
                tensors[name] = _own(f.get_tensor(name))
    except Exception as err:  # SafetensorError, OSError, torch's RuntimeError: the file changed or lied
        raise ValueError(f"{label}: unreadable ({_show(str(err))})") from err
    for name, tensor in tensors.items():  # the file may have changed since its header was read
        entry = entries[name]
        if tensor.dtype != entry.torch_dtype or tuple(tensor.shape) != entry.torch_shape:
            raise ValueError(f"{label}: tensor {_show(name)} loaded as {tensor.dtype} {_dims(tensor.shape)}, "
                             f"not the header's {entry.dtype} {_dims(entry.shape)} (file modified while read?)")
    logger.debug("read %d of %d tensors from %s", len(tensors), len(entries), label)
    return tensors, metadata


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice is an error (the library silently keeps one of them)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _read_raw_header(path: Path, label: str) -> tuple[bytes, int]:
    """The header bytes and the data section's size, with the header length checked against the file."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, a device would never end
            raise ValueError(f"{label}: not a regular file")
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{label}: {len(prefix)} bytes, too short for a safetensors file (empty or truncated)")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"{label}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file)")
            if n > info.st_size - 8:
                raise ValueError(f"{label}: header length {n} runs past the end of the file ({info.st_size} bytes)")
            raw = f.read(n)
    except OSError as err:
        raise ValueError(f"{label}: unreadable ({err.strerror or err})") from None
    if len(raw) != n:
        raise ValueError(f"{label}: file ends inside its header (truncated while read?)")
    return raw, info.st_size - 8 - n


def _metadata(value: Any, label: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{label}: __metadata__ is a JSON {type(value).__name__}, not an object")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ValueError(f"{label}: __metadata__ {_show(key)} is a {type(item).__name__}, not a string")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, info: Any, data_size: int, label: str) -> HeaderEntry:
    """One header entry, each field's type and range checked; the byte count must match dtype and shape."""
    where = f"{label}: tensor {_show(name)}"
    if not isinstance(info, dict):
        raise ValueError(f"{where} is described by a JSON {type(info).__name__}, not an object")
    fields = {"dtype", "shape", "data_offsets"}
    if set(info) != fields:
        missing, extra = sorted(fields - set(info)), sorted(set(info) - fields)
        raise ValueError(f"{where}: " + ("missing field(s) " + ", ".join(missing) if missing
                                         else "unknown field(s) " + _show(", ".join(extra))))
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise ValueError(f"{where}: dtype is a JSON {type(dtype).__name__}, not a string")
    if dtype not in DTYPES:
        kind = "a dtype torch cannot hold" if dtype in _KNOWN_UNLOADABLE else "not a safetensors dtype"
        raise ValueError(f"{where}: dtype {_show(dtype)} is {kind}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape {_brief(shape)} is not a list of non-negative integers")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{where}: shape has {len(shape)} dimensions, more than {MAX_NDIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise ValueError(f"{where}: data_offsets {_brief(offsets)} is not [begin, end] non-negative integers")
    begin, end = offsets
    if begin > end:
        raise ValueError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    if end > data_size:
        raise ValueError(f"{where}: data_offsets [{begin}, {end}] run past the {data_size}-byte data section "
                         "(truncated or corrupt file)")
    bits = _BITS[dtype]
    numel = _numel(shape, limit=8 * data_size // bits + 1)
    if numel is None or numel * bits != (end - begin) * 8:
        claimed = "more bytes than the file holds" if numel is None else (
            f"{numel * bits / 8:.1f}".removesuffix(".0") + " bytes")
        raise ValueError(f"{where}: shape {_dims(shape)} of {dtype} needs {claimed}, but data_offsets "
                         f"[{begin}, {end}] span {end - begin}")
    if bits == 4 and (not shape or shape[-1] % 2):
        raise ValueError(f"{where}: an F4 tensor needs an even last dimension, shape is {_dims(shape)}")
    return HeaderEntry(dtype, tuple(shape), begin, end)


def _numel(shape: Iterable[int], limit: int) -> int | None:
    """The element count, or None once it exceeds ``limit`` (never a product of many huge ints)."""
    dims = list(shape)
    if 0 in dims:
        return 0
    n = 1
    for d in dims:
        n *= d
        if n > limit:
            return None
    return n


def _check_layout(entries: Mapping[str, HeaderEntry], data_size: int, label: str) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing after the last (as the library)."""
    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            problem = "overlaps" if entry.begin < position else "leaves a gap after"
            other = f"tensor {_show(previous)}" if previous is not None else "the start of the data"
            raise ValueError(f"{label}: tensor {_show(name)} (data_offsets [{entry.begin}, {entry.end}]) "
                             f"{problem} {other}")
        position, previous = entry.end, name
    if position != data_size:
        raise ValueError(f"{label}: tensors cover {position} of the data section's {data_size} bytes "
                         "(trailing bytes: corrupt or padded file)")


def _select(entries: Mapping[str, HeaderEntry], expected: Expected | None, allow_unknown: bool,
            label: str) -> list[str]:
    """The names to load, after checking every listed tensor against its spec."""
    if expected is None:
        return list(entries)
    spec_of = expected.get if isinstance(expected, Mapping) else expected
    wanted, unknown = [], []
    for name, entry in entries.items():
        spec = spec_of(name)
        if spec is None:
            unknown.append(name)
            continue
        _check_spec(name, entry, spec, label)
        wanted.append(name)
    if unknown and not allow_unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise ValueError(f"{label}: unexpected tensor {_show(unknown[0])}{more} (not one this file should hold)")
    if isinstance(expected, Mapping):
        missing = [name for name, spec in expected.items() if spec.required and name not in entries]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ValueError(f"{label}: missing tensor {_show(missing[0])}{more}")
    return wanted


def _check_spec(name: str, entry: HeaderEntry, spec: TensorSpec, label: str) -> None:
    if spec.dtypes is not None and entry.dtype not in spec.dtypes:
        raise ValueError(f"{label}: tensor {_show(name)} has dtype {entry.dtype}, expected "
                         f"{' or '.join(spec.dtypes)}")
    if spec.shape is not None and (
        len(spec.shape) != len(entry.shape)
        or any(want is not None and want != got for want, got in zip(spec.shape, entry.shape, strict=True))
    ):
        want = "[" + ", ".join("any" if d is None else str(d) for d in spec.shape) + "]"
        raise ValueError(f"{label}: tensor {_show(name)} has shape {_dims(entry.shape)}, expected {want}")


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with memory of its own (a view into an mmap of the file would change with the file)."""
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        return tensor.clone()
    return tensor


def _show(value: str) -> str:
    """``value`` quoted, cut to a readable length: names and values come from a file that may be hostile."""
    return repr(value) if len(value) <= _SHOW else repr(value[:_SHOW]) + f"... ({len(value)} characters)"


def _dims(shape: Iterable[int]) -> str:
    """A shape for a message, at most 8 dimensions of it (a hostile header may list 64 huge ones)."""
    dims = list(shape)
    shown = ", ".join(str(d) for d in dims[:8])
    return f"[{shown}, ... ({len(dims)} dimensions)]" if len(dims) > 8 else f"[{shown}]"


def _brief(value: Any) -> str:
    """A short rendering of a JSON value from the header (never a deep or huge structure echoed whole)."""
    flat = isinstance(value, list) and len(value) <= 8 and all(isinstance(v, (int, float, str)) for v in value)
    if flat or isinstance(value, (int, float)):
        return _show(json.dumps(value)).strip("'\"")
    if isinstance(value, list):
        return f"(a list of {len(value)} items)"
    return f"(a JSON {type(value).__name__})"
