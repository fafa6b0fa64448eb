"""Readers never see half a file: every artifact is written to a temporary sibling, then renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write, renamed onto ``path`` when the block succeeds, else removed.

    Its name ends in ``.tmp``, so nothing that globs for the real suffix (VBench's ``*.mp4``) takes it. The
    result gets the permissions of a plainly created file (0666 less the umask), not mkstemp's private 0600,
    so every artifact of a folder is readable alike.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_umask() -> int:
    """The process umask (reading it means setting it, so it is read once, at import, and restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
