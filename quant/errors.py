"""One exception hierarchy: every user-facing failure is a QuantError whose message says how to fix it.

The CLI turns a QuantError into one line on stderr and a non-zero exit, never a traceback.
"""


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
