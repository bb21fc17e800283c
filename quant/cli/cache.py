"""`quant cache list|show|diff|verify|rm|export`: inspect and manage calibration caches."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from quant.cli.options import non_negative_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="list, show, diff, verify, remove and export calibration caches")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="the caches in the store with their keys")
    listing.add_argument("--store", type=Path, help="store folder (default engines/cache)")
    listing.set_defaults(handler=run_list)

    show = actions.add_parser("show", help="one cache: header, tensor count, amax statistics, key")
    show.add_argument("cache", type=Path)
    show.add_argument("--tensors", action="store_true", help="also print every tensor's scale and amax")
    show.set_defaults(handler=run_show)

    diff = actions.add_parser("diff", help="two caches tensor by tensor (ratio of scales)")
    diff.add_argument("first", type=Path)
    diff.add_argument("second", type=Path)
    diff.add_argument("--top", type=non_negative_int, default=20, help="rows to print, largest |log ratio| first (0: all)")
    diff.set_defaults(handler=run_diff)

    verify = actions.add_parser("verify", help="is this cache valid for this model and data? (exit 1 if not)")
    verify.add_argument("cache", type=Path)
    verify.add_argument("model", help="ONNX file or model name")
    verify.add_argument("--data", type=Path, help="calibration manifest (default: the model's committed set)")
    verify.set_defaults(handler=run_verify)

    remove = actions.add_parser("rm", help="remove caches and their sidecars")
    remove.add_argument("caches", type=Path, nargs="+")
    remove.set_defaults(handler=run_rm)

    export = actions.add_parser("export", help="ranges as ONNX Runtime calibration JSON or Q/DQ parameters")
    export.add_argument("cache", type=Path)
    export.add_argument("--format", choices=("ort-json", "qdq"), required=True)
    export.add_argument("--encoding", choices=("int8", "uint8"), default="int8",
                        help="qdq: int8 symmetric (TensorRT) or uint8 asymmetric (ORT CPU)")
    export.add_argument("--asymmetric", action="store_true", help="ort-json: observed [min, max] clipped to amax")
    export.add_argument("-o", "--output", type=Path, required=True)
    export.set_defaults(handler=run_export)


def run_list(args: argparse.Namespace) -> int:
    from quant.calib.cache import scan_store
    from quant.calib.calibrate import default_store

    store = args.store or default_store()
    listing = scan_store(store)
    if not listing.entries:
        print(f"no calibration caches in {store}")
    else:
        print(f"{'cache':<44} {'method':<10} {'model':<12} {'data':<12} {'tensors':>7}  created")
    for entry in listing.entries:
        key = entry.key
        print(f"{entry.path.name:<44} {key.method:<10} {key.model_sha256[:12]:<12} {key.data_sha256[:12]:<12} "
              f"{len(entry.cache.scale_bits):>7}  {entry.created}")
    for path, reason in listing.bad:
        print(f"skipped {path.name}: {reason}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from quant.calib.cache import has_sidecar, read_cache, read_entry

    cache = read_cache(args.cache)
    every = np.array(list(cache.amax().values()), dtype=np.float64)
    amax = every[np.isfinite(every)]
    print(f"{args.cache}: {cache.header}, {every.size} tensors")
    if amax.size:
        print(f"amax: min {amax.min():.6g}, median {np.median(amax):.6g}, max {amax.max():.6g}; "
              f"{int((amax == 0).sum())} zero")
    if amax.size < every.size:
        print(f"{every.size - amax.size} tensors with an infinite scale (not quantizable)")
    if has_sidecar(args.cache):
        entry = read_entry(args.cache)
        print(json.dumps({"key": entry.key.to_dict(), "created": entry.created, "info": entry.info}, indent=2))
        nonfinite = {name: item.nonfinite for name, item in entry.ranges.items() if item.nonfinite}
        if nonfinite:
            print(f"non-finite values ignored in {len(nonfinite)} tensors: {nonfinite}")
    else:
        print("no sidecar: key unknown (e.g. written by TensorRT); it will not be reused by quant")
    if args.tensors:
        for name, scale in cache.scales().items():
            print(f"  {name}: scale {scale:.6g} amax {scale * 127:.6g}")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    from quant.calib.cache import diff_caches, read_cache

    rows = diff_caches(read_cache(args.first), read_cache(args.second))
    scored = sorted(rows, key=lambda row: -_log_ratio(row[1], row[2]))
    shown = scored if args.top == 0 else scored[: args.top]
    print(f"{len(rows)} tensors; ratio = scale in {args.second.name} / scale in {args.first.name}")
    for name, first, second in shown:
        print(f"  {name}: {_fmt(first)} -> {_fmt(second)}  ratio {_ratio(first, second)}")
    both = [(a, b) for _, a, b in rows if a and b and math.isfinite(a) and math.isfinite(b)]
    infinite = sum(1 for _, a, b in rows if a is not None and b is not None and not math.isfinite(a * b))
    if both:
        ratios = np.array([b / a for a, b in both])
        print(f"ratio over {len(both)} shared non-zero tensors: min {ratios.min():.4g}, "
              f"median {np.median(ratios):.4g}, max {ratios.max():.4g}")
    if infinite:
        print(f"{infinite} shared tensors with an infinite scale left out of the ratio statistics")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from quant.calib.calibrate import verify
    from quant.cli.calibrate import resolve_model

    kind, onnx_path = resolve_model(args.model)
    reasons = verify(args.cache, onnx_path, kind, args.data)
    if reasons:
        print(f"miss: {args.cache}: " + "; ".join(reasons))
        return 1
    print(f"hit: {args.cache} is valid for {onnx_path} and its calibration data")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from quant.calib.cache import remove_entry

    for path in args.caches:
        remove_entry(path)
        print(f"removed {path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from quant.calib.cache import read_entry, to_ort_json, to_qdq_params
    from quant.fileio import atomic_write_json

    entry = read_entry(args.cache)
    document: Any
    if args.format == "ort-json":
        document = to_ort_json(entry, symmetric=not args.asymmetric)
    else:
        document = {"encoding": args.encoding, "source": str(args.cache), "key": entry.key.to_dict(),
                    "tensors": to_qdq_params(entry, args.encoding)}
    atomic_write_json(args.output, document)
    print(f"wrote {args.output} ({args.format}, {len(entry.cache.scale_bits)} tensors)")
    return 0


def _log_ratio(first: float | None, second: float | None) -> float:
    """|log(second / first)|; inf (listed first) where a scale is absent, zero or infinite: never NaN."""
    if not first or not second or not math.isfinite(first * second):
        return math.inf
    return abs(math.log(second / first))


def _ratio(first: float | None, second: float | None) -> str:
    if first is None or second is None:
        return "(only in one cache)"
    if not math.isfinite(first * second):
        return "1 (both infinite)" if first == second else "n/a (infinite scale)"
    if first == 0:
        return "inf" if second else "1"
    return f"{second / first:.4g}"


def _fmt(scale: float | None) -> str:
    return "-" if scale is None else f"{scale:.6g}"
