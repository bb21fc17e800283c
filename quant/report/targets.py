"""The reference models' speed targets as data (the goals of the issues that set them, keyed by the reference models'
names; a model without an entry simply has no speed goal). Accuracy budgets live in each model spec ([defaults]
budgets) and travel in the results rows."""

from __future__ import annotations

# (model, graph, largest INT8 / FP32 latency ratio, goal name) on ONNX Runtime, 1 thread: issue targets for the
# shipped reference models
SPEED_RATIO_GOALS: tuple[tuple[str, str, float, str], ...] = (
    ("dpcrn-stream", "dpcrn_stream", 0.6, "streaming DPCRN INT8 / FP32 per frame (ORT)"),
    ("dpcrn", "dpcrn", 0.55, "offline DPCRN INT8 / FP32 (ORT)"),
)
# WeNet encoder INT8 / FP32 latency ratio at these batch sizes (ORT): an issue target for the reference `wenet`
ENCODER_BATCH_GOALS: tuple[int, ...] = (1, 8)
ENCODER_BATCH_RATIO = 0.5
# every ORT row's speed-up over PyTorch eager
EAGER_SPEEDUP = 2.0
