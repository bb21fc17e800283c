import json
import os
import stat
from pathlib import Path

import pytest

from quant.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file


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
