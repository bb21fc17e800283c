"""`quant evaluate`: task metrics of one artifact (or PyTorch eager) on a test set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quant.cli.executor_options import add_executor_options, executor_from_args
from quant.cli.options import positive_int
from quant.errors import QuantError

MODELS = ("dpcrn", "dpcrn-stream", "wenet")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="PESQ/STOI/SI-SDR or CER/WER of one artifact on a test set",
        description="Run MODEL's artifact(s) on a test manifest and print the task metrics. dpcrn / dpcrn-stream "
        "take one file (dpcrn.onnx / dpcrn_stream.onnx, a built model.onnx or an engine); wenet takes the encoder "
        "and the decoder. With --backend torch, give the FP32 ONNX export(s): the PyTorch modules of the same "
        "graphs run eagerly with the shipped weights. With --backend trt-sim, give what TensorRT's explicit mode "
        "builds from (int8: model_trt_qdq.onnx of an int8 build; fp16: the FP16 model.onnx): ONNX Runtime runs it "
        "with Q/DQ kept as fake quantization, a CPU prediction of TensorRT's accuracy, not a TensorRT measurement.",
    )
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("artifacts", nargs="+", type=Path, help="model file (wenet: encoder then decoder)")
    parser.add_argument("--backend", choices=("ort", "trt", "torch", "trt-sim"), default="ort")
    parser.add_argument("--manifest", type=Path, help="test manifest (default calib_data/se_test or asr_test)")
    parser.add_argument("--limit", type=positive_int, help="first N utterances")
    parser.add_argument("--threads", type=positive_int, default=2, help="ONNX Runtime / PyTorch threads (default 2)")
    parser.add_argument("--greedy", action="store_true", help="wenet: CTC greedy only, no attention rescoring")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_executor_options(parser)
    parser.set_defaults(handler=run)


def _manifest(args: argparse.Namespace) -> Path:
    from quant.paths import calib_data_dir

    if args.manifest is not None:
        return Path(args.manifest)
    return calib_data_dir() / ("asr_test" if args.model == "wenet" else "se_test") / "manifest.jsonl"


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from quant.backends import open_runner

    expected = 2 if args.model == "wenet" else 1
    if len(args.artifacts) != expected:
        raise QuantError(f"{args.model} takes {expected} artifact file(s), got {len(args.artifacts)}")
    manifest = _manifest(args)
    executor = executor_from_args(args)
    if executor is not None:
        return _evaluate_sharded(args, manifest, executor)
    runners = [open_runner(path, args.backend, args.threads) for path in args.artifacts]
    if args.model == "wenet":
        from quant.eval.asr import AsrOptions, evaluate_asr, load_samples

        samples = load_samples(str(manifest), args.limit)
        result = evaluate_asr(runners[0], runners[1], samples, AsrOptions(rescore=not args.greedy))
        return result.to_dict()
    from quant.eval import se

    runner = runners[0]
    enhance = se.enhance_offline if args.model == "dpcrn" else se.enhance_streaming
    result_se = se.evaluate_se(lambda audio: enhance(runner, audio), se.load_pairs(str(manifest), args.limit))
    return {**result_se.to_dict()}


def _evaluate_sharded(args: argparse.Namespace, manifest: Path, executor: Any) -> dict[str, Any]:
    from quant.eval import sharded

    if args.model == "wenet":
        from quant.eval.asr import AsrOptions

        result = sharded.evaluate_asr_sharded(args.artifacts[0], args.artifacts[1], manifest, args.limit, executor,
                                              AsrOptions(rescore=not args.greedy), args.backend, args.threads)
        return result.to_dict()
    return sharded.evaluate_se_sharded(args.artifacts[0], args.model == "dpcrn-stream", manifest, args.limit,
                                       executor, args.backend, args.threads).to_dict()


def run(args: argparse.Namespace) -> int:
    metrics = evaluate(args)
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
        return 0
    for key, value in sorted(metrics.items()):
        if isinstance(value, dict):
            print(f"{key}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(value.items())))
        elif isinstance(value, float):
            print(f"{key}: {value:.4f}")
        else:
            print(f"{key}: {value}")
    return 0
