"""`quant calibrate MODEL --method entropy|minmax|percentile [--data MANIFEST] [-o CACHE] [--force]`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from quant.cli.executor_options import add_executor_options, executor_from_args
from quant.cli.options import percentile, positive_int, version_digits

MODEL_HELP = ("an ONNX file, or a model name (dpcrn, dpcrn-stream, wenet-encoder, wenet-decoder) meaning its export "
              "under engines/export/ (exported on demand)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="collect activation ranges and write a TensorRT calibration cache + keyed sidecar",
        description="Run the FP32 model over real-speech calibration feeds, compute amax per activation tensor and "
        "write TensorRT's cache format plus a JSON sidecar with the key (model, data, method, versions). A cache "
        "with the same key is reused; one with another key is refused unless --force.",
    )
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--method", choices=("entropy", "minmax", "percentile"),
                        help="range method (default: the model's measured best, quant.calib.calibrate."
                        "DEFAULT_METHODS; percentile for other models)")
    parser.add_argument("--percentile", type=percentile, default=99.99, help="for --method percentile, in (0, 100] (default 99.99)")
    parser.add_argument("--data", type=Path, help="calibration manifest (default: the model's committed set)")
    parser.add_argument("-o", "--output", type=Path,
                        help="cache file (default: engines/cache/<model>-<method>-<key>.cache)")
    parser.add_argument("--force", action="store_true", help="overwrite a cache at -o whose key differs")
    parser.add_argument("--kind", choices=("dpcrn", "dpcrn-stream", "wenet-encoder", "wenet-decoder"),
                        help="with an ONNX path: which known model's reader to use")
    parser.add_argument("--feature", choices=("stft", "fbank", "waveform"),
                        help="third-party model: the feature its input takes (with --input-name)")
    parser.add_argument("--input-name", help="third-party model: the input that takes the feature")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="let manifest paths leave the manifest's folder (absolute paths, `..`); refused by default")
    parser.add_argument("--limit", type=positive_int, help="use only the first N utterances of the manifest")
    parser.add_argument("--batch-size", type=positive_int, help="utterances/segments per feed (reader default 4)")
    parser.add_argument("--every", type=positive_int, help="streaming models: keep every k-th frame (reader default 4)")
    parser.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--max-batch", type=positive_int, help="split feed batches along axis 0 to bound memory")
    parser.add_argument("--trt-version", type=version_digits, help="version digits of the cache header, e.g. 8601 (default: installed "
                        "TensorRT, else the library default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_executor_options(parser)
    parser.set_defaults(handler=run)


def resolve_model(model: str) -> tuple[str | None, Path]:
    """(model kind or None, ONNX path) for a model name or a path."""
    path = Path(model)
    if path.suffix == ".onnx":
        return None, path
    from quant.build.artifact import resolve_model as resolve_known

    _, onnx_path = resolve_known(model)
    return model, onnx_path


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

    kind, onnx_path = resolve_model(args.model)
    kind = args.kind or kind
    ranges = RangeOptions(percentile=args.percentile, threads=args.threads, max_batch=args.max_batch,
                          progress=not args.no_progress)
    options = CalibrateOptions(ranges=ranges, force=args.force, trt_version=args.trt_version,
                               reader=reader_options(args))
    entry = calibrate(onnx_path, kind, args.data, args.method, args.output, options, executor=executor_from_args(args))
    zero = sum(1 for item in entry.ranges.values() if item.amax == 0)
    print(f"{entry.path}: {entry.cache.header}, {len(entry.cache.scale_bits)} tensors ({zero} with amax 0), "
          f"method {entry.key.method}, key {entry.key.digest()[:12]}, created {entry.created}")
    return 0
