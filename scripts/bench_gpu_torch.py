#!/usr/bin/env python3
"""GPU baseline: the PyTorch modules of the three reference models, eager, on CUDA, FP32 vs FP16, side by side.

    python scripts/bench_gpu_torch.py [--runs 200] [--stream-frames 1000] [--json OUT.json]

This is the reference a TensorRT engine on the same GPU should beat (TensorRT itself cannot be installed on this
project's machines). Times come from CUDA events around each call after warm-up; the streaming model is timed per
frame with its states fed back, as deployed. Prints latency statistics and the FP16/FP32 ratio per workload.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.features import FBANK_BINS, FREQ_BINS, SEGMENT_FRAMES  # noqa: E402
from quant.models.conformer import WenetEncoder, load_conformer  # noqa: E402
from quant.models.dpcrn import StreamingDPCRN, load_dpcrn  # noqa: E402

FBANK_FRAMES_PER_SECOND = 100


def time_cuda(call: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Milliseconds per call, measured with CUDA events (device time, synchronised per call)."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"runs": len(times), "min_ms": ordered[0], "p50_ms": statistics.median(ordered),
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))], "p99_ms": ordered[int(0.99 * (len(ordered) - 1))],
            "mean_ms": statistics.fmean(ordered), "max_ms": ordered[-1]}


def workloads(dtype: torch.dtype, device: torch.device, runs: int, frames: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    dpcrn = load_dpcrn().eval().to(device=device, dtype=dtype)
    stream = StreamingDPCRN.from_offline(load_dpcrn().eval()).eval().to(device=device, dtype=dtype)
    encoder = WenetEncoder(load_conformer().eval()).eval().to(device=device, dtype=dtype)
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for batch in (1, 8):
            mix = torch.randn(batch, FREQ_BINS, SEGMENT_FRAMES, 2, device=device, dtype=dtype)
            results[f"dpcrn 9 s segment, batch {batch}"] = stats(time_cuda(lambda: dpcrn(mix), runs, 10))
        states = [s.to(device=device, dtype=dtype) for s in stream.initial_states()]
        frame = torch.randn(1, FREQ_BINS, 1, 2, device=device, dtype=dtype)

        def step() -> None:
            out = stream(frame, *states)
            states[:] = list(out[1:])

        results["dpcrn-stream 16 ms frame"] = stats(time_cuda(step, frames, 50))
        for batch in (1, 8, 16):
            frames_in = int(2.5 * FBANK_FRAMES_PER_SECOND)
            speech = torch.randn(batch, frames_in, FBANK_BINS, device=device, dtype=dtype)
            lengths = torch.full((batch,), frames_in, device=device, dtype=torch.int32)
            results[f"wenet encoder 2.5 s, batch {batch}"] = stats(time_cuda(lambda: encoder(speech, lengths), runs, 10))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--stream-frames", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch; this baseline needs one", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    by_dtype = {name: workloads(dtype, device, args.runs, args.stream_frames)
                for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16))}
    gpu = torch.cuda.get_device_name(device)
    print(f"PyTorch {torch.__version__} eager on {gpu}; CUDA-event times per call after warm-up")
    print(f"{'workload':36s} {'fp32 p50 ms':>12s} {'fp32 mean':>10s} {'fp16 p50 ms':>12s} {'fp16 mean':>10s} {'fp16/fp32':>9s}")
    for name, fp32 in by_dtype["fp32"].items():
        fp16 = by_dtype["fp16"][name]
        print(f"{name:36s} {fp32['p50_ms']:12.3f} {fp32['mean_ms']:10.3f} {fp16['p50_ms']:12.3f} "
              f"{fp16['mean_ms']:10.3f} {fp16['mean_ms'] / fp32['mean_ms']:8.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "results": by_dtype}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
