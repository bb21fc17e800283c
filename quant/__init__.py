"""quant: FP32/FP16/INT8 inference artifacts for speech models, calibrated on real speech."""

__version__ = "0.1.0"
from quant.spec import load_spec  # noqa: E402,F401  (the documented entry point: quant.load_spec(name or path))
