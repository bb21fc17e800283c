"""quant: FP32/FP16/INT8 inference artifacts for speech models, calibrated on real speech."""

__version__ = "0.1.0"
