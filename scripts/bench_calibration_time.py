"""Calibration wall time on the same feeds, side by side in one process: quant's range collection (percentile: two
passes, amax then 2048-bin histograms; minmax: one pass) against ONNX Runtime's MinMax calibrator (one pass over its
augmented graph). Feeds are materialised once before any clock starts, so reading audio is not timed; the 1-min load
average is printed before and after.

    python scripts/bench_calibration_time.py dpcrn /tmp/x/dpcrn.onnx --limit 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from quant.calib.ranges import RangeOptions, collect_ranges
from quant.tasks import FeedOptions, task_for
from quant.timing import reference_graph


class _Reader:
    """ORT's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._items: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def ort_minmax(onnx_path: Path, feeds: list[dict[str, np.ndarray]]) -> tuple[float, Any]:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        calibrator = create_calibrator(str(onnx_path), None, augmented_model_path=str(Path(work) / "aug.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(_Reader(feeds))
        ranges = calibrator.compute_data()
        return time.perf_counter() - start, ranges


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="dpcrn | dpcrn-stream | wenet-encoder (the shipped graph whose calibration feeds are used)")
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--limit", type=int, default=4, help="calibration utterances (default 4)")
    args = parser.parse_args()
    spec, graph = reference_graph(args.model)  # the shipped spec's calibration feeds of that graph
    feeds = [dict(f) for f in task_for(spec).calibration_feeds(
        graph.role, options=FeedOptions(limit=args.limit, graphs={graph.role: args.onnx}))]
    print(f"{len(feeds)} feeds; load average before {os.getloadavg()[0]:.2f}")
    times = {}
    for label, run in (("quant percentile (2 passes)", lambda: collect_ranges(args.onnx, feeds, "percentile",
                                                                              RangeOptions(progress=False))),
                       ("quant minmax (1 pass)", lambda: collect_ranges(args.onnx, feeds, "minmax",
                                                                      RangeOptions(progress=False))),
                       ("ORT MinMax", lambda: ort_minmax(args.onnx, feeds))):
        start = time.perf_counter()
        run()
        times[label] = time.perf_counter() - start
        print(f"{label:<30}{times[label]:8.1f} s", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
