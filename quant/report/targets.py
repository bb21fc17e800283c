"""The project's goals as data: accuracy budgets per model and precision and speed targets."""

from __future__ import annotations

# How much a precision may lose against FP32, in the primary metric's display units (PESQ-WB, CER points).
ACCURACY_BUDGETS: dict[tuple[str, str], float] = {
    ("dpcrn", "int8"): 0.05, ("dpcrn", "fp16"): 0.01, ("dpcrn-stream", "int8"): 0.05,
    ("dpcrn-stream", "fp16"): 0.01, ("wenet", "int8"): 0.3, ("wenet", "fp16"): 0.05,
}
# (model, graph, largest INT8 / FP32 latency ratio, goal name) on ONNX Runtime, 1 thread
SPEED_RATIO_GOALS: tuple[tuple[str, str, float, str], ...] = (
    ("dpcrn-stream", "dpcrn_stream", 0.6, "streaming DPCRN INT8 / FP32 per frame (ORT)"),
    ("dpcrn", "dpcrn", 0.55, "offline DPCRN INT8 / FP32 (ORT)"),
)
# WeNet encoder INT8 / FP32 latency ratio at these batch sizes (ORT)
ENCODER_BATCH_GOALS: tuple[int, ...] = (1, 8)
ENCODER_BATCH_RATIO = 0.5
# every ORT row's speed-up over PyTorch eager
EAGER_SPEEDUP = 2.0
