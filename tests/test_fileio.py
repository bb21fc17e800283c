import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from quant import fileio
from quant.fileio import (
    atomic_folder, atomic_write_bytes, atomic_write_json, private_temp_dir, recover_folder, sha256_bytes, sha256_file,
    temp_path_beside,
)


def test_atomic_write_replaces_whole_file_with_shared_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temp files left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_sha256_file_matches_bytes(tmp_path: Path) -> None:
    target = atomic_write_bytes(tmp_path / "x", b"speech" * 1000)
    assert sha256_file(target) == sha256_bytes(b"speech" * 1000)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (what a killed run leaves in its temp names)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_removes_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    dead, live = dead_pid(), os.getppid()  # our parent (pytest's shell or runner) is alive
    stale = [tmp_path / f".out.json.{dead}-abc123.tmp", tmp_path / f".model.onnx.{dead}-x_9.tmp.onnx"]
    kept = [tmp_path / f".out.json.{live}-abc123.tmp", tmp_path / ".out.json.lock", tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_text("partial")
    (tmp_path / f".folder.{dead}-q1.tmp").mkdir()
    (tmp_path / f".folder.{dead}-q1.tmp" / "model.onnx").write_text("partial")
    atomic_write_json(tmp_path / "out.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json"] + [p.name for p in kept])


def test_temp_names_carry_the_owner_pid(tmp_path: Path) -> None:
    temp = temp_path_beside(tmp_path / "model.onnx")
    assert temp.name.startswith(f".model.onnx.{os.getpid()}-") and temp.name.endswith(".tmp.onnx")
    atomic_write_bytes(tmp_path / "x.bin", b"1")
    assert temp.exists()  # our own temp file is not anyone's leftover


@pytest.mark.parametrize("swap", ["exchange", "aside"])
def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    swap: str) -> None:
    if swap == "aside":  # where renameat2 cannot swap (other OS or filesystem): the rename-aside protocol
        monkeypatch.setattr(fileio, "_exchange", lambda first, second: False)
    target = tmp_path / "int8"
    with atomic_folder(target) as work:
        (work / "model.onnx").write_text("old")
        (work / "meta.json").write_text("old")
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as work:
            (work / "model.onnx").write_text("new")
            raise RuntimeError("build failed half-way")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"model.onnx": "old", "meta.json": "old"}
    with atomic_folder(target) as work:
        (work / "model.onnx").write_text("new")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"model.onnx": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]


def test_atomic_folder_recovers_from_a_kill_between_the_renames(tmp_path: Path) -> None:
    dead = dead_pid()
    target = tmp_path / "int8"
    aside, unfinished = tmp_path / f".int8.{dead}-0a1b.old", tmp_path / f".int8.{dead}-zz.tmp"
    aside.mkdir()
    (aside / "model.onnx").write_text("old")  # killed after moving the old folder aside, before moving the new in
    unfinished.mkdir()
    (unfinished / "model.onnx").write_text("new")
    recover_folder(target)
    assert [p.name for p in tmp_path.iterdir()] == ["int8"] and (target / "model.onnx").read_text() == "old"
    aside.mkdir()  # killed after moving the new folder in, before removing the old one
    recover_folder(target)
    assert [p.name for p in tmp_path.iterdir()] == ["int8"] and (target / "model.onnx").read_text() == "old"


def test_private_temp_dir_cleans_folders_of_dead_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead, live = dead_pid(), os.getppid()
    for pid in (dead, live):
        (tmp_path / f"quant-ranges-{pid}-abc").mkdir()
        (tmp_path / f"quant-ranges-{pid}-abc" / "augmented.onnx").write_text("x")
    (tmp_path / "quant-ranges-other").mkdir()
    with private_temp_dir("quant-ranges-") as work:
        assert work.parent == tmp_path and work.name.startswith(f"quant-ranges-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"quant-ranges-{live}-abc", "quant-ranges-other"])


def test_atomic_folder_through_a_symlink_replaces_the_folder_it_names(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_folder(tmp_path / "link") as work:
        (work / "model.onnx").write_text("new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.onnx").read_text() == "new"


def test_ensure_writable_folder_creates_the_folder_and_leaves_nothing_in_it(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    assert fileio.ensure_writable_folder(folder) == folder
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_ensure_writable_folder_names_the_folder_it_cannot_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def read_only(*args: object, **kwargs: object) -> object:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(kwargs.get("dir")))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(fileio.FileAccessError, match=f"cannot write {tmp_path}: the file system is read-only"):
        fileio.ensure_writable_folder(tmp_path)
