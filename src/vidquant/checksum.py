"""Checksums of files, tensors and JSON manifests: one definition for every artifact.

A manifest is "sealed" by a sha256 of its own canonical JSON (``sort_keys``, the seal field left out), so an
edited field (``weight_format: hif4 -> int4``) is refused on load instead of being applied. This is an
integrity check against corruption and hand edits, not a signature.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

SEAL = "manifest_sha256"


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so a large file never sits in memory whole."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    except OSError as err:
        raise ValueError(f"{path}: unreadable ({err.strerror or err})") from None
    return digest.hexdigest()


def hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Feed one tensor's shape, dtype and bytes to ``digest`` (one tensor of host memory at most)."""
    t = tensor.detach()
    digest.update(f"|{tuple(t.shape)}|{t.dtype}|".encode())
    digest.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of one tensor's shape, dtype and bytes."""
    digest = hashlib.sha256()
    hash_tensor(digest, tensor)
    return digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors in name order: independent of how a file lays them out."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(f"\n{name}".encode())
        hash_tensor(digest, tensors[name])
    return digest.hexdigest()


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in manifest.items() if k != SEAL}, sort_keys=True).encode()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its own checksum added under ``SEAL``."""
    return {**manifest, SEAL: hashlib.sha256(_canonical(manifest)).hexdigest()}


def check_seal(manifest: Mapping[str, Any], where: str | Path) -> None:
    """Raise a ValueError naming ``where`` unless ``manifest`` carries a matching seal."""
    if manifest.get(SEAL) != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise ValueError(f"{where}: its checksum ({SEAL}) does not match its content: the file was edited or "
                         "corrupted; recreate it with vidquant")
