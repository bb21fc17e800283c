"""Wall-clock of calibration and evaluation on a local Ray instance with 1 vs 2 worker CPUs (and in-process).

    quant export dpcrn -o /tmp/dpcrn && python scripts/bench_executor.py /tmp/dpcrn/dpcrn.onnx --calib 6 --eval 6

Each configuration runs the same shards (calibration: both range passes of the offline DPCRN on the first --calib
utterances of se_calib, one 9 s segment per feed; evaluation: the dpcrn spec's task evaluation, PESQ/STOI/SI-SDR on
the first --eval utterances of se_test, one utterance per shard through quant.tasks.sharded as `quant evaluate` and
`quant run --executor ray` run it; in-process: task.evaluate) and must give the same answer (checked); Ray start-up
is not timed, per-worker session creation and the model's trip through the object store are.
On a machine whose cores are shared with other work, the ratio measures the cores you actually got.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from quant.calib.ranges import RangeOptions, collect_ranges
from quant.calib.readers import AudioSet, OfflineSegmentReader
from quant.calib.sharded import collect_ranges_sharded
from quant.executor import Executor, RayExecutor
from quant.paths import calib_data_dir
from quant.spec import load_spec
from quant.tasks import task_for
from quant.tasks.sharded import evaluate_sharded


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the offline DPCRN export (quant export dpcrn -o DIR)")
    parser.add_argument("--calib", type=int, default=6, help="calibration utterances (se_calib)")
    parser.add_argument("--eval", type=int, default=6, help="evaluation utterances (se_test)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    calib = calib_data_dir() / "se_calib" / "manifest.jsonl"
    test = calib_data_dir() / "se_test" / "manifest.jsonl"
    source = OfflineSegmentReader(AudioSet.from_manifest(calib, args.calib), batch_size=1)  # 9 s segments
    options = RangeOptions(progress=False, max_batch=1)  # one segment at a time bounds memory (as the spec path)

    def calibrate(executor: Executor | None) -> Any:
        if executor is None:
            return collect_ranges(args.model, source, "percentile", options)
        return collect_ranges_sharded(args.model, source, "percentile", options, executor)

    spec = load_spec("dpcrn")

    def evaluate(executor: Executor | None) -> Any:
        if executor is None:
            return task_for(spec).evaluate({"enhancer": args.model}, str(test), args.eval)
        return evaluate_sharded(spec, {"enhancer": args.model}, test, args.eval, executor, shards=args.eval)

    load_start = os.getloadavg()[0]
    rows: dict[str, dict[str, float]] = {}
    answers: dict[str, list[Any]] = {"calibration": [], "evaluation": []}
    for label, make in [("in-process", None), ("ray 1 CPU", 1), ("ray 2 CPUs", 2)]:
        executor: Executor | None = None
        if make is not None:
            ray.init(num_cpus=make, include_dashboard=False, log_to_driver=False)
            executor = RayExecutor()
        calib_s, ranges = timed(lambda: calibrate(executor))
        eval_s, result = timed(lambda: evaluate(executor))
        answers["calibration"].append(ranges)
        answers["evaluation"].append(result)
        rows[label] = {"calibration": calib_s, "evaluation": eval_s}
        if make is not None:
            ray.shutdown()
    for stage, results in answers.items():
        assert all(item == results[0] for item in results), f"{stage}: the executors disagree"
    print(f"offline DPCRN, calibration {args.calib} utterances (percentile, 1 pass), evaluation {args.eval} "
          f"utterances; os.cpu_count() {os.cpu_count()}, 1-min load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"{'':12s} {'calibration s':>14s} {'evaluation s':>13s}")
    for label, row in rows.items():
        print(f"{label:12s} {row['calibration']:14.1f} {row['evaluation']:13.1f}")
    one, two = rows["ray 1 CPU"], rows["ray 2 CPUs"]
    print(f"ratio 1 CPU / 2 CPUs: calibration {one['calibration'] / two['calibration']:.2f}x, evaluation "
          f"{one['evaluation'] / two['evaluation']:.2f}x (results identical in every configuration)")


if __name__ == "__main__":
    main()
