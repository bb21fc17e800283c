"""How much a trt-sim INT8 verdict moves when the calibration moves by a hair: the TensorRT Q/DQ model of an INT8 build
evaluated as built and with every per-tensor activation scale multiplied by 1 +- JITTER (per-channel weight scales
untouched), each paired with FP32 on the same test utterances (change, 95 % bootstrap interval over utterances).

    python scripts/trt_sim_jitter.py dpcrn-stream engines/dpcrn_stream/int8/model_trt_qdq.onnx \
        --fp32 engines/export/dpcrn-stream/dpcrn_stream.onnx --jitter 0.001

The bootstrap interval of a verdict covers the sampling of test utterances, not the calibration: two calibrations
whose thresholds differ by less than one histogram bin are equally valid, so when the change moves by about the
interval's half-width under a 0.1 % jitter, one calibration's number cannot place the model on either side of a
budget it is near. Measured on dpcrn-stream (README, Calibration on real speech).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from quant import load_spec
from quant.backends import open_runner
from quant.eval.stats import PerUtterance, paired_change
from quant.tasks import task_for


def scaled_activations(source: Path, target: Path, factor: float) -> int:
    """Write `source` with every scalar Q/DQ scale (per-tensor activations) multiplied by `factor`; returns how many."""
    model = onnx.load(str(source))
    scales = {node.input[1] for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")}
    changed = 0
    for initializer in model.graph.initializer:
        if initializer.name in scales:
            value = numpy_helper.to_array(initializer)
            if value.size == 1:
                initializer.CopyFrom(numpy_helper.from_array((value * factor).astype(value.dtype), initializer.name))
                changed += 1
    onnx.save(model, str(target))
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="a single-graph spec (dpcrn, dpcrn-stream) or spec file")
    parser.add_argument("qdq", type=Path, help="model_trt_qdq.onnx of an INT8 build of that graph")
    parser.add_argument("--fp32", type=Path, required=True, help="the FP32 ONNX the build was made from")
    parser.add_argument("--jitter", type=float, default=0.001, help="relative scale change (default 0.001)")
    parser.add_argument("--limit", type=int, help="first N test utterances (default all)")
    parser.add_argument("--metric", default="pesq_wb")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    graph = spec.graphs[0]
    fp32 = args.fp32
    task = task_for(spec)
    memo: dict[str, Any] = {}  # the test pairs and noisy scores, loaded once

    def scores(path: Path, backend: str) -> PerUtterance:
        result = task.evaluate({graph.role: open_runner(path, backend, 1)}, None, args.limit, 1, memo)
        columns = result.per_utterance_columns()
        return PerUtterance.values(columns["ids"], columns[args.metric])

    reference = scores(fp32, "ort")
    print(f"FP32 {args.metric} {reference.value:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for factor in (1.0, 1.0 + args.jitter, 1.0 - args.jitter):
            path = args.qdq
            if factor != 1.0:
                path = Path(work) / f"scaled_{factor}.onnx"
                scaled_activations(args.qdq, path, factor)
            change = paired_change(reference, scores(path, "trt-sim"), higher_is_better=True)
            print(f"activation scales x{factor:<7g} change {change.delta:+.4f} [{change.ci_low:+.4f}, "
                  f"{change.ci_high:+.4f}] n={change.n}, {change.share_worse:.0%} worse", flush=True)


if __name__ == "__main__":
    main()
