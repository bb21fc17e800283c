"""Atomic writes: write to a temp file in the same folder, fsync, then rename, so no reader sees a half-written file."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Concatenate, ParamSpec, TypeVar

from quant.errors import FileAccessError

_P = ParamSpec("_P")
_R = TypeVar("_R")
PathArg = str | os.PathLike[str]


def _reports(action: str) -> Callable[[Callable[Concatenate[PathArg, _P], _R]], Callable[Concatenate[PathArg, _P], _R]]:
    """Decorator: an OSError while `action`-ing the path given as first argument (read-only or full disk, a folder
    where a file is expected, a missing file) becomes a one-line FileAccessError naming that path, not the temp
    file's name the OSError carries."""

    def decorate(function: Callable[Concatenate[PathArg, _P], _R]) -> Callable[Concatenate[PathArg, _P], _R]:
        @functools.wraps(function)
        def wrapper(path: PathArg, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                if action == "write" and Path(path).is_dir():  # before any work: os.replace would fail only at the end
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
                return function(path, *args, **kwargs)
            except OSError as error:
                raise FileAccessError.from_os_error(error, action, path) from error

        return wrapper

    return decorate


@_reports("write")
def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _default_file_mode())  # mkstemp makes 0600; outputs are ordinary shared files
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@_reports("write")
def temp_path_beside(path: str | os.PathLike[str]) -> Path:
    """A fresh temp file name next to `path`, for tools that insist on writing a file themselves (then os.replace)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp_name)


@_reports("read")
def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
