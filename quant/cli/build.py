"""`quant build SPEC [--graph ROLE] --precision fp32|fp16|int8 --backend ort|trt`: an artifact per graph under
engines/<graph name>/<precision>/ (INT8 calibrates first unless --cache); an .onnx file (INT8 with --cache) still works."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quant.cli.options import positive_int
from quant.cli.specs import add_rewrites, add_spec, fp32_graphs, is_onnx, select, single_output
from quant.errors import QuantError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build", help="build an FP32/FP16/INT8 artifact (ONNX for ONNX Runtime, or a TensorRT engine)",
        description="Build each graph of SPEC (or --graph ROLE) at one precision into engines/<graph name>/"
        "<precision>/ (model.onnx + meta.json; INT8 also model_trt_qdq.onnx, the int8-symmetric Q/DQ model for "
        "TensorRT explicit mode). INT8 ranges come from --cache (a `quant calibrate` cache of this exact graph) or "
        "from the cache store / a fresh calibration with the spec's method and data.",
    )
    add_spec(parser, onnx=True)
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), required=True)
    parser.add_argument("--backend", choices=("ort", "trt"), default="ort")
    parser.add_argument("--mode", choices=("implicit", "explicit"), default="explicit",
                        help="TensorRT INT8: explicit Q/DQ (default) or implicit calibration cache (TensorRT <= 10)")
    parser.add_argument("--cache", type=Path, help="calibration cache from `quant calibrate` (INT8)")
    parser.add_argument("--method", choices=("entropy", "minmax", "percentile"),
                        help="INT8 without --cache: calibration method of the cache made or reused (default: the "
                        "spec's [defaults] calibration_method)")
    parser.add_argument("--limit", type=positive_int, help="INT8 without --cache: calibrate on the first N utterances "
                        "(as `quant calibrate SPEC --limit N`, whose cache is then reused)")
    parser.add_argument("--constraints", choices=("obey", "prefer"), default="obey",
                        help="TensorRT implicit mode: obey (fail if impossible) or prefer the rules' layer precisions")
    parser.add_argument("--rules", type=Path, help="precision rules TOML (default: shipped rules)")
    add_rewrites(parser)
    parser.add_argument("-o", "--output", type=Path, help="artifact folder, with one graph (default engines/<graph "
                        "name>/<precision>)")
    parser.add_argument("--optimize", action="store_true", help="FP32: store ORT's optimized graph instead of a copy")
    parser.add_argument("--int8-activations", action="store_true",
                        help="ORT INT8: int8 instead of uint8 activations (uint8 is what x86 CPU kernels run fast)")
    parser.add_argument("--unwrap-kernel-outputs", action="store_true",
                        help="ORT INT8: float nodes protected by a rule read un-quantized inputs even where that "
                        "prevents an integer-kernel fusion")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if is_onnx(args.spec):
        if args.rewrites:
            raise QuantError(f"--rewrites needs a model spec (the check runs on its calibration feeds), not "
                             f"{args.spec}; give SPEC, or rewrite the file with quant.rewrite.rewrite_file")
        report(build(args, Path(args.spec), None, args.cache, ()))
        return 0
    selection = select(args.spec, args.graph)
    single_output(selection, args.output, "-o")
    single_output(selection, args.cache, "--cache")
    graphs = fp32_graphs(selection.spec, args.rewrites)
    for graph in selection.graphs:
        cache = args.cache
        if args.precision == "int8" and cache is None:
            cache = calibrated(selection.spec, graph.role, graphs, args.method, args.limit)
        report(build(args, graphs[graph.role], graph.name, cache, graph.rules_off))  # a --rules file ignores it
    return 0


def calibrated(spec: Any, role: str, graphs: dict[str, Path], method: str | None, limit: int | None) -> Path:
    """The cache of one graph from the store (reused on an exact key hit) or calibrated now, as the spec says."""
    from quant.tasks.calibration import calibrate_spec
    from quant.tasks import FeedOptions

    feeds = FeedOptions(limit=limit, graphs=graphs)
    return Path(calibrate_spec(spec, role, graphs[role], method=method, feed_options=feeds).path)


def build(args: argparse.Namespace, source: Path, name: str | None, cache: Path | None,
          rules_off: tuple[str, ...]) -> Path:
    from quant.artifacts import build_artifact

    return build_artifact(
        source, args.precision, args.backend, name=name, mode=args.mode, cache=cache, rules=args.rules,
        rules_off=rules_off,
        out_dir=args.output, optimize_fp32=args.optimize, activation_uint8=not args.int8_activations,
        unwrap_kernel_outputs=args.unwrap_kernel_outputs, method=args.method, constraints=args.constraints,
    )


def report(out_dir: Path) -> None:
    meta = json.loads((out_dir / "meta.json").read_text())
    kernels = meta.get("integer_kernels")
    print(f"{out_dir}: {meta['model']} {meta['precision']} for {meta['backend']}"
          + (f", integer kernels {kernels}" if kernels is not None else ""))
