"""One exception hierarchy: every user-facing failure is a QuantError whose message says how to fix it.

The CLI turns a QuantError into one line on stderr and a non-zero exit, never a traceback.
"""

import errno


class QuantError(Exception):
    """Base of all errors quant reports to its user."""


class AudioError(QuantError):
    """An audio file is missing, empty, truncated, not audio, or holds non-finite samples."""


class ManifestError(QuantError):
    """A manifest line is malformed or points at a file that does not match its checksum."""


class ModelError(QuantError):
    """A model, its weights or its ONNX export is not what the caller expected."""


class CalibrationError(QuantError):
    """Calibration data or ranges are unusable."""


class CacheMismatch(QuantError):
    """A calibration cache exists but its key does not match the model, data, method or tool versions."""


class BackendUnavailable(QuantError):
    """A backend (TensorRT, pycuda, a GPU) is not installed or not usable here."""


class BuildError(QuantError):
    """Building an artifact (quantized ONNX, FP16 ONNX, TensorRT engine) failed."""


class ReportError(QuantError):
    """results.json is missing or malformed."""


class FileAccessError(QuantError):
    """A file or folder cannot be read or written: missing, read-only, no space left, a folder where a file is
    expected. The message names the path and says what to do; the OSError stays attached as __cause__."""

    @classmethod
    def from_os_error(cls, error: OSError, action: str, path: object = None) -> "FileAccessError":
        """`action`: what quant was doing ("write", "read"); `path`: the user's path (default: the error's own)."""
        target = path if path is not None else error.filename
        meaning, advice = _ERRNO_ADVICE.get(error.errno or 0, (error.strerror or str(error), ""))
        where = f" {target}" if target is not None else ""
        return cls(f"cannot {action}{where}: {meaning}" + (f"; {advice}" if advice else ""))


_ERRNO_ADVICE: dict[int, tuple[str, str]] = {  # errno -> (what it means, what the user can do)
    errno.ENOSPC: ("no space left on the device", "free some space or choose a folder on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose a folder on another disk"),
    errno.EROFS: ("the file system is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a path you may use, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you may use, or change its permissions"),
    errno.EISDIR: ("it is a folder, not a file", "give a file path (e.g. a file name inside that folder)"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("input/output error from the device", "check the disk"),
}
