"""Plain PyTorch models (DPCRN, WeNet-style conformer) and their checked ONNX export (quant.models.export)."""
