"""`quant calibrate SPEC [--graph ROLE] [--method entropy|minmax|percentile] [--data MANIFEST] [--feeds FILE.npz|
module:function] [-o CACHE] [--force]`; an .onnx file with --feature/--input-name (or a streaming model) still works."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from quant.cli.executor_options import add_executor_options, executor_from_args
from quant.cli.options import percentile, positive_int, version_digits
from quant.cli.specs import add_rewrites, add_spec, fp32_graphs, is_onnx, select, single_output
from quant.errors import QuantError



def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="collect activation ranges and write a TensorRT calibration cache + keyed sidecar",
        description="Run the FP32 model over real-speech calibration feeds, compute amax per activation tensor and "
        "write TensorRT's cache format plus a JSON sidecar with the key (model, data, method, versions). A cache "
        "with the same key is reused; one with another key is refused unless --force.",
    )
    add_spec(parser, onnx=True)
    parser.add_argument("--method", choices=("entropy", "minmax", "percentile"),
                        help="range method (default: the spec's [defaults] calibration_method; percentile)")
    parser.add_argument("--percentile", type=percentile, default=99.99, help="for --method percentile, in (0, 100] (default 99.99)")
    parser.add_argument("--data", type=Path, help="calibration manifest (default: the spec's calibration_manifest)")
    parser.add_argument("--feeds", help="feeds instead of the spec's front end: FILE.npz (arrays named by input, or "
                        "<role>/<input>; axis 0 = one feed each) or module:function (called as function(spec, graph, "
                        "audio) -> iterable of {input: array})")
    parser.add_argument("-o", "--output", type=Path,
                        help="cache file, with one graph (default: engines/cache/<graph name>-<method>-<key>.cache)")
    parser.add_argument("--force", action="store_true", help="overwrite a cache at -o whose key differs")
    parser.add_argument("--feature", choices=("stft", "fbank", "waveform"),
                        help="an .onnx file without a spec: the feature its input takes (with --input-name)")
    parser.add_argument("--input-name", help="an .onnx file without a spec: the input that takes the feature")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="let manifest paths leave the manifest's folder (absolute paths, `..`); refused by default")
    parser.add_argument("--limit", type=positive_int, help="use only the first N utterances of the manifest")
    parser.add_argument("--batch-size", type=positive_int, help="utterances/segments per feed (reader default 4)")
    parser.add_argument("--every", type=positive_int, help="streaming models: keep every k-th frame (reader default 4)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="ONNX Runtime intra-op threads, also updating the range statistics (default 1)")
    parser.add_argument("--max-batch", type=positive_int, help="split feed batches along axis 0 to bound memory")
    parser.add_argument("--trt-version", type=version_digits, help="version digits of the cache header, e.g. 8601 (default: installed "
                        "TensorRT, else the library default)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (default: one while stderr is a terminal)")
    add_rewrites(parser)  # SPEC: calibrate the graph the build will quantize (the same rewrites)
    add_executor_options(parser)
    parser.set_defaults(handler=run)


def resolve_model(model: str) -> tuple[str | None, Path]:
    """(None, ONNX path) for an .onnx file (`quant cache verify`: calibrations made without a spec)."""
    return None, Path(model)


def reader_options(args: argparse.Namespace) -> Any:
    """quant.calib.readers.ReaderOptions from the flags given (None: the reader's defaults)."""
    changes = {name: getattr(args, name) for name in ("limit", "batch_size", "every", "feature", "input_name")
               if getattr(args, name, None)}
    if getattr(args, "allow_outside_paths", False):
        changes["allow_outside"] = True
    if not changes:
        return None
    from quant.calib.readers import ReaderOptions

    return ReaderOptions(**changes)


def run(args: argparse.Namespace) -> int:
    from quant.calib.calibrate import CalibrateOptions, calibrate
    from quant.calib.ranges import RangeOptions

    ranges = RangeOptions(percentile=args.percentile, threads=args.threads, max_batch=args.max_batch,
                          progress=not args.no_progress)
    options = CalibrateOptions(ranges=ranges, force=args.force, trt_version=args.trt_version,
                               reader=reader_options(args) if is_onnx(args.spec) else None,
                               allow_outside=args.allow_outside_paths)
    if is_onnx(args.spec):
        if args.rewrites:
            raise QuantError(f"--rewrites needs a model spec (the check runs on its calibration feeds), not "
                             f"{args.spec}")
        entries = [calibrate(Path(args.spec), None, args.data, args.method, args.output, options,
                             executor=executor_from_args(args))]
    else:
        entries = calibrate_spec_graphs(args, options)
    for entry in entries:
        zero = sum(1 for item in entry.ranges.values() if item.amax == 0)
        print(f"{entry.path}: {entry.cache.header}, {len(entry.cache.scale_bits)} tensors ({zero} with amax 0), "
              f"method {entry.key.method}, key {entry.key.digest()[:12]}, created {entry.created}")
    return 0


def calibrate_spec_graphs(args: argparse.Namespace, options: Any) -> list[Any]:
    """A cache per selected graph of the spec, in order (later graphs' feeds run the earlier FP32 graphs)."""
    from dataclasses import replace

    from quant.tasks.calibration import calibrate_spec
    from quant.tasks import FeedOptions

    selection = select(args.spec, args.graph)
    single_output(selection, args.output, "-o")
    spec = selection.spec
    if args.feeds:
        spec = replace(spec, feeds=feeds_spec(args.feeds))
    graphs = fp32_graphs(spec, args.rewrites)
    feed_options = FeedOptions(limit=args.limit, batch_size=args.batch_size, frame_stride=args.every,
                               threads=args.threads, graphs=graphs, allow_outside=args.allow_outside_paths)
    return [calibrate_spec(spec, role, graphs[role], args.data, args.method, args.output, options, feed_options,
                           executor=executor_from_args(args))
            for role in selection.roles]


def feeds_spec(text: str) -> Any:
    """--feeds FILE.npz or module:function as the spec's [feeds] escape hatch."""
    from quant.spec import FeedsSpec
    from quant.tomlschema import SchemaError

    try:
        if text.endswith(".npz"):
            return FeedsSpec(npz=Path(text).resolve())
        return FeedsSpec(function=text)
    except SchemaError as error:
        raise QuantError(f"--feeds {text!r}: {error.message}; give FILE.npz or module:function") from None
