"""Atomic writes: the whole file or the old one, never a part, with the permissions of a plain file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vidquant.atomic import atomic_path


def test_written_files_get_plain_permissions_not_mkstemps(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    with atomic_path(tmp_path / "artifact") as tmp:
        tmp.write_text("y")
    assert os.stat(tmp_path / "artifact").st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
