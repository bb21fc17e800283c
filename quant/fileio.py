"""Atomic writes: write to a temp file in the same folder, fsync, then rename, so no reader sees a half-written file.

Every temp item quant makes carries its owner's pid in its name (`.NAME.PID-RANDOM.tmp[.ext]`, or `PREFIXPID-RANDOM`
for work folders in the system temp dir), so a later run removes what a killed run left behind without touching the
temp items of a process that is still running. Folders are produced whole the same way (`atomic_folder`): built in a
temp sibling, then swapped into place in one rename (see replace_folder), the previous folder removed after.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Concatenate, Iterator, ParamSpec, TypeVar

from quant.errors import FileAccessError

log = logging.getLogger(__name__)

# `.NAME.PID-RANDOM.tmp[.ext]` (a temp file or folder) and `.NAME.PID-RANDOM.old` (a folder moved aside)
_OWNED_ITEM = re.compile(r"^\.(?P<base>.+)\.(?P<pid>\d+)-(?P<rand>[A-Za-z0-9_]+)\.(?P<kind>tmp|old)(\.[A-Za-z0-9_]+)?$")



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
    remove_stale_temps(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=target.parent)
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
    return 0o666 & ~_umask()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@_reports("write")
def temp_path_beside(path: str | os.PathLike[str]) -> Path:
    """A fresh temp file name next to `path`, for tools that insist on writing a file themselves (then os.replace)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".tmp" + target.suffix,
                                    dir=target.parent)
    os.close(fd)
    return Path(tmp_name)


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-"


# ------------------------------------------------------------------------------------------------ whole folders


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; when the block succeeds it replaces `path` whole, when it fails (or
    the process dies) `path` keeps its previous content, and the next call removes what was left behind."""
    target = Path(os.path.realpath(path))  # a symlink keeps pointing at the folder; "." has a name to rename
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    work = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    try:
        yield work
        os.chmod(work, 0o777 & ~_umask())  # mkdtemp makes 0700; artifact folders are ordinary shared folders
        replace_folder(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`, replacing a `target` folder. Where Linux can, the two are swapped in one atomic step
    (renameat2 RENAME_EXCHANGE) and the old folder, now at the temp name, is removed. Elsewhere the old folder is
    renamed aside first and removed last: a kill in between leaves it aside, and recover_folder puts it back."""
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)
        return
    aside = target.with_name(f"{_temp_prefix(target.name)}{secrets.token_hex(4)}.old")
    try:
        os.rename(target, aside)
        moved_aside = True
    except FileNotFoundError:
        moved_aside = False
    os.rename(new, target)
    if moved_aside:
        shutil.rmtree(aside, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically; False when `second` is missing or the OS / filesystem cannot swap."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(second))


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # no C library to load (not a POSIX system)
        return None


def recover_folder(target: Path) -> None:
    """Undo a replace_folder that a dead process left half-way: its aside folder goes back to `target` when `target`
    is missing, else it is removed; its unfinished temp folders are removed."""
    for entry in _entries(target.parent):
        match = _OWNED_ITEM.match(entry.name)
        if match is None or match["kind"] != "old" or match["base"] != target.name or _alive(int(match["pid"])):
            continue
        if not target.exists():
            log.warning("%s: restoring the previous folder that a killed run had moved aside", target)
            os.rename(entry, target)
        else:
            _remove(entry)
    remove_stale_temps(target.parent)


# ------------------------------------------------------------------------------------------------ leftovers


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files and folders in `folder` whose owning process is gone (a run killed while writing)."""
    removed = []
    for entry in _entries(Path(folder)):
        match = _OWNED_ITEM.match(entry.name)
        if match is not None and match["kind"] == "tmp" and not _alive(int(match["pid"])):
            _remove(entry)
            removed.append(entry)
    if removed:
        log.info("removed %d temp items left by killed runs in %s", len(removed), folder)
    return removed


def ensure_writable_folder(folder: str | os.PathLike[str]) -> Path:
    """Fail early, in one line, when files cannot be created in `folder` (read-only file system, no permission):
    before a run's minutes of work rather than at its end. Creates the folder; leaves nothing else in it."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix("write-probe"), suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise FileAccessError.from_os_error(error, "write", path) from error
    return path


@contextmanager
def private_temp_dir(prefix: str) -> Iterator[Path]:
    """A work folder in the system temp dir named PREFIX<pid>-RANDOM, removed on exit; folders of the same prefix
    whose process is gone are removed first (tempfile.TemporaryDirectory cannot clean up after a kill -9)."""
    parent = Path(tempfile.gettempdir())
    owned = re.compile(re.escape(prefix) + r"(?P<pid>\d+)-[A-Za-z0-9_]+$")
    for entry in _entries(parent):
        match = owned.match(entry.name)
        if match is not None and not _alive(int(match["pid"])):
            _remove(entry)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-", dir=parent) as work:
        yield Path(work)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a zombie counts: its parent has not reaped it yet)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:  # missing or unreadable: nothing to clean
        return []


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        try:
            entry.unlink()
        except OSError as error:  # raced with another cleaner, or not ours to remove
            log.debug("could not remove %s: %s", entry, error)


# ------------------------------------------------------------------------------------------------ hashes


@_reports("read")
def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
