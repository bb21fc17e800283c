#!/usr/bin/env python3
"""Speed benchmark of every model, backend and precision in one run (the same as `quant bench`).

    python scripts/bench_speed.py [--quick] [--models dpcrn,wenet] [--backends ort,trt] [--threads 1,2] [--runs N]

Prints latency, RTF and the ratios against FP32 ONNX Runtime and PyTorch eager measured side by side in this run,
and writes engines/bench/results.{json,md,csv} and tradeoff.png.
"""

from __future__ import annotations

import sys

from quant.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
