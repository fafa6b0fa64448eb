"""Output folders: a command writes only into a folder that is empty or its own, and one process at a time.

The rule for every command: never delete or move anything it did not create. So an ``--out`` that is a
file or a symlink is refused, and so is a non-empty folder holding anything the artifact does not own
(each artifact names its own files by glob patterns); a user's folder, or a run folder given to
`quantize`, is never touched. A lock file inside the folder (``fcntl.flock``, released by the kernel when
the process dies, so a kill -9 leaves no stale lock) keeps two runs from interleaving their stages.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

from . import dist

logger = logging.getLogger(__name__)

LOCK_FILE = ".vidquant.lock"
TEMP_PATTERNS = (".*.tmp",)  # `atomic.atomic_path` names: a crash leaves them, the next locked run removes them


def check_output(path: str | Path, owned: Iterable[str], what: str) -> Path:
    """``path`` as an output folder of ``what``: absent, empty, or holding only names matching ``owned``.

    Raises ValueError naming the path (and the first foreign entries) otherwise; a file or a symlink
    is refused whatever it points to. Nothing is created or changed.
    """
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"--out {path} is a symbolic link; give a real folder (nothing was changed)")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a folder; give a folder for the {what} (nothing was changed)")
    if path.is_dir():
        patterns = (*owned, LOCK_FILE, *TEMP_PATTERNS)
        foreign = sorted(e.name for e in path.iterdir() if not any(fnmatchcase(e.name, p) for p in patterns))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(f"--out {path} is a folder that is not a {what} (it holds {shown}); give an empty or "
                             f"new folder, or a {what} written by vidquant (nothing was changed)")
    return path


@contextmanager
def locked_output(path: str | Path, owned: Iterable[str], what: str) -> Iterator[Path]:
    """Check ``path`` (`check_output`), create it, and hold its lock for the block; remove our stale temp files.

    A second process on the same folder fails at once with "in use by pid N".
    """
    path = check_output(path, owned, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise ValueError(f"--out {path} is not writable ({err.strerror or err})") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"--out {path} is in use by pid {holder} (another vidquant command); wait for it to "
                             "finish or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_temp_files(path)
        yield path
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def locked_output_ranks(path: str | Path, owned: Iterable[str], what: str) -> Iterator[Path]:
    """`locked_output` for torchrun's ranks: rank 0 holds the lock (one job on the folder), the others only check
    the folder, so a rank never fails on the lock its own rank 0 holds; every rank enters the block once rank 0
    has created the folder and removed stale temp files. One process: `locked_output` itself."""
    if dist.world() == 1:
        with locked_output(path, owned, what) as held:
            yield held
        return
    with ExitStack() as stack:  # rank 0 takes the lock inside `on_main`, so its failure reaches every rank
        dist.on_main(lambda: str(stack.enter_context(locked_output(path, owned, what))))
        held = check_output(path, owned, what)
        dist.barrier()  # no rank writes into the folder before every rank has checked it
        yield held


def remove_temp_files(path: Path) -> None:
    """Delete the temporary files an interrupted atomic write left in ``path`` (we hold its lock, so no live
    writer of ours owns them)."""
    for entry in path.iterdir():
        if any(fnmatchcase(entry.name, p) for p in TEMP_PATTERNS) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            logger.info("removed %s, left by an interrupted write", entry)
