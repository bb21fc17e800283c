"""`quant evaluate SPEC [ARTIFACT ...]`: task metrics of a spec's artifacts (or PyTorch eager) on its test set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quant.cli.executor_options import add_executor_options, executor_from_args
from quant.cli.options import positive_int
from quant.cli.specs import add_rewrites, add_spec, fp32_graphs, select
from quant.errors import QuantError

PRECISIONS = ("fp32", "fp16", "int8")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="PESQ/STOI/SI-SDR or CER/WER of a model's artifacts on its test set",
        description="Run SPEC's graphs on a test manifest (default the spec's) through its task and print the "
        "metrics. Without ARTIFACT, every precision built by `quant build SPEC` (engines/<graph name>/<precision>/"
        "model.onnx) and FP32 (the graphs themselves); with ARTIFACT, one file per graph in the spec's order (an "
        "ONNX file, a built model.onnx or an engine). With --backend torch, give the FP32 ONNX exports of quant's "
        "reference graphs: their PyTorch modules run eagerly with the shipped weights. With --backend trt-sim, give "
        "what TensorRT's explicit mode builds from (int8: model_trt_qdq.onnx of an int8 build; fp16: the FP16 "
        "model.onnx): ONNX Runtime runs it with Q/DQ kept as fake quantization, a CPU prediction of TensorRT's "
        "accuracy, not a TensorRT measurement.",
    )
    add_spec(parser, graphs=False)
    parser.add_argument("artifacts", nargs="*", type=Path, metavar="ARTIFACT",
                        help="one model file per graph, in the spec's order (default: the built precisions)")
    parser.add_argument("--precision", choices=PRECISIONS, action="append", dest="precisions",
                        help="without ARTIFACT: evaluate this precision's build (repeatable; default fp32 and every "
                        "precision built)")
    parser.add_argument("--backend", choices=("ort", "trt", "torch", "trt-sim"), default="ort")
    parser.add_argument("--manifest", type=Path, help="test manifest (default: the spec's test_manifest)")
    parser.add_argument("--limit", type=positive_int, help="first N utterances")
    parser.add_argument("--threads", type=positive_int, default=2, help="ONNX Runtime / PyTorch threads (default 2)")
    parser.add_argument("--greedy", action="store_true", help="ASR: no attention rescoring (the CTC beam's best)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_executor_options(parser)  # --executor ray: the test utterances in shards on Ray, the same metrics
    add_rewrites(parser)  # which FP32 graph the fp32 row runs (the builds' own source is in their meta.json)
    parser.set_defaults(handler=run)


def artifact_sets(args: argparse.Namespace, spec: Any) -> dict[str, dict[str, Path]]:
    """label -> artifact per graph role: the files given, else FP32 and each precision built."""
    roles = [g.role for g in spec.graphs]
    if args.artifacts:
        if len(args.artifacts) != len(roles):
            raise QuantError(f"{spec.name} has {len(roles)} graph(s) {roles}: give one artifact each, in that order "
                             f"(got {len(args.artifacts)})")
        return {"artifacts": dict(zip(roles, args.artifacts))}
    from quant.paths import DEFAULT_OUT_ROOT

    sets: dict[str, dict[str, Path]] = {}
    for precision in args.precisions or PRECISIONS:
        if precision == "fp32":
            sets["fp32"] = fp32_graphs(spec, args.rewrites)
            continue
        built = {g.role: DEFAULT_OUT_ROOT / str(g.name) / precision / "model.onnx" for g in spec.graphs}
        if all(path.is_file() for path in built.values()):
            sets[precision] = built
        elif args.precisions:
            missing = [str(p) for p in built.values() if not p.is_file()]
            raise QuantError(f"{', '.join(missing)}: no {precision} build; run `quant build {args.spec} --precision "
                             f"{precision}` first")
    return sets


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Metrics per artifact set (see artifact_sets): in this process, or with --executor ray in shards of the test
    set on Ray (quant.tasks.sharded; the same numbers)."""
    from quant.backends import open_runner
    from quant.tasks import task_for

    spec = select(args.spec).spec
    task = task_for(spec)
    executor = executor_from_args(args)
    manifest = str(args.manifest) if args.manifest else None
    memo: dict[str, Any] = {}  # the test audio (and SE's noisy scores), loaded once for every set
    out = {}
    for label, artifacts in artifact_sets(args, spec).items():
        if args.greedy and spec.model.task == "asr":  # the encoder alone: transcripts are the beam search's best
            artifacts = {role: path for role, path in artifacts.items() if role == spec.graphs[0].role}
        if executor is not None:
            from quant.tasks.sharded import evaluate_sharded

            result = evaluate_sharded(spec, artifacts, manifest, args.limit, executor, args.backend, args.threads)
        else:
            runners = {role: open_runner(path, args.backend, args.threads) for role, path in artifacts.items()}
            result = task.evaluate(runners, manifest, args.limit, args.threads, memo=memo)
        out[label] = result.to_dict()
    return out


def run(args: argparse.Namespace) -> int:
    results = evaluate(args)
    if args.json:
        only = list(results.values())[0] if list(results) == ["artifacts"] else results
        print(json.dumps(only, indent=2, sort_keys=True))
        return 0
    for label, metrics in results.items():
        if label != "artifacts":
            print(f"== {label} ==")
        for key, value in sorted(metrics.items()):
            if isinstance(value, dict):
                print(f"{key}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(value.items())))
            elif isinstance(value, float):
                print(f"{key}: {value:.4f}")
            else:
                print(f"{key}: {value}")
    return 0
