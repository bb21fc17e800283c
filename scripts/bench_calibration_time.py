"""Calibration wall time on the same feeds, side by side in one process: quant's range collection (one pass over the
augmented graph: minmax, and percentile / entropy with their |x| histograms) against ONNX Runtime's MinMax calibrator
(one pass over its augmented graph of ReduceMin/ReduceMax outputs). Feeds are materialised once before any clock
starts, so reading audio (and a streaming roll) is not timed. The methods alternate within each round, so a change
of machine load hits all of them; the 1-min load average is printed before every run, with the run's wall time and
the CPU time of this process (all its threads: ONNX Runtime's MinMax session uses every core, and so does quant with
the default --threads), which a loaded machine inflates less. The summary gives each method's medians over the
rounds and their ratios to ORT MinMax's. quant runs the graph on the next feed while the statistics of the previous
one update (RangeOptions.overlap); --sequential also times percentile without that overlap. quant runs the feeds as
`quant calibrate` does (the offline DPCRN one 9 s segment at a time, for memory), and ORT MinMax gets exactly those
batches; where that splits the reader's batches, "ORT MinMax as fed" also times ORT on the reader's batches.

    python scripts/bench_calibration_time.py dpcrn /tmp/x/dpcrn.onnx --limit 16 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from quant.calib.ranges import RangeOptions, collect_ranges, split_feed
from quant.tasks import FeedOptions, task_for
from quant.tasks.calibration import spec_range_options
from quant.timing import reference_graph

Feeds = list[dict[str, np.ndarray]]


class _Reader:
    """ORT's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Feeds) -> None:
        self._items: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def ort_minmax(onnx_path: Path, feeds: Feeds) -> Any:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory() as work:
        calibrator = create_calibrator(str(onnx_path), None, augmented_model_path=str(Path(work) / "aug.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(_Reader(feeds))
        return calibrator.compute_data()


def contenders(onnx_path: Path, feeds: Feeds, quiet: RangeOptions, sequential: bool) -> dict[str, Callable[[], Any]]:
    def quant(method: str, options: RangeOptions) -> Callable[[], Any]:
        return lambda: collect_ranges(onnx_path, feeds, method, options)

    runs = {f"quant {method}": quant(method, quiet) for method in ("minmax", "percentile", "entropy")}
    if sequential:  # the graph run and the statistics updates one after the other, as before the overlap
        runs["quant percentile seq"] = quant("percentile", replace(quiet, overlap=False))
    # ORT gets the very batches quant runs; when quant splits the reader's batches, also the reader's batches
    batches: Feeds = [dict(part) for feed in feeds for part in split_feed(feed, quiet.max_batch)]
    runs["ORT MinMax"] = lambda: ort_minmax(onnx_path, batches)
    if len(batches) != len(feeds):
        runs["ORT MinMax as fed"] = lambda: ort_minmax(onnx_path, feeds)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="dpcrn | dpcrn-stream | wenet-encoder (the shipped graph whose calibration feeds "
                                      "are used)")
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--limit", type=int, default=4, help="calibration utterances (default 4)")
    parser.add_argument("--rounds", type=int, default=1, help="times each method runs, alternating (default 1)")
    parser.add_argument("--sequential", action="store_true",
                        help="also time quant percentile without overlapping graph runs and statistics updates")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="quant's threads (default: every CPU, as ONNX Runtime's MinMax session uses)")
    args = parser.parse_args()
    spec, graph = reference_graph(args.model)  # the shipped spec's calibration feeds of that graph
    feeds = [dict(f) for f in task_for(spec).calibration_feeds(
        graph.role, options=FeedOptions(limit=args.limit, graphs={graph.role: args.onnx}))]
    # quant as `quant calibrate` runs it (the offline DPCRN one 9 s segment at a time); ORT gets the feeds as they are
    quiet = spec_range_options(spec, RangeOptions(progress=False, threads=args.threads))
    runs = contenders(args.onnx, feeds, quiet, args.sequential)
    print(f"{len(feeds)} feeds, {args.rounds} round(s), {os.cpu_count()} CPUs, quant threads {args.threads}, "
          f"quant batches of at most {quiet.max_batch or 'every'} item(s)")
    wall: dict[str, list[float]] = {label: [] for label in runs}
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    for round_number in range(1, args.rounds + 1):
        order = list(runs) if round_number % 2 else list(reversed(runs))  # alternate who goes first
        for label in order:
            load = os.getloadavg()[0]
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[label]()
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
            print(f"round {round_number}  {label:<20} wall {wall[label][-1]:7.1f} s  cpu {cpu[label][-1]:7.1f} s  "
                  f"(load average before {load:.2f})", flush=True)
    wall_ref, cpu_ref = statistics.median(wall["ORT MinMax"]), statistics.median(cpu["ORT MinMax"])
    print(f"\nmedians over {args.rounds} round(s), load average now {os.getloadavg()[0]:.2f}")
    for label in runs:
        wall_s, cpu_s = statistics.median(wall[label]), statistics.median(cpu[label])
        print(f"{label:<20} wall {wall_s:7.1f} s ({wall_s / wall_ref:4.2f}x ORT MinMax)  "
              f"cpu {cpu_s:7.1f} s ({cpu_s / cpu_ref:4.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
