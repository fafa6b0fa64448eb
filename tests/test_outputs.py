"""Output folders: nothing foreign is touched, files and links are refused, one process at a time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vidquant.outputs import LOCK_FILE, check_output, locked_output

OWNED = ("manifest.json", "tensors.safetensors")


def test_absent_empty_or_own_folders_are_accepted(tmp_path: Path) -> None:
    assert check_output(tmp_path / "new", OWNED, "state") == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", OWNED, "state")
    own = tmp_path / "own"
    own.mkdir()
    for name in (*OWNED, LOCK_FILE, ".tensors.safetensors.abc.tmp"):
        (own / name).write_text("x")
    check_output(own, OWNED, "state")


def test_foreign_folders_files_and_links_are_refused_and_left_alone(tmp_path: Path) -> None:
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"not a state \(it holds notes.txt, sub\)"):
        check_output(user, OWNED, "state")
    with pytest.raises(ValueError, match="not a state"), locked_output(user, OWNED, "state"):
        pass
    assert sorted(p.name for p in user.rglob("*")) == ["data.csv", "notes.txt", "sub"]  # untouched, no lock file
    file = tmp_path / "file"
    file.write_text("keep")
    with pytest.raises(ValueError, match="not a folder"):
        check_output(file, OWNED, "state")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "empty-target", target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        check_output(link, OWNED, "state")
    assert file.read_text() == "keep" and link.is_symlink()


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    with locked_output(tmp_path / "out", OWNED, "state"):
        assert (tmp_path / "out" / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=f"in use by pid {os.getpid()}"), \
                locked_output(tmp_path / "out", OWNED, "state"):
            pass
    with locked_output(tmp_path / "out", OWNED, "state"):  # released on exit
        pass


def test_the_holder_removes_temp_files_an_interrupted_write_left(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".stats.safetensors.x1.tmp").write_bytes(b"partial")
    (out / "manifest.json").write_text("{}")
    with locked_output(out, OWNED, "state"):
        pass
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "manifest.json"]
