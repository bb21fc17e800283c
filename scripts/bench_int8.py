"""INT8/FP32 latency that survives a busy machine: for each model, build FP32 and INT8 of the export and of each
rewritten variant (quant.rewrite, every rewrite checked against the original on real inputs first), then time all
builds of that model round-robin in one process (ORT, 1 thread by default). Prints min / median / p10-p90 per build,
the ratios against the plain FP32 build and against the fastest FP32 build (the honest ratio when a rewrite also
speeds FP32 up), flags a ratio as unreliable when the p10-p90 spreads overlap, and the 1-min load average before and
after. The INT8 builds' output SNR against their FP32 build on the timing input is printed as a sanity check (the
accuracy budgets are judged by `quant run` / `quant search`, not here).

    python scripts/bench_int8.py dpcrn --variant deconv=deconv-to-conv \\
        --variant split=deconv-to-conv,split-concat-conv --calib-limit 4 --runs 30 --json /tmp/bench.json

    python scripts/bench_int8.py wenet-encoder --int8-rules before=/tmp/rules_before.toml --runs 60

times the shipped rules' INT8 (int8) and the same graph's INT8 under another rules file (int8-before) in the same
rounds, and prints their paired ratio; with --variant, every rewritten graph gets its int8-LABEL build too.

MODEL is a reference model (dpcrn, dpcrn-stream, wenet-encoder) optionally with its export: dpcrn=/tmp/x/dpcrn.onnx
(default: engines/export/, exported on demand). --cache gives the plain export's calibration cache; rewritten
graphs are calibrated afresh on the first --calib-limit utterances (their new tensors need ranges)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx

from quant.artifacts import build_artifact
from quant.artifacts.artifact import MODEL_FILE
from quant.calib.calibrate import CalibrateOptions
from quant.calib.ranges import RangeOptions
from quant.errors import QuantError
from quant.fileio import atomic_write_json
from quant.rewrite import apply_rewrites
from quant.tasks import FeedOptions
from quant.tasks.calibration import calibrate_spec
from quant.timing import (format_interleaved, reference_export, reference_graph, time_interleaved, timing_feeds,
                          timing_workload)

log = logging.getLogger("bench_int8")


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    label, _, names = text.partition("=")
    if not label or not names:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL=rewrite[,rewrite...]")
    return label, tuple(n.strip() for n in names.split(",") if n.strip())


def parse_rules(text: str) -> tuple[str, Path]:
    label, _, path = text.partition("=")
    if not label or not path or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--int8-rules {text!r}: expected LABEL=RULES.toml of an existing file")
    return label, Path(path)


def snr_db(reference: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> float:
    """Over the float outputs: an index output (the WeNet encoder's top-k) swaps on near ties, not a noise power."""
    keys = [k for k in reference if np.issubdtype(reference[k].dtype, np.floating)]
    noise = sum(float(((reference[k].astype(np.float64) - test[k]) ** 2).sum()) for k in keys)
    power = sum(float((reference[k].astype(np.float64) ** 2).sum()) for k in keys)
    return float("inf") if noise == 0 else 10 * float(np.log10(max(power, 1e-30) / noise))


def prepare(model: str, source: Path, label: str, rewrites: tuple[str, ...], work: Path, feeds: dict[str, np.ndarray],
            cache: Path | None, calib_limit: int, rules: Path | None = None,
            int8_rules: tuple[tuple[str, Path], ...] = ()) -> dict[str, Path]:
    """FP32 and INT8 model.onnx of one variant, and one more INT8 build per (label, rules file) of `int8_rules`
    (same graph, same calibration cache: only the precision rules differ)."""
    folder = work / model / label
    if rewrites:
        result, check = apply_rewrites(onnx.load(str(source)), rewrites, [feeds])
        print(f"{model} {label}: rewrote {len(result.rewritten)} nodes; max abs error vs original "
              f"{check.max_abs_error:.3g} ({check.relative_error:.2g} of the output range)", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / source.name  # same stem: the build and calibration see the same model name
        onnx.save(result.model, str(source))
        cache = None
    if cache is None:
        spec, graph = reference_graph(model)  # the graph's spec gives its feeds (rewritten graphs: same inputs)
        options = CalibrateOptions(ranges=RangeOptions(progress=False), force=True)
        cache = Path(calibrate_spec(spec, graph.role, source, out_cache=folder / "calib.cache", options=options,
                                    feed_options=FeedOptions(limit=calib_limit)).path)
    fp32 = build_artifact(source, "fp32", out_dir=folder / "fp32") / MODEL_FILE
    int8 = build_artifact(source, "int8", out_dir=folder / "int8", cache=cache,
                          rules=rules if rewrites else None) / MODEL_FILE
    extra = {f"int8-{name}": build_artifact(source, "int8", out_dir=folder / f"int8-{name}", cache=cache,
                                            rules=path) / MODEL_FILE for name, path in int8_rules}
    return {"fp32": fp32, "int8": int8, **extra}


def bench_model(spec: str, args: argparse.Namespace) -> dict[str, object]:
    model, _, given = spec.partition("=")
    source = Path(given) if given else reference_export(model)
    feeds = timing_feeds(model, source)
    builds: dict[str, Path] = {}
    for label, rewrites in [("plain", ()), *args.variant]:
        for precision, path in prepare(model, source, label, rewrites, args.work, feeds, args.cache if not rewrites
                                       else None, args.calib_limit, args.rules,
                                       tuple(args.int8_rules)).items():
            builds[f"{precision}" if label == "plain" else f"{precision}+{label}"] = path
    from quant.backends.ort import OrtRunner

    snrs = {}
    for label, path in builds.items():
        if label.startswith("int8"):
            fp32_label = "fp32" + label.partition("+")[1] + label.partition("+")[2]
            snrs[label] = snr_db(OrtRunner(builds[fp32_label]).run(feeds), OrtRunner(path).run(feeds))
    # streaming graphs are rolled over real frames with their states carried (per frame: a round's mean)
    result = time_interleaved(builds, timing_workload(model, source), args.runs, args.threads)
    print(f"\n== {model} ({args.threads} thread(s))")
    print(format_interleaved(result, "fp32"))
    fp32_labels = [label for label in builds if label.startswith("fp32")]
    best = min(fp32_labels, key=lambda label: result.stats[label].p50_ms)
    honest = result.ratios(best)
    for label in builds:
        if label.startswith("int8") and label in honest:
            ratio = honest[label]
            print(f"{label} / fastest FP32 ({best}): min {ratio.min_ratio:.3f}, median {ratio.median_ratio:.3f}, "
                  f"paired {ratio.paired_median:.3f} ({ratio.paired_p10:.3f}-{ratio.paired_p90:.3f})"
                  f"{'' if ratio.reliable else ' (unreliable: spreads overlap)'}; output SNR vs its FP32 "
                  f"{snrs[label]:.1f} dB")
    same_graph = {}
    for label in builds:
        if label.startswith("int8-"):  # an --int8-rules build against the same graph's int8 build, same rounds
            name, _, variant = label.partition("+")
            base = "int8" + (f"+{variant}" if variant else "")
            same_graph[label] = ratio = result.ratios(base)[label]
            print(f"{label} / {base}: min {ratio.min_ratio:.3f}, median {ratio.median_ratio:.3f}, paired "
                  f"{ratio.paired_median:.3f} ({ratio.paired_p10:.3f}-{ratio.paired_p90:.3f})"
                  f"{'' if ratio.reliable else ' (unreliable: spreads overlap)'}")
    return {"model": model, "source": str(source), "threads": args.threads, "variants": dict(args.variant),
            "vs_same_graph_int8": {k: v.to_dict() for k, v in same_graph.items()},
            "fastest_fp32": best, **result.to_dict("fp32"),
            "vs_fastest_fp32": {k: v.to_dict() for k, v in honest.items()}, "int8_output_snr_db": snrs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="dpcrn | dpcrn-stream | wenet-encoder, optionally =EXPORT.onnx")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[],
                        help="LABEL=rewrite[,rewrite]: also build and time this rewritten graph (repeatable); "
                        "rewrites: deconv-to-conv, split-concat-conv, prelu-to-leakyrelu")
    parser.add_argument("--cache", type=Path, help="calibration cache of the plain export (one model only)")
    parser.add_argument("--rules", type=Path, help="precision rules for the rewritten variants' INT8 builds (default: "
                        "shipped rules; the plain build always uses the shipped rules)")
    parser.add_argument("--int8-rules", type=parse_rules, action="append", default=[],
                        help="LABEL=RULES.toml: also build every graph's INT8 with these precision rules (same "
                        "cache) and time it as int8-LABEL in the same rounds (repeatable), e.g. the rules before a "
                        "change against the shipped ones (the plain export's int8: shipped rules; a variant's: --rules)")
    parser.add_argument("--calib-limit", type=int, default=4, help="utterances to calibrate with (default 4)")
    parser.add_argument("--runs", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("engines/bench_int8"), help="builds go here")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cache and len(args.models) > 1:
        parser.error("--cache belongs to one model's export")
    try:
        results = [bench_model(spec, args) for spec in args.models]
    except QuantError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        atomic_write_json(args.json, {"command": " ".join(sys.argv), "results": results})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
