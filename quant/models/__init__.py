"""Plain PyTorch models (DPCRN, WeNet-style conformer); their checked ONNX export is quant.artifacts.export."""
