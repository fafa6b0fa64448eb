"""vidquant.safeio: a corrupt or hostile safetensors file gives a ValueError naming it, never a raw error."""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from vidquant import safeio
from vidquant.checksum import file_sha256
from vidquant.safeio import MAX_HEADER_BYTES, TensorSpec, read_header, read_safetensors

TENSORS = {
    "a/absmax": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1.5, -2.0, 3.25, 0.0], dtype=torch.bfloat16),
    "c": torch.tensor([7, -8], dtype=torch.int64),
    "empty": torch.zeros(0, 4, dtype=torch.float16),
}
METADATA = {"vidquant": json.dumps({"format_version": 1}), "note": "ok"}
EXPECTED = {
    "a/absmax": TensorSpec("F32", (2, 3)),
    "b": TensorSpec(torch.bfloat16, (None,)),
    "c": TensorSpec(("I64", "I32"), (2,)),
    "empty": TensorSpec("F16", (0, 4)),
}


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A file laid out as safetensors: 8-byte little-endian header length, header, data (any of them wrong)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.fixture(scope="module")
def good_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "good.safetensors"
        save_file(TENSORS, str(path), metadata=METADATA)
        return path.read_bytes()


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One file path the fuzz tests overwrite for every example (hypothesis runs many per test call)."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp) / "stats.safetensors"


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]) for k in want
    )


def library_result(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (not a dict)


def check_fuzzed(path: Path, data: bytes) -> None:
    """ValueError, or exactly what the safetensors library reads from the same bytes, matching the specs."""
    path.write_bytes(data)
    try:
        tensors, metadata = read_safetensors(path, EXPECTED)
    except ValueError as err:
        assert str(path) in str(err)
        assert len(str(err)) < 1000
        return
    want_tensors, want_metadata = library_result(path)
    assert same(tensors, want_tensors)
    assert metadata == want_metadata
    for name, spec in EXPECTED.items():
        assert safeio._NAMES[tensors[name].dtype] in spec.dtypes


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "stats.safetensors"
    save_file(TENSORS, str(path), metadata=METADATA)
    tensors, metadata = read_safetensors(path, EXPECTED)
    assert same(tensors, TENSORS)
    assert metadata == METADATA
    tensors, _ = read_safetensors(path)  # no expectations: every tensor, header still checked
    assert same(tensors, TENSORS)
    entries, metadata = read_header(path)
    assert metadata == METADATA
    assert entries["a/absmax"].dtype == "F32" and entries["a/absmax"].shape == (2, 3)
    assert entries["b"].torch_dtype == torch.bfloat16
    assert tensors["a/absmax"].untyped_storage().nbytes() == tensors["a/absmax"].nbytes  # owns its memory


def test_callable_expected_and_optional(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file(TENSORS, str(path))
    tensors, metadata = read_safetensors(path, lambda name: TensorSpec() if name != "c" else None, allow_unknown=True)
    assert set(tensors) == {"a/absmax", "b", "empty"} and metadata == {}
    tensors, _ = read_safetensors(path, {**EXPECTED, "absent": TensorSpec(required=False)})
    assert set(tensors) == set(TENSORS)


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="this torch has no packed FP4 dtype")
def test_packed_fp4(tmp_path: Path) -> None:
    """F4 packs two values per torch element: the file's shape counts values, torch's last dimension is half."""
    path = tmp_path / "w.safetensors"
    packed = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    save_file({"w": packed}, str(path))
    entries, _ = read_header(path)
    assert entries["w"].shape == (2, 4) and entries["w"].torch_shape == (2, 2)
    tensors, _ = read_safetensors(path, {"w": TensorSpec("F4", (2, 4))})
    assert torch.equal(tensors["w"].view(torch.uint8), packed.view(torch.uint8))


def test_header_length_2_62(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "stats.safetensors", {}, length=2**62)
    with pytest.raises(ValueError, match=r"stats\.safetensors: header length 4611686018427387904 exceeds"):
        read_safetensors(path)


def test_header_length_past_end(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "stats.safetensors", {}, length=1000)
    with pytest.raises(ValueError, match="runs past the end of the file"):
        read_header(path)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_empty_or_short_file(tmp_path: Path, size: int) -> None:
    path = tmp_path / "stats.safetensors"
    path.write_bytes(b"\0" * size)
    with pytest.raises(ValueError, match=rf"stats\.safetensors: {size} bytes, too short"):
        read_safetensors(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.safetensors: unreadable"):
        read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):
        read_safetensors(tmp_path)
    with pytest.raises(ValueError, match="nope.bin: unreadable"):
        file_sha256(tmp_path / "nope.bin")


def refuse_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open the file with the safetensors library fail the test."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("safe_open called: tensors would have been loaded")

    monkeypatch.setattr(safeio, "safe_open", boom)


def test_huge_tensor_claim_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header claiming an 8 GiB tensor in a tiny file fails the offsets check; nothing is opened or allocated."""
    refuse_loading(monkeypatch)
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "evil": {"dtype": "F32", "shape": [2**31], "data_offsets": [4, 4 + 2**33]},
    }
    path = write_raw(tmp_path / "stats.safetensors", header, b"\0" * 4)
    with pytest.raises(ValueError, match=r"tensor 'evil': data_offsets \[4, 8589934596\] run past the 4-byte"):
        read_safetensors(path, {"a": TensorSpec("F32")}, allow_unknown=True)


def test_sparse_huge_extra_tensor_never_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consistent file (sparse, 8 GiB logically) with an extra tensor: refused, or skipped unread."""
    header = json.dumps({
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "evil": {"dtype": "F32", "shape": [2**31], "data_offsets": [4, 4 + 2**33]},
    }).encode()
    path = tmp_path / "stats.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\0" * 4)
        f.truncate(8 + len(header) + 4 + 2**33)  # a hole: no disk used
    with pytest.raises(ValueError, match="unexpected tensor 'evil'"):
        read_safetensors(path, {"a": TensorSpec("F32", (1,))})
    loaded: list[str] = []
    real = safeio.safe_open

    class Recording:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._inner = real(*args, **kwargs)

        def __enter__(self) -> Recording:
            self._file = self._inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            loaded.append(name)
            return self._file.get_tensor(name)

    monkeypatch.setattr(safeio, "safe_open", Recording)
    tensors, _ = read_safetensors(path, {"a": TensorSpec("F32", (1,))}, allow_unknown=True)
    assert set(tensors) == {"a"} and loaded == ["a"]


def test_unknown_tensor(tmp_path: Path) -> None:
    path = tmp_path / "stats.safetensors"
    save_file({**TENSORS, "extra": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match=r"stats\.safetensors: unexpected tensor 'extra'"):
        read_safetensors(path, EXPECTED)
    tensors, _ = read_safetensors(path, EXPECTED, allow_unknown=True)
    assert set(tensors) == set(EXPECTED)


def test_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "stats.safetensors"
    save_file({k: v for k, v in TENSORS.items() if k != "c"}, str(path))
    with pytest.raises(ValueError, match="missing tensor 'c'"):
        read_safetensors(path, EXPECTED)


def test_dtype_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_loading(monkeypatch)
    path = tmp_path / "stats.safetensors"
    save_file({**TENSORS, "a/absmax": TENSORS["a/absmax"].double()}, str(path))
    with pytest.raises(ValueError, match=r"^.*stats\.safetensors: tensor 'a/absmax' has dtype F64, expected F32$"):
        read_safetensors(path, EXPECTED)
    with pytest.raises(ValueError, match=r"stats\.safetensors \(calibration statistics\): tensor 'a/absmax'"):
        read_safetensors(path, EXPECTED, what="calibration statistics")


def test_shape_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_loading(monkeypatch)
    path = tmp_path / "stats.safetensors"
    save_file({**TENSORS, "b": torch.ones(2, 2, dtype=torch.bfloat16)}, str(path))
    with pytest.raises(ValueError, match=r"tensor 'b' has shape \[2, 2\], expected \[any\]"):
        read_safetensors(path, EXPECTED)
    save_file({**TENSORS, "c": torch.ones(3, dtype=torch.int64)}, str(path))
    with pytest.raises(ValueError, match=r"tensor 'c' has shape \[3\], expected \[2\]"):
        read_safetensors(path, EXPECTED)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (b"\xff\xfe{}", b"", "header is not UTF-8"),
        (b"[1, 2]", b"", "header is a JSON list, not an object"),
        (b"{\"a\": " + b"[" * 200_000, b"", "header JSON is nested too deeply"),
        (b'{"a": 1' + b"1" * 5000 + b"}", b"", "header is not valid JSON|described by a JSON int"),
        (b'{"__metadata__": {"k": NaN}}', b"", "header is not valid JSON"),
        (b'{"__metadata__": {"k": 1}}', b"", "__metadata__ 'k' is a int, not a string"),
        (b'{"__metadata__": [1]}', b"", "__metadata__ is a JSON list"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
         b'"data_offsets": [0, 4]}}', b"\0" * 4, "header lists key 'a' twice"),
        ({"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, b"\0" * 3, "torch cannot hold"),
        ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "'F99' is not a safetensors"),
        ({"a": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype is a JSON int"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, r"shape \[-1\] is not a list"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "is not a list of non-neg"),
        ({"a": {"dtype": "F32", "shape": [[[1]]], "data_offsets": [0, 4]}}, b"\0" * 4, r"shape \(a list of 1"),
        ({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4, "65 dimensions"),
        ({"a": {"dtype": "F32", "shape": [2**40] * 60, "data_offsets": [0, 4]}}, b"\0" * 4, "more bytes than the file"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, "not \\[begin, end\\]"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "end before they begin"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, r"needs 8 bytes.*span 4"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "missing field.*data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4, "unknown field.*x"),
        ({"a": [1]}, b"", "tensor 'a' is described by a JSON list"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "leaves a gap after the start"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "cover 4 of the data section's 8"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "'b'.*overlaps tensor 'a'"),
        ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0" * 2, "needs 1.5 bytes"),
        ({"x" * 5000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4, r"x'\.\.\. \(5000 char"),
    ],
)
def test_malformed_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, header: dict | bytes, data: bytes,
                          message: str) -> None:
    refuse_loading(monkeypatch)
    path = write_raw(tmp_path / "stats.safetensors", header, data)
    with pytest.raises(ValueError, match=message) as info:
        read_safetensors(path)
    assert str(info.value).startswith(f"{path}: ") and len(str(info.value)) < 500


def test_tensor_spec_validation() -> None:
    assert TensorSpec(torch.float32).dtypes == ("F32",)
    assert TensorSpec(("BF16", torch.float16)).dtypes == ("BF16", "F16")
    with pytest.raises(ValueError, match="unknown dtype 'F99'"):
        TensorSpec("F99")
    with pytest.raises(ValueError, match="non-negative ints or None"):
        TensorSpec(shape=(2, -1))


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 5000)
    assert file_sha256(path, chunk_bytes=4096) == hashlib.sha256(path.read_bytes()).hexdigest()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_overwritten_bytes(good_bytes: bytes, scratch: Path, data: st.DataObject) -> None:
    buf = bytearray(good_bytes)
    header_end = 8 + int.from_bytes(good_bytes[:8], "little")
    in_header = data.draw(st.booleans())  # most flips should land in the header, where the parsing is
    upper = header_end if in_header else len(buf)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, upper - 1))
        buf[pos] = data.draw(st.integers(0, 255)) if data.draw(st.booleans()) else buf[pos] ^ (1 << data.draw(
            st.integers(0, 7)))
    check_fuzzed(scratch, bytes(buf))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_header_digits(good_bytes: bytes, scratch: Path, data: st.DataObject) -> None:
    """Digits rewritten: still JSON, so the shape, offset and length checks are what must catch it."""
    header_end = 8 + int.from_bytes(good_bytes[:8], "little")
    text = good_bytes[8:header_end].decode()
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    i = data.draw(st.sampled_from(digits))
    new = str(data.draw(st.one_of(st.integers(0, 20), st.integers(0, 2**70))))
    text = text[:i] + new + text[i + 1 :]
    raw = text.encode()
    check_fuzzed(scratch, struct.pack("<Q", len(raw)) + raw + good_bytes[header_end:])


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_truncated_and_length(good_bytes: bytes, scratch: Path, data: st.DataObject) -> None:
    buf = good_bytes[: data.draw(st.integers(0, len(good_bytes)))]
    if data.draw(st.booleans()) and len(buf) >= 8:
        length = data.draw(st.one_of(st.integers(0, len(good_bytes)), st.integers(0, 2**64 - 1),
                                     st.sampled_from([2**62, 2**63, 2**64 - 1, MAX_HEADER_BYTES + 1])))
        buf = struct.pack("<Q", length) + buf[8:]
    check_fuzzed(scratch, buf)
